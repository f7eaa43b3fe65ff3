"""A user's mistake is one `phalanx: error:` line naming the value and the fix, exit code 2 (a checkpoint or data
that cannot be used: 1), with no traceback: refused before anything is written or any rank starts."""
import re

import pytest

from phalanx.commands import main
from phalanx.runtime.dist import LAUNCH_VARS
from tests.conftest import make_idx_dataset


@pytest.fixture(autouse=True)
def _no_launcher_around(monkeypatch):
    for name in LAUNCH_VARS:  # this process is a command, not a rank of some launcher
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def idx(tmp_path_factory):
    return make_idx_dataset(tmp_path_factory.mktemp("idx"), 64, 16)


def one_line(capsys, argv, code=2, quiet=False):
    """Run `phalanx ARGV` here; assert its exit code and one error line without a traceback (`quiet`: and nothing
    on stdout before it); return the line."""
    got = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    # a data preparation's progress bars (scan, decode) may come first: progress, not part of the error
    lines = [x for x in err.strip().splitlines() if x.strip() and not re.match(r"^\w+: +\d+%\|", x)]
    assert got == code, err
    assert not quiet or out == "", out
    assert len(lines) == 1 and lines[0].startswith("phalanx: error: "), err
    assert "Traceback" not in out + err
    return lines[0]


def test_device_cuda_without_cuda_is_one_line(monkeypatch, capsys, idx, tmp_path):
    from phalanx.runtime import CUDAAccelerator
    monkeypatch.setattr(CUDAAccelerator, "is_available", classmethod(lambda cls: False))
    line = one_line(capsys, ["train", "--device", "cuda", "--data", idx, "--out_dir", tmp_path / "runs"])
    assert "device=cuda asked for, but torch sees no CUDA device; use --device auto" in line
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("width,fix", [(24, "--model.width 16 or 32"), (12, "--model.width 8 or 16")])
def test_group_norm_whose_groups_do_not_divide_the_channels_is_one_line(capsys, idx, tmp_path, width, fix):
    line = one_line(capsys, ["train", "--model.norm", "group", "--model.width", width, "--data", idx,
                             "--out_dir", tmp_path / "runs"])
    assert f"model.norm='group' at model.width={width}" in line and fix in line
    assert not (tmp_path / "runs").exists()


def test_group_norm_at_a_width_it_divides_is_accepted():
    from phalanx import config as C
    from phalanx.tools.checks import check_config
    check_config(C.build_config(None, [("model.norm", "group"), ("model.width", "32")]))


@pytest.mark.parametrize("node_rank,nnodes", [(5, 2), (7, 1), (-9, 1), (2, 2)])
def test_a_node_rank_outside_the_nodes_is_one_line(capsys, idx, node_rank, nnodes):
    line = one_line(capsys, ["train", "--nnodes", nnodes, "--node-rank", node_rank, "--data", idx])
    assert f"parallel.node_rank={node_rank}: must be from 0 to nnodes - 1 = {nnodes - 1}" in line


@pytest.mark.parametrize("argv,needle", [
    (["scaling", "--max-world", "0"], "--max-world 0: must be a whole number >= 1"),
    (["scaling", "--max-world", "100000"], "--max-world 100000: more ranks than this node can usefully run"),
    (["scaling", "--steps", "-1"], "--steps -1: must be a whole number >= 1"),
    (["flops", "--model", "nosuch"], "--model nosuch: unknown model"),
    (["flops", "--width", "0"], "--width 0: must be a whole number >= 1"),
    (["flops", "--size", "0"], "--size 0: must be a whole number >= 1"),
    (["flops", "--size", "2"], "--size 2: cannot build or run it"),
    (["flops", "--model", "mnist_net", "--size", "4"], "--size 4: cannot build or run it"),
    (["flops", "--width", "100000"], "--width 100000: its weights, gradients and optimizer state need"),
    (["flops", "--batch", "0"], "--batch 0: must be a whole number >= 1"),
    (["loader", "--global_batch", "0"], "--global_batch 0: must be a whole number >= 1"),
    (["step", "--nproc", "0"], "--nproc 0: must be a whole number >= 1"),
    (["step", "--nproc", "100000"], "--nproc 100000: more ranks than this node can usefully run"),
    (["step", "--nproc", "1", "--model", "nosuch"], "--model nosuch: unknown model"),
])
def test_bench_arguments_out_of_range_are_one_line(capsys, argv, needle):
    assert needle in one_line(capsys, ["bench", *argv])


def test_bench_scaling_passes_a_training_refusal_on_as_one_line(capsys):
    # The options after `--` go to each training it runs: a refused one is the user's to fix, not a traceback.
    line = one_line(capsys, ["bench", "scaling", "--max-world", "1", "--steps", "1", "--", "--optim.lr", "abc"])
    assert "the benchmark's training refused its options: " in line and "optim.lr" in line


def test_channels_on_the_builtin_fashion_mnist_is_a_usage_error(capsys, fashion_available, tmp_path):
    line = one_line(capsys, ["train", "--data.channels", "3", "--out_dir", tmp_path / "runs"])
    assert "--data fashion_mnist is a folder of idx files" in line
    assert not (tmp_path / "runs").exists()


def test_channels_on_an_idx_folder_is_a_usage_error(capsys, idx, tmp_path):
    line = one_line(capsys, ["train", "--data", idx, "--data.channels", "3", "--out_dir", tmp_path / "runs"])
    assert "a folder of idx files, used at its own size and channels" in line


def test_streaming_a_builtin_set_is_a_usage_error(capsys, tmp_path):
    line = one_line(capsys, ["train", "--data.stream", "true", "--data.size", "28", "--out_dir", tmp_path / "runs"])
    assert "data.stream=True: --data fashion_mnist is a built-in set" in line


def test_streaming_an_idx_folder_is_a_usage_error(capsys, idx, tmp_path):
    line = one_line(capsys, ["train", "--data", idx, "--data.stream", "true", "--data.size", "28",
                             "--out_dir", tmp_path / "runs"])
    assert "--data.stream reads an ImageFolder" in line and "this is not an ImageFolder" in line


def test_an_image_folder_of_one_class_is_a_usage_error(capsys, tmp_path):
    from PIL import Image
    for split in ("train", "test"):
        (tmp_path / "one" / split / "cat").mkdir(parents=True)
        for i in range(4):
            Image.new("L", (8, 8), 40 * i).save(tmp_path / "one" / split / "cat" / f"{i}.png")
    line = one_line(capsys, ["train", "--data", tmp_path / "one", "--data.size", "8", "--progress", "false",
                             "--data.cache_dir", tmp_path / "cache", "--out_dir", tmp_path / "runs"])
    assert "every training image is of one class ('cat')" in line
    assert not (tmp_path / "runs").exists()


def test_resume_of_a_folder_without_checkpoints_is_refused_before_the_run_announces_itself(capsys, idx, tmp_path):
    (tmp_path / "empty").mkdir()
    # quiet: no tuning line, no "launching 2 rank(s)" line comes before the refusal
    line = one_line(capsys, ["train", "--resume", tmp_path / "empty", "--data", idx, "--nproc", "2"], code=1,
                    quiet=True)
    assert f"{tmp_path / 'empty'}: holds no checkpoint" in line
    assert list((tmp_path / "empty").iterdir()) == []

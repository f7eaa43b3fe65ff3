"""The checks of a config that need the models, the decoder or this machine (tools/checks.py): one line each,
naming the field, before anything is written; config.py itself knows none of them."""
import pytest

from phalanx import config as C
from phalanx.errors import ConfigError
from phalanx.tools.checks import checked_config


@pytest.mark.parametrize("key,value,needle", [
    ("nproc", "100000", "parallel.nproc='100000': more ranks than this node can usefully run"),
    ("threads_per_rank", "100000", "parallel.threads_per_rank=100000: must be at most"),
    ("stream_workers", "100000", "data.stream_workers=100000: must be at most"),
    ("model.name", "resnt18", "did you mean 'resnet18'"),
    ("data.size", "100000", "data.size=100000: a 100000x100000 image has more pixels than the decoder accepts"),
])
def test_what_this_machine_or_the_models_rule_out_is_one_clear_line(key, value, needle):
    C.build_config(None, [(key, value)])  # the config alone accepts it
    with pytest.raises(ConfigError) as e:
        checked_config(None, [(key, value)])
    assert needle in str(e.value)
    assert "\n" not in str(e.value)


def test_a_good_config_passes_the_checks_unchanged():
    cfg = C.build_config(None, [("nproc", "2")])
    assert checked_config(None, [("nproc", "2")]) == cfg


def _run_with_a_checkpoint(folder, *pairs):
    """A run folder as a training leaves it: config.toml of `pairs`, and one checkpoint that verifies."""
    import torch

    from phalanx.train import checkpoint as ckpt
    folder.mkdir()
    (folder / "config.toml").write_text(C.to_toml(C.build_config(None, list(pairs))))
    ckpt.save(folder / "checkpoints", 4, {"w": torch.zeros(2)}, {}, {"position": {"epoch": 0, "step": 4}})
    return folder


@pytest.mark.parametrize("pairs,needle", [
    ([("model.width", "16")], "written by a run of --model.width 24, this run's 16"),
    ([("model.norm", "none")], "written by a run of --model.norm batch, this run's none"),
    ([("model.name", "mnist_net")], "written by a run of --model.name phalanx_cnn, this run's mnist_net"),
])
def test_a_checkpoint_of_another_model_is_refused_before_any_rank_starts(tmp_path, pairs, needle):
    from phalanx.errors import CheckpointError
    from phalanx.tools.checks import checked_resume
    run = _run_with_a_checkpoint(tmp_path / "run", ("model.width", "24"))
    for how in ([("ckpt.resume", str(run))], [("run_dir", str(run))]):  # --resume, or a rerun in the folder
        with pytest.raises(CheckpointError) as e:
            checked_resume(C.build_config(None, how + pairs))
        assert needle in str(e.value) and "\n" not in str(e.value) and "step-" in str(e.value)
    # the same model resumes; so does another activation, which holds no weights
    checked_resume(C.build_config(None, [("ckpt.resume", str(run)), ("model.width", "24"), ("model.act", "gelu")]))


def test_a_resume_without_a_valid_checkpoint_is_refused_and_a_new_run_dir_is_not(tmp_path):
    from phalanx.errors import CheckpointError
    from phalanx.tools.checks import checked_resume
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="holds no checkpoint"):
        checked_resume(C.build_config(None, [("ckpt.resume", str(tmp_path / "empty"))]))
    checked_resume(C.build_config(None, [("run_dir", str(tmp_path / "new"))]))
    checked_resume(C.build_config(None, [("run_dir", str(tmp_path / "empty"))]))


def test_an_fsdp_shard_size_that_does_not_divide_an_explicit_world_is_refused_before_any_rank_starts():
    with pytest.raises(ConfigError, match=r"shard_size=3: must divide the number of ranks \(2\); choose one of 1, 2"):
        checked_config(None, [("parallel.strategy", "fsdp"), ("parallel.shard_size", "3"), ("nproc", "2")])
    checked_config(None, [("parallel.strategy", "fsdp"), ("parallel.shard_size", "2"), ("nproc", "4")])

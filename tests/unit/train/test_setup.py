"""Run set-up refuses what a run cannot use with one line and no traceback, before training: a resume
that cannot be used (and then changes nothing in the run directory), a run directory that is a file or
read-only, one class, no test images, a global batch larger than the data, a crop larger than the images."""
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from phalanx import config as C
from phalanx.commands import main
from phalanx.errors import ConfigError
from phalanx.train.setup import resolve_run_dir
from tests.conftest import make_idx_dataset

pytestmark = pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")

TINY = ["--nproc", "1", "--epochs", "1", "--global_batch", "16", "--model.width", "8", "--progress", "false",
        "--eval_batch", "64", "--precision", "fp32", "--threads_per_rank", "1", "--model.whiten", "false"]


@pytest.fixture(scope="module")
def idx(tmp_path_factory) -> Path:
    return make_idx_dataset(tmp_path_factory.mktemp("idx") / "idx", 64, 40)


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


def train(capsys, *argv) -> tuple[int, str]:
    """(exit code, error line) of `phalanx train ARGV`: at most one error line, the last on stderr (a store
    being prepared may draw progress bars before it), and no traceback."""
    capsys.readouterr()
    code = main(["train", *TINY, *map(str, argv)])
    err = capsys.readouterr().err
    assert err.count("phalanx: error:") <= 1 and "Traceback" not in err, err
    return code, err.strip().rsplit("\r", 1)[-1].rsplit("\n", 1)[-1]


def files_of(run: Path, skip_logs: bool = False) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*"))
            if p.is_file() and not (skip_logs and p.parent.name == "logs")}


@pytest.fixture(scope="module")
def finished_run(idx, cache, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("runs") / "run"
    assert main(["train", *TINY, "--data", str(idx), "--data.cache_dir", str(cache), "--run_dir", str(run)]) == 0
    assert (run / "config.toml").is_file() and list((run / "checkpoints").glob("step-*"))
    return run


@pytest.mark.parametrize("case", ["another model", "corrupt checkpoint", "no checkpoint"])
def test_a_refused_resume_changes_nothing_in_the_run_directory(finished_run, idx, cache, tmp_path, capsys, case):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run, symlinks=True)
    extra = []
    if case == "another model":  # refused only once the model is built: its rank log tells of the attempt
        extra, needle = ["--model.width", "16"], "weights do not match the model"
    elif case == "corrupt checkpoint":
        with open(next((run / "checkpoints").glob("step-*")) / "model.safetensors", "ab") as f:
            f.write(b"x")
        needle = "no valid checkpoint"
    else:
        shutil.rmtree(run / "checkpoints")
        needle = "holds no checkpoint"
    before = files_of(run)
    code, err = train(capsys, "--data", idx, "--data.cache_dir", cache, "--resume", run, *extra)
    assert code == 1 and needle in err
    assert files_of(run, skip_logs=True) == {k: v for k, v in before.items() if not k.startswith("logs")}
    if case != "another model":  # refused before the run directory is opened: not even a log line
        assert files_of(run) == before


@pytest.mark.parametrize("nproc", ["1", "2"])  # 2: refused by the launcher, before any rank starts
def test_a_resume_from_nowhere_creates_nothing(idx, cache, tmp_path, capsys, nproc):
    code, err = train(capsys, "--data", idx, "--data.cache_dir", cache, "--resume", tmp_path / "nowhere",
                      "--nproc", nproc)
    assert code == 1 and "nowhere: no such run directory or checkpoint" in err
    assert not (tmp_path / "nowhere").exists()


def test_a_refused_resume_into_a_new_run_dir_creates_nothing(finished_run, idx, cache, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run, symlinks=True)
    for c in (run / "checkpoints").glob("step-*"):
        (c / "state.json").write_text("{}")
    code, err = train(capsys, "--data", idx, "--data.cache_dir", cache, "--resume", run, "--run_dir", tmp_path / "new")
    assert code == 1 and "no valid checkpoint" in err
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("key,where,needle", [
    ("out_dir", "file", "{file} is a file, not a folder; choose another --out_dir"),
    ("run_dir", "file/run", "{file} is a file, not a folder; choose another --run_dir"),
    ("out_dir", "read-only/runs", "{ro} is read-only (no new files can be made in it); choose another --out_dir"),
    ("run_dir", "read-only", "{ro} is read-only (no new files can be made in it); choose another --run_dir"),
    ("out_dir", "x" * 300, "File name too long; choose another --out_dir"),
])
def test_a_run_directory_that_cannot_be_written_is_one_line(idx, cache, tmp_path, capsys, monkeypatch, key, where,
                                                           needle):
    file, ro = tmp_path / "file", tmp_path / "read-only"
    file.write_text("mine")
    ro.mkdir()
    real_access = os.access  # root may write anywhere: a read-only folder is simulated for other users
    monkeypatch.setattr(os, "access", lambda p, mode: Path(p) != ro and real_access(p, mode))
    before = sorted(tmp_path.rglob("*"))
    code, err = train(capsys, "--data", idx, "--data.cache_dir", cache, f"--{key}", tmp_path / where)
    assert code == 2 and needle.format(file=file, ro=ro) in err
    assert sorted(tmp_path.rglob("*")) == before and file.read_text() == "mine"


def test_resolve_run_dir_turns_a_failed_mkdir_into_one_line(tmp_path):
    (tmp_path / "file").write_text("mine")
    cfg = C.Config(run_dir=str(tmp_path / "file" / "run"))
    with pytest.raises(ConfigError, match=r"file/run: cannot create it \(Not a directory\); choose another"):
        resolve_run_dir(cfg, SimpleNamespace(is_main=True))


def _folder(root: Path, classes, per_class: int = 6) -> Path:
    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    return root


@pytest.mark.parametrize("case,code,needle", [
    ("one class", 1, "every training image is of one class ('cat'), so any model is 100% accurate and learns "
                     "nothing; give the data 2 or more classes"),
    ("only train/", 1, "'train' looks like a split folder: put the class folders inside {src}/train and add "
                       "{src}/test (or val) beside it"),
    ("one image per class", 1, "no test images to evaluate on (its 'test' split is empty); add a test/ (or val/) "
                               "folder of class folders beside {src}/train, or give every class folder"),
    ("idx without t10k", 1, "no test images to evaluate on (it has only the split(s) train); add "
                            "t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz beside"),
    ("global batch", 2, "global_batch=100 is larger than the 64 training images of {src}; use --global_batch 64"),
    ("crop", 2, "augment.crop_pad=28: too large for the 28x28 images of {src}; use at most 27"),
    ("cutout", 2, "augment.cutout=29: too large for the 28x28 images"),
])
def test_data_a_run_cannot_use_is_one_line_before_training(idx, cache, tmp_path, capsys, case, code, needle):
    extra = []
    if case == "one class":
        src = _folder(tmp_path / "photos", ["cat"])
    elif case == "only train/":
        src = tmp_path / "photos"
        _folder(src / "train", ["cat", "dog"])
    elif case == "one image per class":
        src = _folder(tmp_path / "photos", ["cat", "dog"], per_class=1)
    elif case == "idx without t10k":
        src = make_idx_dataset(tmp_path / "idx", 64, 8)
        for f in src.glob("t10k-*"):
            f.unlink()
    else:
        src = idx
        extra = {"global batch": ["--global_batch", "100"], "crop": ["--augment.crop_pad", "28"],
                 "cutout": ["--augment.cutout", "29"]}[case]
    if src != idx:
        extra += ["--global_batch", "1"]
    got, err = train(capsys, "--data", src, "--data.cache_dir", cache, "--out_dir", tmp_path / "runs", *extra)
    assert got == code and needle.format(src=src) in err
    assert not list((tmp_path / "runs").rglob("*.safetensors")) and not list((tmp_path / "runs").rglob("*.toml"))

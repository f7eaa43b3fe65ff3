"""Run set-up refuses what a run cannot use with one line and no traceback, before training: a resume
that cannot be used (and then changes nothing in the run directory), a run directory that is a file or
read-only, one class, no test images, a global batch larger than the data, a crop larger than the images."""
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from phalanx import config as C
from phalanx.commands import main
from phalanx.errors import ConfigError
from phalanx.paths import LOCK_ENV, RUN_LOCK, RUN_MARKER, RunLock
from phalanx.train.setup import check_run_dir, resolve_run_dir, run_dir_for
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
    """Every file of `run` and its bytes, but the lock (Phalanx's own, naming the latest process that held it)."""
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*"))
            if p.is_file() and p.name != RUN_LOCK and not (skip_logs and p.parent.name == "logs")}


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
    if case == "another model":  # the run's config.toml says which model it trained (tools/checks.checked_resume)
        extra, needle = ["--model.width", "16"], ", this run's 16; resume with the options it was trained with"
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
    assert files_of(run) == before  # refused before the run directory is opened: not even a log line


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
    ("one class", 2, "every training image is of one class ('cat'), so any model is 100% accurate and learns "
                     "nothing; give the data 2 or more classes"),
    ("only train/", 2, "'train' looks like a split folder: put the class folders inside {src}/train and add "
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
    assert not (tmp_path / "runs").exists()  # the run directory made and locked for it is gone again


# ----------------------------------------------------------------------------- whose folder, and one run at a time

def tree(root: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("nproc", ["1", "2"])  # 2: refused by the launcher, before any rank starts
def test_a_folder_that_is_not_a_run_directory_is_never_written_in(idx, cache, tmp_path, capsys, nproc):
    """A folder with the user's config.toml and summary.json: a run would have overwritten both (exit 0)."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.toml").write_text("my config")
    (mine / "summary.json").write_text('{"mine": true}')
    before = tree(tmp_path)
    for flag in ("--run_dir", "--resume"):
        code, err = train(capsys, "--data", idx, "--data.cache_dir", cache, flag, mine, "--nproc", nproc)
        assert code == (2 if flag == "--run_dir" else 1), err
        assert (f"--run_dir {mine}: is not a run directory (it holds 'config.toml' and no {RUN_MARKER})" in err
                if flag == "--run_dir" else "holds no checkpoint" in err), err
    assert tree(tmp_path) == before


def test_a_run_directory_inside_the_data_or_holding_it_is_refused(idx, cache, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(idx, data)
    run = tmp_path / "run"
    run.mkdir()
    (run / RUN_MARKER).write_text("{}")  # a run directory, with the data moved into it
    shutil.copytree(idx, run / "idx")
    before = tree(tmp_path)
    for argv, needle in ((["--data", data, "--run_dir", data / "run"], f"--run_dir {data / 'run'}: lies inside the "
                                                                        f"data {data}"),
                         (["--data", data, "--out_dir", data], f"--out_dir {data}: lies inside the data {data}"),
                         (["--data", run / "idx", "--run_dir", run], f"--run_dir {run}: holds the data {run / 'idx'}")):
        code, err = train(capsys, "--data.cache_dir", cache, *argv)
        assert code == 2 and needle in err and "choose another" in err, err
    assert tree(tmp_path) == before


def test_a_run_of_an_older_phalanx_without_the_marker_resumes(finished_run, idx, cache, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    (run / RUN_MARKER).unlink()
    (run / RUN_LOCK).unlink()
    code, _ = train(capsys, "--data", idx, "--data.cache_dir", cache, "--run_dir", run, "--epochs", "2")
    assert code == 0 and (run / RUN_MARKER).is_file()
    assert "resumed from" in (run / "logs" / "rank-0.log").read_text()


@pytest.mark.parametrize("nproc", ["1", "2"])
def test_a_training_in_a_locked_run_directory_is_refused_naming_the_pid_and_a_rerun_resumes(finished_run, idx, cache,
                                                                                           tmp_path, capsys, nproc):
    from tests.unit.test_paths import hold
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    holder = hold(run)
    try:
        before = files_of(run) | {RUN_LOCK: (run / RUN_LOCK).read_bytes()}
        code, err = train(capsys, "--data", idx, "--data.cache_dir", cache, "--run_dir", run, "--epochs", "2",
                          "--nproc", nproc)
        assert code == 2 and f"--run_dir {run}: another training is running in it (pid {holder.pid} on " in err
        assert "wait for it to end, or choose another --run_dir" in err
        assert files_of(run) | {RUN_LOCK: (run / RUN_LOCK).read_bytes()} == before  # the lock file too
    finally:
        holder.kill()  # SIGKILL: nothing of it runs; the kernel releases its lock
        holder.wait(30)
    code, _ = train(capsys, "--data", idx, "--data.cache_dir", cache, "--run_dir", run, "--epochs", "2",
                    "--nproc", nproc)
    assert code == 0 and "resumed from" in (run / "logs" / "rank-0.log").read_text()


def test_two_trainings_in_one_run_directory_one_is_refused_and_the_rerun_resumes(idx, cache, tmp_path, capsys):
    """The issue's case: a second `phalanx train --run_dir SAME` while the first trains; then, after the first is
    preempted (SIGTERM: checkpoint, exit 0), the same command again takes the lock and resumes."""
    import signal
    import subprocess
    import sys
    import time
    run = tmp_path / "run"
    argv = ["train", *TINY, "--data", idx, "--data.cache_dir", cache, "--run_dir", run, "--epochs", "2000",
            "--eval_every", "1000", "--ckpt.at_epoch_end", "false"]
    first = subprocess.Popen([sys.executable, "-m", "phalanx", *map(str, argv)], stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while not (run / "metrics.jsonl").is_file() and first.poll() is None and time.time() < deadline:
            time.sleep(0.2)  # training: its first step is logged
        assert (run / RUN_LOCK).read_text().startswith(f"pid {first.pid} on ")
        code, err = train(capsys, "--data", idx, "--data.cache_dir", cache, "--run_dir", run)
        assert code == 2 and f"another training is running in it (pid {first.pid} on " in err, err
        first.send_signal(signal.SIGTERM)
        assert first.wait(120) == 0, first.stderr.read()
    finally:
        first.kill()
    assert list((run / "checkpoints").glob("step-*"))
    code, _ = train(capsys, *argv[len(TINY) + 1:], "--max_steps", "1")  # the same command, trained no further
    assert code == 0 and "resumed from" in (run / "logs" / "rank-0.log").read_text()


def test_the_ranks_a_launcher_starts_are_not_refused_by_its_lock(idx, cache, tmp_path, capsys):
    run = tmp_path / "run"
    code, err = train(capsys, "--data", idx, "--data.cache_dir", cache, "--run_dir", run, "--nproc", "2")
    assert code == 0, err
    assert (run / RUN_LOCK).read_text().startswith(f"pid {os.getpid()} on ")  # the launcher held it
    assert (run / "logs" / "rank-1.log").is_file() and (run / "model.safetensors").is_file()


def test_one_rank_trains_in_the_folder_its_launcher_chose_and_locked(idx, cache, tmp_path, capsys):
    code, err = train(capsys, "--data", idx, "--data.cache_dir", cache, "--out_dir", tmp_path / "runs")
    assert code == 0, err
    (run,) = (tmp_path / "runs").iterdir()
    assert (run / RUN_LOCK).read_text().startswith(f"pid {os.getpid()} on ") and (run / RUN_MARKER).is_file()
    assert (run / "model.safetensors").is_file() and LOCK_ENV not in os.environ
    assert C.tomllib.loads((run / "config.toml").read_text())["run_dir"] == ""  # a recipe for a new run, as before


def test_rank_0_of_a_users_own_torchrun_locks_the_run_directory(tmp_path, monkeypatch):
    from phalanx.train import setup
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")
    monkeypatch.delenv(LOCK_ENV, raising=False)
    run = tmp_path / "run"
    try:
        assert resolve_run_dir(C.Config(run_dir=str(run)), SimpleNamespace(is_main=True)) == run
        assert (run / RUN_LOCK).read_text().startswith(f"pid {os.getpid()} on ")
        with pytest.raises(ConfigError, match="another training is running in it"):
            RunLock.take(run)  # another open of the lock file: refused as another process would be
    finally:
        while setup._TORCHRUN_LOCK:
            setup._TORCHRUN_LOCK.pop().release()
    monkeypatch.setenv(LOCK_ENV, str(run))  # a rank `phalanx train` started: its launcher holds the lock
    resolve_run_dir(C.Config(run_dir=str(run)), SimpleNamespace(is_main=True))
    assert not setup._TORCHRUN_LOCK


def test_runs_started_in_the_same_second_get_their_own_run_directories(tmp_path, monkeypatch):
    monkeypatch.setattr(C.time, "strftime", lambda fmt, *a: "20260101-000000")
    cfg = C.Config(out_dir=str(tmp_path))
    first = run_dir_for(cfg)
    assert first == tmp_path / "20260101-000000-phalanx_cnn"
    first.mkdir()
    assert run_dir_for(cfg) == tmp_path / "20260101-000000-phalanx_cnn-2"
    assert run_dir_for(C.Config(ckpt=C.CheckpointConfig(resume=str(tmp_path / "r" / "checkpoints" / "step-8")))) \
        == tmp_path / "r"


PLACES = ["a", "a/b", "a/b/c", "a/x", "alias", "alias/b", "d", "d/e", "new", "a/new"]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.sampled_from(PLACES), st.sampled_from(PLACES), st.sampled_from(["run_dir", "out_dir"]))
@example("a/b", "a/b/c", "run_dir")  # the run inside the data
@example("alias/b", "a", "run_dir")  # the data inside the run, seen through a link
@example("a", "a/new", "out_dir")
def test_a_run_directory_and_the_data_never_overlap(tmp_path, data, where, key):
    """Any data folder and any --run_dir or --out_dir of a tree with a link (`alias` -> `a`): refused when the run
    would lie inside the data (or, for --run_dir, hold it), and never for the data otherwise."""
    for d in ("a/b/c", "a/x", "d/e"):
        (tmp_path / d).mkdir(parents=True, exist_ok=True)
    if not (tmp_path / "alias").is_symlink():
        (tmp_path / "alias").symlink_to("a")
    dp, wp = (tmp_path / data).resolve(), (tmp_path / where).resolve()
    inside = wp == dp or dp in wp.parents
    holds = dp == wp or wp in dp.parents
    if not (tmp_path / data).exists():
        return  # no such data: nothing to compare with
    try:
        check_run_dir(C.Config(**{key: str(tmp_path / where)}, data=C.DataConfig(path=str(tmp_path / data))))
        why = ""
    except ConfigError as e:
        why = str(e)
        assert "\n" not in why and why.startswith(f"--{key} {tmp_path / where}: "), why
    expected = inside or (key == "run_dir" and holds)
    assert ("the data" in why) <= expected, why  # refused for the data only where they overlap
    if expected:
        assert "the data" in why or "is not a run directory" in why, why  # refused, for either reason

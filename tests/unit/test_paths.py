"""src/phalanx/paths.py: the one path checker (a name too long, a link loop, a file where a folder must be, /proc
and /sys, a read-only folder, a folder where a file goes: one ConfigError line naming the path, never an OSError),
whether one path lies inside another, and the run directory's marker and lock (held while a training runs,
released by the kernel on any exit of its holder)."""
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from phalanx import paths as P
from phalanx.errors import ConfigError


def refusal(fn, *args, **kw) -> str:
    """The one-line message of the ConfigError `fn` raises (any other exception fails the test)."""
    with pytest.raises(ConfigError) as e:
        fn(*args, **kw)
    msg = str(e.value)
    assert "\n" not in msg and "\r" not in msg, msg
    return msg


@pytest.fixture
def tree(tmp_path) -> Path:
    """A loop (`loop` -> itself), a pair of links leading to each other, a dangling link, a file, a folder."""
    (tmp_path / "loop").symlink_to("loop")
    (tmp_path / "ping").symlink_to("pong")
    (tmp_path / "pong").symlink_to("ping")
    (tmp_path / "dangling").symlink_to("nowhere")
    (tmp_path / "file").write_text("mine")
    (tmp_path / "folder").mkdir()
    return tmp_path


@pytest.mark.parametrize("rel,needle", [
    ("x" * 256, "a name of 256 bytes, more than the 255 a file system allows: File name too long"),
    ("ok/" + "é" * 128, "a name of 256 bytes"),  # 128 characters, 256 bytes in UTF-8
    ("loop", "it is a symbolic link loop"),
    ("loop/x/y", "loop is a symbolic link loop"),
    ("ping/x", "ping is a symbolic link loop"),
    ("dangling/x", "dangling is a symbolic link to nowhere, which does not exist"),
    ("file/x", "file is a file, not a folder"),
    ("a\0b", "holds a NUL character"),
])
def test_a_path_that_cannot_be_looked_up_is_one_line_naming_it(tree, rel, needle):
    msg = refusal(P.check_path, str(tree / rel), "--data")
    assert needle in msg and msg.startswith(f"--data {P._shown(str(tree / rel))}:"), msg


@pytest.mark.parametrize("path", ["/proc/self/status", "/proc", "/sys/kernel", "/proc/nonexistent/out"])
def test_a_path_in_the_kernels_proc_or_sys_is_refused(path):
    assert "the kernel's view of the running system, not storage" in refusal(P.check_path, path, "--out")


def test_paths_that_can_be_looked_up_pass_whether_they_exist_or_not(tree):
    for rel in ("file", "folder", "folder/new/deeper", "x" * 255, "é" * 127):
        assert P.check_path(tree / rel) == tree / rel
    assert P.check_path("~/x") == Path.home() / "x"


def test_a_destination_folder_where_a_file_goes_or_a_file_where_a_folder_goes_is_refused(tree):
    assert "is a folder, and a file is to be written here" in refusal(P.check_destination, tree / "folder", "--out")
    assert f"{tree / 'file'} is a file, not a folder" in refusal(P.check_destination, tree / "file", "--out",
                                                                  folder=True)
    assert f"{tree / 'file'} is a file, not a folder" in refusal(P.check_destination, tree / "file" / "x", "--out")
    assert P.check_destination(tree / "folder" / "new" / "model.pt") == tree / "folder" / "new" / "model.pt"
    assert P.check_destination(tree / "file") == tree / "file"  # an existing file is the caller's question


def test_a_read_only_destination_is_one_line_naming_the_folder(tree, monkeypatch):
    ro = tree / "folder"
    real_access = os.access  # root may write anywhere: a read-only folder is simulated for other users
    monkeypatch.setattr(os, "access", lambda p, mode: Path(p) != ro and real_access(p, mode))
    for dest, folder in ((ro / "model.onnx", False), (ro / "a" / "b", True), (ro, True)):
        msg = refusal(P.check_destination, dest, "--out", "choose another --out", folder=folder)
        assert msg.endswith(f"{ro} is read-only (no new files can be made in it); choose another --out, one you "
                            f"can write in"), msg


def test_a_file_system_mounted_read_only_is_read_only_for_root_too(tree, monkeypatch):
    real_statvfs = os.statvfs
    monkeypatch.setattr(os, "statvfs", lambda p: SimpleNamespace(f_flag=real_statvfs(p).f_flag | os.ST_RDONLY)
                        if Path(p) == tree / "folder" else real_statvfs(p))
    assert not P.writable(tree / "folder") and P.writable(tree)
    assert "is read-only" in refusal(P.check_destination, tree / "folder" / "x", "--out")


def test_inside_and_overlap_follow_links(tree):
    (tree / "folder" / "sub").mkdir()
    (tree / "alias").symlink_to("folder")
    assert P.inside(tree / "alias" / "sub", tree / "folder") and P.inside(tree / "folder", tree / "alias")
    assert not P.inside(tree / "folder", tree / "folder" / "sub")
    assert P.overlap(tree / "folder", tree / "alias" / "sub") and P.overlap(tree / "alias" / "sub", tree / "folder")
    assert not P.overlap(tree / "folder", tree / "file") and not P.inside(tree / "folderx", tree / "folder")


# ----------------------------------------------------------------------------- hypothesis: any path

NAMES = st.one_of(st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="/\0"), min_size=1,
                          max_size=90).filter(lambda s: s not in (".", "..")),
                  st.integers(200, 300).map(lambda n: "n" * n), st.integers(60, 100).map(lambda n: "字" * n),
                  st.sampled_from(["loop", "ping", "dangling", "file", "folder", "..", "."]))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(NAMES, min_size=1, max_size=4), st.booleans(), st.booleans())
@example(["x" * 256], False, False)
@example(["loop", "a"], True, False)
@example(["folder", "字" * 86], True, True)
@example(["file", "x"], False, True)
def test_any_path_is_checked_or_one_config_error_line_never_an_oserror(tree, monkeypatch, names, folder, read_only):
    """Long names (ASCII and multi-byte), loops, dangling links, files on the way, read-only folders: each path is
    either usable (every name fits, nothing on the way loops) or refused with one line naming it."""
    path = tree.joinpath(*names)
    with monkeypatch.context() as m:
        if read_only:
            real_access = os.access
            m.setattr(os, "access", lambda p, mode: Path(p) != tree / "folder" and real_access(p, mode))
        for check in (lambda: P.check_path(path, "--x"), lambda: P.check_destination(path, "--x", folder=folder)):
            try:
                got = check()
            except ConfigError as e:
                msg = str(e)
                assert "\n" not in msg and msg.startswith(f"--x {P._shown(str(path))}: "), msg
                continue
            assert got == path
            assert all(len(os.fsencode(n)) <= P.NAME_MAX for n in names)
            if os.path.lexists(path):
                os.stat(path)  # a path that passed can be looked up: no OSError


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.sampled_from(["a", "b", "alias", ".", ".."]), min_size=0, max_size=4),
       st.lists(st.sampled_from(["a", "b", "alias", "."]), min_size=0, max_size=3))
def test_inside_is_the_order_of_the_resolved_paths(tree, outer, rest):
    """`inside(outer/rest, outer)` for any `rest` without `..`, through links; and `overlap` is symmetric."""
    (tree / "a" / "b").mkdir(parents=True, exist_ok=True)
    if not (tree / "alias").exists():
        (tree / "alias").symlink_to("a")
    o = tree.joinpath(*outer)
    i = o.joinpath(*rest)
    assert P.inside(i, o)
    assert P.overlap(i, o) and P.overlap(o, i)
    assert P.inside(o, i) == (P.real(o) == P.real(i))


# ----------------------------------------------------------------------------- the run directory

HOLD = """import sys, time
from pathlib import Path
from phalanx.paths import RunLock
RunLock.take(Path(sys.argv[1]))
print("held", flush=True)
time.sleep(120)
"""


def hold(run_dir: Path) -> subprocess.Popen:
    """Another process holding `run_dir`'s lock (until it is killed)."""
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline() == "held\n"
    return p


def test_a_run_directory_is_locked_by_one_process_and_a_killed_holder_leaves_no_stale_lock(tmp_path):
    run = tmp_path / "run"
    holder = hold(run)
    try:
        assert (run / P.RUN_MARKER).is_file()
        msg = refusal(P.RunLock.take, run)
        assert f"another training is running in it (pid {holder.pid} on " in msg and "choose another --run_dir" \
            in msg, msg
    finally:
        holder.send_signal(signal.SIGKILL)  # no clean-up runs: the kernel releases the lock
        holder.wait(30)
    with P.RunLock.take(run) as lock:
        assert (run / P.RUN_LOCK).read_text().startswith(f"pid {os.getpid()} on ")
        assert lock.run_dir == run


def test_a_lock_given_back_removes_a_folder_it_made_that_nothing_else_came_into(tmp_path):
    run = tmp_path / "runs" / "a" / "run"
    with P.RunLock.take(run):
        assert sorted(p.name for p in run.iterdir()) == [P.RUN_MARKER, P.RUN_LOCK]
    assert not (tmp_path / "runs").exists()  # every folder it made, and nothing else
    with P.RunLock.take(run):
        (run / "metrics.jsonl").write_text("{}\n")
    assert sorted(p.name for p in run.iterdir()) == ["metrics.jsonl", P.RUN_MARKER, P.RUN_LOCK]
    (tmp_path / "mine").mkdir()
    with P.RunLock.take(tmp_path / "mine"):
        pass
    assert (tmp_path / "mine" / P.RUN_MARKER).is_file()  # the user's empty folder is kept, now a run directory


@pytest.mark.parametrize("legacy", [None, "metrics.jsonl", "checkpoints", "logs/rank-0.log"])
def test_a_folder_of_the_users_is_no_run_directory_but_an_older_phalanx_run_is(tmp_path, legacy):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.toml").write_text("my config")
    (mine / "summary.json").write_text("{}")
    if legacy is None:
        msg = refusal(P.RunLock.take, mine)
        assert f"--run_dir {mine}: is not a run directory (it holds 'config.toml' and no {P.RUN_MARKER})" in msg
        assert sorted(p.name for p in mine.iterdir()) == ["config.toml", "summary.json"]
        return
    (mine / legacy).parent.mkdir(parents=True, exist_ok=True)
    (mine / legacy).mkdir() if legacy == "checkpoints" else (mine / legacy).write_text("")
    assert P.is_run_dir(mine)
    with P.RunLock.take(mine):
        assert (mine / P.RUN_MARKER).is_file()


def test_the_launchers_environment_says_it_holds_the_lock_and_is_given_back(tmp_path, monkeypatch):
    monkeypatch.delenv(P.LOCK_ENV, raising=False)
    with P.locked_run_dir(tmp_path / "run", "--run_dir") as lock:
        assert P.started_by_launcher() and P.launcher_run_dir() == tmp_path / "run"
        assert lock is not None
    assert not P.started_by_launcher()
    with P.locked_run_dir(tmp_path / "shared", "--run_dir", hold=False) as lock:  # several nodes: nobody holds it
        assert lock is None and P.started_by_launcher()
        with P.RunLock.take(tmp_path / "shared"):
            pass
    with P.RunLock.take(tmp_path / "run"):  # given back on the way out
        pass

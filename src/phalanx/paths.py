"""The paths a user gives, checked before they are used, and what Phalanx may write where.

- `check_path`: the one checker every path argument goes through (`--data`, `--resume`, `--recipe`, `eval`'s
  RUN_DIR, `export --out`, ...): a name longer than a file system allows, a symbolic link loop, a file where a
  folder must be, a folder that cannot be entered, a path in the kernel's /proc or /sys: one ConfigError line
  naming the path and the fix, never an OSError traceback from deep inside a command.
- `check_destination`: the same, for a file or folder Phalanx is about to write: not a folder where a file goes
  (or the reverse), in a folder this process can write in.
- `inside` / `overlap`: whether one path is, or lies inside, another (after links): a command never writes into
  what it reads, or replaces a folder that holds what it reads.
- The run directory: a marker that says Phalanx made it (`RUN_MARKER`), the test of whether a folder is a run
  directory (a folder holding anything else is the user's, and no run writes in it), and the lock a training
  holds on it while it runs (`RunLock`, an flock the kernel releases on any exit: a stale lock cannot block).

Imports nothing of Phalanx but errors.py: every layer above may use it.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from phalanx.errors import ConfigError

NAME_MAX = 255
"""Bytes in one file or folder name: the limit of Linux's file systems (ext4, xfs, btrfs, tmpfs, NFS)."""

KERNEL_FILE_SYSTEMS = ("/proc", "/sys")
"""Not storage: files there are made by the kernel, and what is written to them changes the running system."""

RUN_MARKER = "phalanx-run.json"
"""In a run directory: written by the training that made the folder; a folder with it is Phalanx's to write in."""

RUN_LOCK = "train.lock"
"""In a run directory: locked (flock) by the training running there, and naming its pid and host."""

LOCK_ENV = "PHALANX_RUN_LOCK"
"""Set by `phalanx train` for the ranks it starts (in its own process for one rank): the run directory it chose,
whose lock it holds (or that several nodes share: no node's launcher holds it then). A rank started by a launcher
never takes the lock itself."""

LEGACY_RUN_FILES = ("metrics.jsonl", "checkpoints", "logs/rank-0.log")
"""What a run directory of a Phalanx older than `RUN_MARKER` always holds (one of them): it stays resumable."""


def _shown(path: str) -> str:
    """`path` for a one-line message: names over NAME_MAX bytes shortened (their length said instead), control
    characters escaped (a newline would split the line)."""
    parts = []
    for part in path.split(os.sep):
        n = len(os.fsencode(part))
        parts.append(part if n <= NAME_MAX else f"{part[:24]}...({n} bytes)")
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in os.sep.join(parts))


def _refuse(where: str, problem: str, fix: str) -> ConfigError:
    return ConfigError(f"{where}: {problem}; {fix}")


def check_path(path: str | os.PathLike, where: str = "", fix: str = "") -> Path:
    """`path` (with `~` expanded) when the file system can look it up; else ConfigError, one line naming it, the
    problem and `fix` (default: one fix per problem). `where` names the argument: `--data`, `--out`; the path
    itself is always named. Whether it exists is the caller's question: a path that does not exist passes."""
    raw = os.fspath(path)
    shown = _shown(raw)
    where = f"{where} {shown}" if where else shown
    if "\0" in raw:
        raise _refuse(where, "holds a NUL character, which no file name can", fix or "retype the path")
    p = Path(os.path.expanduser(raw))
    for part in p.parts:
        n = len(os.fsencode(part))
        if n > NAME_MAX:
            raise _refuse(where, f"a name of {n} bytes, more than the {NAME_MAX} a file system allows: File name "
                                 f"too long", fix or "use a shorter name")
    try:
        real = os.path.realpath(p)
    except (OSError, ValueError):  # realpath of a loop returns the path; anything else: the lookup below says it
        real = os.path.abspath(p)
    kernel = next((k for k in KERNEL_FILE_SYSTEMS if real == k or real.startswith(k + os.sep)), None)
    if kernel is not None:
        raise _refuse(where, f"{_shown(real)} is in {kernel}, the kernel's view of the running system, not storage",
                      fix or "choose a path on a disk")
    try:
        os.stat(p)
    except FileNotFoundError:
        _check_prefixes(p, where, fix)  # a missing name: its folders must still be reachable
    except OSError as e:
        _check_prefixes(p, where, fix)
        raise _refuse(where, e.strerror or str(e), fix or "check the path") from None
    return p


def _check_prefixes(p: Path, where: str, fix: str) -> None:
    """The first folder on the way to `p` that cannot be looked into: a loop, a file, no permission."""
    def subject(prefix: Path) -> str:  # the path itself is named before the message already
        return "it" if prefix == p else _shown(str(prefix))

    absolute = p.is_absolute()
    prefix = Path(p.parts[0]) if absolute else Path()
    for part in p.parts[1:] if absolute else p.parts:
        prefix = prefix / part
        try:
            os.stat(prefix)
        except FileNotFoundError:
            if os.path.islink(prefix):
                raise _refuse(where, f"{subject(prefix)} is a symbolic link to {_shown(os.readlink(prefix))}, which does "
                                     f"not exist", fix or "fix or remove the link") from None
            return  # the rest does not exist yet
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise _refuse(where, f"{subject(prefix)} is a symbolic link loop (it leads back to itself)",
                              fix or "fix or remove the link") from None
            if e.errno == errno.EACCES:
                raise _refuse(where, f"{_shown(str(prefix.parent))} cannot be looked into (Permission denied)",
                              fix or "choose a path this user can reach") from None
            raise _refuse(where, f"{_shown(str(prefix))}: {e.strerror or e}", fix or "check the path") from None
        if prefix != p and not os.path.isdir(prefix):
            raise _refuse(where, f"{_shown(str(prefix))} is a file, not a folder", fix or "check the path")


def check_destination(path: str | os.PathLike, where: str = "", fix: str = "", folder: bool = False) -> Path:
    """`check_path`, then what writing a file (or, `folder`, a folder) at `path` needs: not a folder where a file
    goes, not a file where a folder goes, and the nearest existing folder on the way one this process can make
    files in (its write permission, and a file system not mounted read-only). ConfigError otherwise."""
    p = check_path(path, where, fix)
    where = f"{where} {_shown(os.fspath(path))}" if where else _shown(os.fspath(path))
    if p.is_dir() and not folder:
        raise _refuse(where, "is a folder, and a file is to be written here",
                      fix or f"give a file name, e.g. {p / 'NAME'}")
    if p.exists() and not p.is_dir() and folder:
        raise _refuse(where, f"{_shown(str(p))} is a file, not a folder", fix or "choose another folder")
    probe = p if (folder and p.is_dir()) else p.parent
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if not probe.is_dir():
        raise _refuse(where, f"{_shown(str(probe))} is a file, not a folder", fix or "choose another path")
    if not writable(probe) or (p.exists() and not folder and not writable(p)):
        ro = probe if not writable(probe) else p
        raise _refuse(where, f"{_shown(str(ro))} is read-only (no new files can be made in it)",
                      (fix + ", one you can write in") if fix else "choose a folder you can write in")
    return p


def writable(path: Path) -> bool:
    """This process may write in `path`: its permission bits (os.access) and a file system not mounted
    read-only (which root's permission does not override)."""
    try:
        if os.statvfs(path).f_flag & os.ST_RDONLY:
            return False
    except OSError:
        return False
    return os.access(path, os.W_OK | (os.X_OK if os.path.isdir(path) else 0))


def real(path: str | os.PathLike) -> Path:
    """The absolute path with every link resolved (as far as it exists)."""
    return Path(os.path.realpath(os.path.expanduser(os.fspath(path))))


def inside(inner: str | os.PathLike, outer: str | os.PathLike) -> bool:
    """`inner` is `outer` or lies inside it, after links are resolved."""
    i, o = real(inner), real(outer)
    return i == o or o in i.parents


def overlap(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """One of `a` and `b` is, or lies inside, the other."""
    return inside(a, b) or inside(b, a)


# ----------------------------------------------------------------------------- the run directory

def is_run_dir(path: Path) -> bool:
    """`path` is a run directory: it holds Phalanx's marker, or what an older Phalanx's runs always hold."""
    return (path / RUN_MARKER).is_file() or any((path / name).exists() for name in LEGACY_RUN_FILES)


def foreign_entry(path: Path) -> Path | None:
    """Something in the folder `path` that makes it the user's rather than a run directory (None: `path` does
    not exist, is empty, holds only a lock a run left, or is a run directory)."""
    if not path.is_dir() or is_run_dir(path):
        return None
    return next((e for e in sorted(path.iterdir()) if e.name != RUN_LOCK), None)


def check_run_dir_is_ours(run_dir: Path, where: str, fix: str) -> None:
    """ConfigError when `run_dir` is a folder of the user's: a run would write config.toml, summary.json,
    metrics.jsonl and logs/ into it, over files of the same names."""
    entry = foreign_entry(run_dir)
    if entry is not None:
        raise _refuse(f"{where} {run_dir}", f"is not a run directory (it holds {entry.name!r} and no {RUN_MARKER}), "
                                            f"and a run writes config.toml, summary.json and logs/ into its folder",
                      fix)


class RunLock:
    """The lock of a run directory, held while a training runs in it: `RUN_DIR/train.lock`, flock'ed and naming
    the holder's pid and host. The kernel releases it when the holding process exits in any way (a crash, a
    SIGKILL, a preemption), so a lock is never stale; forked ranks inherit it with the open file. Taking it also
    marks a new folder as a run directory (`RUN_MARKER`)."""

    def __init__(self, run_dir: Path, fd: int, made: list[Path]):
        self.run_dir, self._fd = run_dir, fd
        self.made = made
        """The folders `take` created, outermost first: removed again by `release` if nothing but the lock and
        the marker came into them (a run refused before it wrote anything leaves nothing behind)."""

    @classmethod
    def take(cls, run_dir: Path, where: str = "--run_dir") -> "RunLock":
        """Make `run_dir` (and the folders above it), lock it and mark it; ConfigError naming the pid that holds
        it when another process does, or when it is a folder of the user's."""
        import fcntl  # POSIX only: the launcher runs on Linux (and macOS)

        fix = f"choose another {where}"
        check_run_dir_is_ours(run_dir, where, f"{fix} (a new or empty folder, or a run directory to resume)")
        made = [d for d in (*reversed(run_dir.parents), run_dir) if not d.exists()]
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(run_dir / RUN_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise _refuse(f"{where} {run_dir}", f"cannot create it ({e.strerror or e})", fix) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = _read_holder(fd)
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise _refuse(f"{where} {run_dir}", f"cannot lock {RUN_LOCK} ({e.strerror or e})", fix) from None
            raise _refuse(f"{where} {run_dir}", f"another training is running in it ({holder})",
                          f"wait for it to end, or {fix}") from None
        lock = cls(run_dir, fd, made)
        try:
            text = f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
            os.ftruncate(fd, 0)
            os.pwrite(fd, text.encode(), 0)
            if not (run_dir / RUN_MARKER).exists():
                (run_dir / RUN_MARKER).write_text(json.dumps(
                    {"made_by": "phalanx train", "created": time.strftime("%Y-%m-%dT%H:%M:%S")}) + "\n")
        except OSError as e:
            lock.release()
            raise _refuse(f"{where} {run_dir}", f"cannot write in it ({e.strerror or e})", fix) from None
        return lock

    def release(self) -> None:
        """Unlock (closing the file releases the flock). A folder `take` made that holds nothing else than the
        lock and the marker is removed first, while still locked: a run that never started leaves nothing."""
        if self._fd < 0:
            return
        if self.made and {e.name for e in self.run_dir.iterdir()} <= {RUN_LOCK, RUN_MARKER}:
            with contextlib.suppress(OSError):  # only ever our two files, and folders left empty
                for name in (RUN_MARKER, RUN_LOCK):
                    (self.run_dir / name).unlink(missing_ok=True)
                for d in reversed(self.made):
                    d.rmdir()
        os.close(self._fd)
        self._fd = -1

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


@contextlib.contextmanager
def locked_run_dir(run_dir: Path, where: str = "--run_dir", hold: bool = True) -> Iterator[RunLock | None]:
    """`phalanx train`'s hold on its run directory while its ranks run: the lock (`hold`; a run over several nodes
    sharing a folder has no one launcher to hold it) and LOCK_ENV for the ranks, both given back on the way out."""
    lock = RunLock.take(run_dir, where) if hold else None
    before = os.environ.get(LOCK_ENV)
    os.environ[LOCK_ENV] = str(run_dir)
    try:
        yield lock
    finally:
        if before is None:
            os.environ.pop(LOCK_ENV, None)
        else:
            os.environ[LOCK_ENV] = before
        if lock is not None:
            lock.release()


def started_by_launcher() -> bool:
    """This process is a rank that `phalanx train` started: its launcher decides about the run directory's lock."""
    return LOCK_ENV in os.environ


def launcher_run_dir() -> Path | None:
    """The run directory `phalanx train` chose (and locked) for the ranks it started, or None."""
    return Path(os.environ[LOCK_ENV]) if os.environ.get(LOCK_ENV) else None


def _read_holder(fd: int) -> str:
    """What the lock file says of the process holding it: `pid N on HOST since TIME`."""
    try:
        text = os.pread(fd, 200, 0).decode(errors="replace").strip().splitlines()
    except OSError:
        text = []
    line = text[0] if text else ""
    if not (line.startswith("pid ") and line.isprintable()):
        return "its pid is not written yet"
    pid, host = line.split()[1], line.split()[3] if len(line.split()) > 3 else ""
    if host == socket.gethostname() and pid.isdecimal() and not process_alive(int(pid)):
        # The lock outlives its taker only through a process that inherited it (a forked rank or worker).
        return f"{line}, which has exited: a process it started still holds the lock"
    return line


def process_alive(pid: int) -> bool:
    """A process of this pid runs on this host (ours or another user's)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True

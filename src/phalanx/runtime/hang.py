"""Where a stalled rank stood: a record of the last collective each rank entered, and its Python stacks on request.

When a collective times out, the ranks that waited for it name the rank that did not check in
(train/loop.stop_for_peer_failure). To say where that rank stood:

- each rank keeps `logs/rank-K.where`, a small file it rewrites in place at each collective it enters (through a
  shared memory map: no system call), holding its pid, host, the collective's name and sequence number and what
  the rank was doing (`DistEnv.phase`); the other ranks of its node can read it even while the rank is frozen;
- each rank has faulthandler write every thread's Python stack into its `logs/rank-K.log` on SIGUSR2. The dump
  is written by faulthandler's C signal handler, so it comes even while the rank is stuck in C code holding the
  GIL; when the interpreter next runs, the rank adds its record below it;
- a rank whose collective timed out writes its own stacks (the traceback of the collective that timed out, then
  every thread) and its record into its log (`write_own_stacks`), sends SIGUSR2 to each silent rank on its node,
  waits up to DUMP_WAIT_S for the dumps and names the innermost Phalanx frame (file:line) of each stalled rank's
  main thread (`ask_stacks`, `where`). A rank whose process is stopped (SIGSTOP), gone, in the kernel's
  uninterruptible sleep, on another node, or that writes nothing in time is named as not answering;
- a fatal signal (SIGSEGV, SIGABRT: NCCL's watchdog aborts a rank whose collective timed out) writes the rank's
  stacks into its log too (faulthandler.enable).

`kill -USR2 PID` gives the same dump of a live run (its log says where each thread is).
"""
from __future__ import annotations

import contextlib
import faulthandler
import mmap
import os
import re
import signal
import socket
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

SIGNAL = signal.SIGUSR2
"""The signal that asks a rank for its stacks (SIGUSR1 is SLURM's preemption notice, turned into SIGTERM)."""

RECORD_BYTES = 1024
"""Size of a rank's record file; its last byte is the flag a peer sets before asking (see `ask_stacks`)."""

DUMP_WAIT_S = 3.0
"""How long a rank that timed out waits for a stalled peer's stacks to appear in the peer's log."""

_SETTLE_S = 0.25  # a dump is complete when the log has grown and then not changed for this long
_ASKED = ord("!")
_PKG = Path(__file__).resolve().parents[1]  # .../phalanx


@dataclass
class _Armed:
    rank: int
    env: object  # DistEnv (its `phase`); runtime/dist imports this module, not the other way round
    log: object  # the rank's log, opened for appending: faulthandler writes into its descriptor
    record: mmap.mmap
    record_path: Path
    previous: object = None
    fatal_was_on: bool = False
    seq: int = 0
    collective: str = ""
    host: str = field(default_factory=socket.gethostname)
    started: str = field(default_factory=lambda: process_start(os.getpid()))

    def write_record(self) -> None:
        """pid, its start, host, rank, seq, time, collective, phase: tab-separated, then a NUL (microseconds)."""
        phase = str(getattr(self.env, "phase", "")).replace("\t", " ")[:300]
        text = (f"{os.getpid()}\t{self.started}\t{self.host}\t{self.rank}\t{self.seq}\t{time.time():.3f}\t"
                f"{self.collective}\t{phase}")
        data = text.encode()[:RECORD_BYTES - 2]
        self.record[:len(data) + 1] = data + b"\0"

    def note(self, line: str, level: str = "ERROR") -> None:
        """One line into the rank's log, in its format (`os.write`: safe inside a signal handler)."""
        now = time.time()
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now)) + f",{int(now * 1000) % 1000:03d}"
        with contextlib.suppress(OSError):
            os.write(self.log.fileno(), f"{stamp} rank{self.rank} {level} {line}\n".encode())


_armed: _Armed | None = None


def arm(env, logs: Path) -> None:
    """Keep this rank's record in `logs/rank-K.where` and dump its stacks into `logs/rank-K.log` on SIGUSR2.
    Call once the log exists, from the main thread; `disarm` undoes it."""
    global _armed
    disarm()
    rank = int(getattr(env, "rank", 0))
    path = Path(logs) / f"rank-{rank}.where"
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.ftruncate(fd, RECORD_BYTES)
            record = mmap.mmap(fd, RECORD_BYTES)
        finally:
            os.close(fd)
        log = open(Path(logs) / f"rank-{rank}.log", "ab", buffering=0)  # noqa: SIM115 (closed by disarm)
    except (OSError, ValueError):  # a read-only or odd run directory: no diagnosis, never a failed run
        return
    a = _Armed(rank, env, log, record, path)
    try:
        # Python's handler first, then faulthandler's, which chains to it: the dump is written at once from C,
        # the record below it when the interpreter next runs.
        a.previous = signal.signal(SIGNAL, _after_dump)
        faulthandler.register(SIGNAL, file=log, all_threads=True, chain=True)
        # A fatal signal too: NCCL's watchdog aborts (SIGABRT) a rank whose collective timed out, before Python
        # could say anything; its stacks are then in its log beside the flight recorder's dump.
        a.fatal_was_on = faulthandler.is_enabled()
        faulthandler.enable(file=log, all_threads=True)
    except (ValueError, OSError, RuntimeError):  # not the main thread (an embedding application)
        record.close()
        log.close()
        return
    _armed = a
    a.write_record()


def disarm() -> None:
    """Stop answering SIGUSR2 with a dump and remove this rank's record (a run that ended)."""
    global _armed
    a, _armed = _armed, None
    if a is None:
        return
    with contextlib.suppress(Exception):
        faulthandler.unregister(SIGNAL)
        signal.signal(SIGNAL, a.previous if a.previous is not None else signal.SIG_DFL)
    with contextlib.suppress(Exception):
        faulthandler.disable()
        if a.fatal_was_on:  # PYTHONFAULTHANDLER, pytest: back to the standard error
            faulthandler.enable(file=sys.__stderr__, all_threads=True)
    with contextlib.suppress(Exception):
        a.record.close()
        a.log.close()
    with contextlib.suppress(OSError):
        a.record_path.unlink()


def entered(collective: str) -> None:
    """This rank enters `collective` (every rank calls it at the same places, so sequence numbers compare)."""
    a = _armed
    if a is None:
        return
    a.seq += 1
    a.collective = collective
    with contextlib.suppress(ValueError):  # closed under us (disarm in another thread)
        a.write_record()


def collective_now() -> str:
    """'NAME #SEQ' of the last collective this rank entered ("" when none or not armed)."""
    a = _armed
    return f"{a.collective} #{a.seq}" if a is not None and a.collective else ""


def last_collective() -> str:
    """This rank's last collective and phase, as the record says it (empty when not armed)."""
    a = _armed
    return "" if a is None else describe_record({"seq": a.seq, "collective": a.collective,
                                                 "phase": getattr(a.env, "phase", "")})


def describe_record(rec: dict | None) -> str:
    if not rec:
        return ""
    coll = f"{rec['collective']} #{rec['seq']}" if rec.get("collective") else "none yet"
    return f"last collective entered: {coll}, while {rec.get('phase') or 'starting'}"


def _after_dump(signum, frame) -> None:
    """SIGUSR2's Python half, run after faulthandler's dump: the record, below the stacks."""
    a = _armed
    if a is None:
        return
    asked = a.record[RECORD_BYTES - 1] == _ASKED
    who = "a rank that timed out waiting for this one" if asked else "SIGUSR2"
    a.note(f"phalanx: the stacks above were asked for by {who}; {last_collective()}", "ERROR" if asked else "INFO")
    if asked:
        # A peer named this rank stalled and is ending the group: the SIGTERM the elastic agent sends next must
        # end it at once (it cannot finish a step or write a checkpoint), not after the agent's 30 s grace.
        with contextlib.suppress(ValueError):
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


def write_own_stacks(error: BaseException, why: str) -> None:
    """A rank whose collective failed: `why`, where it waited (the error's traceback), every thread's stack
    (faulthandler) and its record, into its log."""
    a = _armed
    if a is None:
        return
    a.note(f"phalanx: {why}; this rank's stacks follow (the collective that failed, then every thread)")
    with contextlib.suppress(OSError):
        os.write(a.log.fileno(), "".join(traceback.format_exception(error)).encode())
        faulthandler.dump_traceback(file=a.log, all_threads=True)
    a.note(f"phalanx: {last_collective()}")


# ----------------------------------------------------------------------------- asking a stalled peer


@dataclass
class Answer:
    """What a peer's stacks say: its Phalanx frames (innermost first: shown path, line, function), its record,
    and `silence`, why it gave no stacks ("" when it did)."""
    rank: int
    frames: list[tuple[str, int, str]] = field(default_factory=list)
    record: dict | None = None
    silence: str = ""


def read_record(logs: Path, rank: int) -> dict | None:
    """Rank `rank`'s record, or None (no file: not armed, or another node's run directory)."""
    path = Path(logs) / f"rank-{rank}.where"
    for _ in range(5):  # a read torn by a write in progress parses badly: read again
        try:
            raw = path.read_bytes()[:RECORD_BYTES - 1].split(b"\0", 1)[0].decode()
            pid, started, host, rank, seq, stamp, collective, phase = raw.split("\t", 7)
            return {"pid": int(pid), "started": started, "host": host, "rank": int(rank), "seq": int(seq),
                    "time": float(stamp), "collective": collective, "phase": phase}
        except OSError:
            return None
        except ValueError:  # UnicodeDecodeError included
            time.sleep(0.01)
    return None


def process_start(pid: int) -> str:
    """When `pid` started (clock ticks since boot, /proc), "" where that cannot be read: a pid of a record is
    signalled only while it is still the process that wrote the record (pids are reused)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def process_state(pid: int) -> str | None:
    """The kernel's one-letter state of `pid` (R, S, D, T, Z...), None when there is no such process, "?" where
    /proc cannot tell."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            return "?"
        return "?"
    except (OSError, IndexError):
        return "?"


def ask_stacks(logs: Path, ranks: list[int], wait_s: float = DUMP_WAIT_S) -> list[Answer]:
    """Ask each of `ranks` for its stacks (SIGUSR2, on this node) and read them from its log; all are asked
    first, then waited for together, at most `wait_s` seconds."""
    answers, pending = [], {}
    for rank in ranks:
        ans = Answer(rank, record=read_record(logs, rank))
        answers.append(ans)
        offset = _ask(Path(logs), ans)
        if offset is not None:
            pending[rank] = (ans, offset)
    deadline = time.monotonic() + wait_s
    sizes: dict[int, tuple[int, float]] = {}
    while pending and time.monotonic() < deadline:
        time.sleep(0.05)
        for rank, (ans, offset) in list(pending.items()):
            log = Path(logs) / f"rank-{rank}.log"
            with contextlib.suppress(OSError):
                size = log.stat().st_size
                if size <= offset:
                    continue
                last, since = sizes.get(rank, (-1, 0.0))
                if size != last:
                    sizes[rank] = (size, time.monotonic())
                elif time.monotonic() - since >= _SETTLE_S:
                    ans.frames = phalanx_frames(main_thread(parse_dump(_read_from(log, offset))))
                    del pending[rank]
    for ans, offset in pending.values():  # wrote nothing, or still writing: what is there counts
        log = Path(logs) / f"rank-{ans.rank}.log"
        threads = parse_dump(_read_from(log, offset)) if log.is_file() else []
        if threads:
            ans.frames = phalanx_frames(main_thread(threads))
        else:
            pid = ans.record.get("pid") if ans.record else "?"
            ans.silence = (f"its process {pid} wrote no stacks within {wait_s:g} s of SIGUSR2 (stuck with signals "
                           f"blocked?)")
    return answers


def _ask(logs: Path, ans: Answer) -> int | None:
    """Send the signal; the log's size before it, or None with `ans.silence` set where the rank cannot answer."""
    rec = ans.record
    if not rec:
        ans.silence = f"it left no record in {logs} (not started yet, or its run directory is on another node)"
        return None
    pid, host = int(rec.get("pid", 0)), rec.get("host", "")
    if host != socket.gethostname():
        ans.silence = f"it runs on {host}, where only its own node can ask for its stacks"
        return None
    state = process_state(pid)
    if state in (None, "Z", "X") or process_start(pid) != rec.get("started", ""):
        ans.silence = f"its process {pid} has exited"
        return None
    if state in ("T", "t"):
        ans.silence = f"its process {pid} is stopped (SIGSTOP or a debugger)"
        return None
    if state == "D":
        ans.silence = f"its process {pid} is in uninterruptible sleep (stuck in the kernel: a driver or file system)"
        return None
    log = logs / f"rank-{ans.rank}.log"
    try:
        offset = log.stat().st_size
        with open(logs / f"rank-{ans.rank}.where", "r+b") as f:  # the flag: a peer asks (see _after_dump)
            f.seek(RECORD_BYTES - 1)
            f.write(bytes([_ASKED]))
        os.kill(pid, SIGNAL)
    except ProcessLookupError:
        ans.silence = f"its process {pid} has exited"
        return None
    except OSError as e:
        ans.silence = f"its process {pid} could not be asked ({e.strerror or e})"
        return None
    return offset


def _read_from(log: Path, offset: int) -> str:
    with open(log, "rb") as f:
        f.seek(offset)
        return f.read(1 << 20).decode("utf-8", "replace")


_THREAD = re.compile(r"^(Current thread|Thread) 0x[0-9a-fA-F]+|^Stack \(most recent call first\)")
_FRAME = re.compile(r'^\s+File "(.*)", line (\d+) in (.+?)\s*$')


def parse_dump(text: str) -> list[list[tuple[str, int, str]]]:
    """faulthandler's dump as threads, each a list of (file, line, function), innermost first."""
    threads: list[list[tuple[str, int, str]]] = []
    current = None
    for line in text.splitlines():
        if _THREAD.match(line):
            current = []
            threads.append(current)
        elif current is not None and (m := _FRAME.match(line)):
            current.append((m.group(1), int(m.group(2)), m.group(3)))
        elif current is not None and line.strip() and not line.startswith(" "):
            current = None  # the dump ended (a log line follows)
    return threads


def main_thread(threads: list[list[tuple[str, int, str]]]) -> list[tuple[str, int, str]]:
    """The thread that is not one `threading` started (their outermost frame is threading's bootstrap); else
    the first thread with a Phalanx frame, else the first."""
    for frames in threads:
        if frames and not frames[-1][0].endswith("threading.py"):
            return frames
    return next((t for t in threads if phalanx_frames(t)), threads[0] if threads else [])


def phalanx_frames(frames: list[tuple[str, int, str]]) -> list[tuple[str, int, str]]:
    """The frames in Phalanx's own files, innermost first, their paths shown from the source root."""
    out = []
    for path, line, func in frames:
        p = Path(path)
        if p.is_relative_to(_PKG):
            root = _PKG.parent
            shown = (Path("src") if root.name == "src" else Path()) / p.relative_to(root)
            out.append((str(shown), line, func))
    return out


def where(ans: Answer) -> str:
    """'at FILE:LINE in FUNC (from FILE:LINE in FUNC), last collective entered: ...', or 'did not answer: why'."""
    last = describe_record(ans.record)
    if ans.silence or not ans.frames:
        why = ans.silence or "its stacks hold no Phalanx frame"
        return f"and did not answer: {why}" + (f"; {last}" if last else "")
    path, line, func = ans.frames[0]
    text = f"at {path}:{line} in {func}"
    outer = next((f for f in ans.frames[1:] if f[0] != path), None)
    if outer is not None:
        text += f" (from {outer[0]}:{outer[1]} in {outer[2]})"
    return text + (f", {last}" if last else "")

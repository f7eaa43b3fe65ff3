"""Fault injection for tests of failure handling; inert unless PHALANX_FAULT is set.

PHALANX_FAULT="point:rank:step:action" — at `point` ("step", "ckpt_write" or "eval": an evaluation's start),
on `rank` at global step `step`, do `action`: "exit" (os._exit(3)), "kill" (SIGKILL self), "lose" (SIGKILL
after removing the files of $PHALANX_FAULT_LOST_DIR: a node lost with its memory, for snapshots), "term" (SIGTERM
self, as a scheduler's preemption would), "hang" (sleep for ever), "stall" (block for ever in C code that holds
the GIL, as a stuck device or library call would: `stall_here`) or "stop" (SIGSTOP self, a frozen process).
An optional 5th field restricts it to one elastic restart count (default 0, the first attempt).

PHALANX_FAULT_STEP_SLEEP=S: every rank sleeps S seconds after every optimizer step, in every attempt: a run that
lasts at least a known wall time whatever the machine's speed (the maths is unchanged), for tests that need a
run still going when a scheduler's signal comes.
"""
from __future__ import annotations

import os
import signal
import time

_SPEC = os.environ.get("PHALANX_FAULT", "")
_STEP_SLEEP = float(os.environ.get("PHALANX_FAULT_STEP_SLEEP") or 0)


def maybe(point: str, rank: int, step: int) -> None:
    if _STEP_SLEEP and point == "step":
        time.sleep(_STEP_SLEEP)
    if not _SPEC:
        return
    parts = _SPEC.split(":")
    p, r, s, action = parts[:4]
    attempt = int(parts[4]) if len(parts) > 4 else 0
    if p != point or int(r) != rank or int(s) != step:
        return
    if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0)) != attempt:
        return
    print(f"phalanx fault injection: {action} at {point}, rank {rank}, step {step}", flush=True)
    if action == "exit":
        os._exit(3)
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if action == "lose":  # a node lost with its memory: the files of $PHALANX_FAULT_LOST_DIR go, then SIGKILL
        for f in os.scandir(os.environ.get("PHALANX_FAULT_LOST_DIR") or "/nonexistent"):
            os.unlink(f.path)
        os.kill(os.getpid(), signal.SIGKILL)
    if action == "term":
        os.kill(os.getpid(), signal.SIGTERM)
        return
    if action == "stop":
        os.kill(os.getpid(), signal.SIGSTOP)
        return
    if action == "hang":
        while True:
            time.sleep(60)
    if action == "stall":
        stall_here()


def stall_here() -> None:
    """Block for ever inside a C call that holds the GIL (pause(2) through ctypes.PyDLL): no other Python thread
    of this process runs. A signal ends one pause; the interpreter then runs its Python handlers and pauses
    again, here."""
    import ctypes
    libc = ctypes.PyDLL(None)  # PyDLL: the call keeps the GIL, unlike CDLL
    while True:
        libc.pause()  # tests/dist/test_hang.py looks for this line in the stalled rank's stacks

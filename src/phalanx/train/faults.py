"""Fault injection for tests of failure handling; inert unless PHALANX_FAULT is set.

PHALANX_FAULT="point:rank:step:action" — at `point` ("step", "ckpt_write" or "eval": an evaluation's start),
on `rank` at global step `step`, do `action`: "exit" (os._exit(3)), "kill" (SIGKILL self), "term" (SIGTERM
self, as a scheduler's preemption would) or "hang" (sleep for ever; "stop": SIGSTOP self, a frozen process).
An optional 5th field restricts it to one elastic restart count (default 0, the first attempt).
"""
from __future__ import annotations

import os
import signal
import time

_SPEC = os.environ.get("PHALANX_FAULT", "")


def maybe(point: str, rank: int, step: int) -> None:
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
    if action == "term":
        os.kill(os.getpid(), signal.SIGTERM)
        return
    if action == "stop":
        os.kill(os.getpid(), signal.SIGSTOP)
        return
    if action == "hang":
        while True:
            time.sleep(60)

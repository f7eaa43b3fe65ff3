"""Where the seconds before the first optimizer step go: phases timed from the command's start (budget.START_ENV).

    launcher  imports (the interpreter, torch, Phalanx: up to `phalanx train`'s first line), config (parse and
              check), data (the prepared store opened and checked), tune (measured or cached)
    rank      launch (from the launcher's hand-over to the rank's set-up: in-process for one rank, a process
              start and its imports for several), run_dir, data (the store mapped, the loader), model (model,
              strategy, optimizer, EMA), resume, first_step (the first optimizer step, its kernels built)

The launcher hands its phases to the ranks in STARTUP_ENV; rank 0 logs the whole in one line and summary.json
holds it as `startup_s`.
"""
from __future__ import annotations

import json
import os
import time

STARTUP_ENV = "PHALANX_STARTUP"
"""JSON [[phase, seconds since the command's start at its end], ...] of the launcher, for the ranks."""


class Phases:
    """Marks at the end of each phase, as seconds since `start` (time.time() of the command's start)."""

    def __init__(self, start: float, marks: list | None = None, clock=time.time):
        self.start, self.clock = start, clock
        self.marks: list[tuple[str, float]] = [tuple(m) for m in (marks or [])]

    @classmethod
    def inherited(cls, start: float) -> "Phases":
        """The launcher's phases (STARTUP_ENV), continued here; none when this process is the launcher's own."""
        try:
            marks = json.loads(os.environ.get(STARTUP_ENV, "[]"))
            marks = [(str(n), float(t)) for n, t in marks]
        except (ValueError, TypeError):
            marks = []
        return cls(start, marks)

    def mark(self, phase: str) -> None:
        self.marks.append((phase, round(self.clock() - self.start, 3)))

    def hand_over(self) -> None:
        """The phases so far, for the ranks this process starts (and a rank in this process)."""
        os.environ[STARTUP_ENV] = json.dumps(self.marks)

    def seconds(self) -> dict[str, float]:
        """{phase: seconds it took, ..., "total": seconds from the command's start to the last mark}."""
        out, before = {}, 0.0
        for name, t in self.marks:
            key = name if name not in out else f"{name}_{sum(1 for k in out if k.startswith(name))}"
            out[key] = round(max(0.0, t - before), 3)
            before = max(before, t)
        out["total"] = round(before, 3)
        return out


def line(seconds: dict[str, float]) -> str:
    """One log line: the total, then each phase."""
    parts = ", ".join(f"{k} {v:.2f}" for k, v in seconds.items() if k != "total")
    return f"start-up: {seconds.get('total', 0.0):.2f} s from the command's start to the first optimizer step ({parts})"

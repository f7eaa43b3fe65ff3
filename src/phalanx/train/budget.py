"""Training to a wall-clock budget: `--budget 90s` sets the number of steps from the measured speed.

    deadline = the command's start + budget - what earlier attempts of this run spent (a resume
               continues the same budget, it does not get a new one)
    reserve  = the final evaluation (one evaluation chunk's forward is timed on every rank after the
               warm-up, times the chunks per rank, twice with TTA) + the export and summary + a margin
    steps    = now + (deadline - now - reserve) / seconds per step, measured after a warm-up and
               again every few seconds, with rank 0's clock: every rank gets the same number

The learning-rate schedule (one-cycle, cosine) is laid over that number of steps; it is updated as the
measurement is, so the schedule ends where the training does. Evaluations other than the final one
are skipped: each would take time from training.
"""
from __future__ import annotations

import os
import time

from phalanx.train.cadence import agree_every

START_ENV = "PHALANX_START_TIME"
"""Wall-clock time (time.time()) the command started, set by the first `phalanx` process, inherited by ranks."""

TUNED_RATE_ENV = "PHALANX_TUNED_IMG_S"
"""img/s the tuner measured for this run, set by the launcher for the ranks: the budget's first estimate."""

BUDGET_EVERY = 5
"""Optimizer steps between two estimates of the steps that fit in a budget (one small broadcast each), where
reading a value back costs nothing (CPU); see `estimate_every`."""

_entry_start: float | None = None
"""When this process started, recorded by the `phalanx` entry point (cli.entry) of the command's own process."""


def process_age_s() -> float | None:
    """Seconds since this process started, from /proc (Linux: both numbers count from boot on one clock, to
    1/100 s); None where there is no /proc."""
    try:
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return max(0.0, uptime - int(fields[19]) / os.sysconf("SC_CLK_TCK"))  # field 22: starttime, in ticks
    except (OSError, ValueError, IndexError):
        return None


def mark_entry(loaded_at: float) -> None:
    """Called by the command's entry point: the command started when its process did (the interpreter's start
    and `import torch` count: they are seconds of the user's budget), or, without /proc, at `loaded_at` (when
    the entry point's module was imported, before torch). A process that was not started for this command
    (over a minute old: an entry point called from a longer-lived program) counts from `loaded_at`."""
    global _entry_start
    age = process_age_s()
    _entry_start = time.time() - age if age is not None and age < 60 else loaded_at


def command_start(new: bool = False) -> float:
    """When the command started. `new`: this process's command (the launcher, or a single-process run)
    starts now, or when its entry point says it did; recorded for the processes it starts. Else the time a
    launcher recorded (a rank it started), or now."""
    global _entry_start
    if not new:
        try:
            return float(os.environ[START_ENV])
        except (KeyError, ValueError):
            pass
    start = time.time() if _entry_start is None else min(_entry_start, time.time())
    _entry_start = None  # one command per entry: a later call in this process starts afresh
    os.environ[START_ENV] = repr(start)
    return start


def estimate_every(steps_per_epoch: int, host_reads_sync: bool) -> int:
    """Steps between two estimates. Each is a broadcast from rank 0, which waits for the queued step where a
    read waits for the device (CUDA, XLA): there at the ranks' agreement cadence (the logging one), when the
    host reads anyway, so that the step stays free of host synchronisation; every BUDGET_EVERY steps on CPU."""
    return max(BUDGET_EVERY, agree_every(steps_per_epoch, host_reads_sync))


class Budget:
    """The deadline of a run and the arithmetic of how many steps fit before it."""

    MARGIN_S = 0.5           # fixed part of the reserve: process exit (~0.2 s: cli.leave), the last log lines
    MARGIN_FRAC = 0.01       # and a share of the budget, for the noise of the speed measurement (re-measured
                             # every few steps to the end: 3% left ~3 s of 90 unused on a 2-core AMD EPYC)
    FINISH_S = 1.2           # export, curves.png, summary.json (0.9-1.0 s on a 2-core AMD EPYC)

    def __init__(self, seconds: float, start: float, spent_before: float = 0.0, clock=time.time,
                 every: int = BUDGET_EVERY):
        self.seconds, self.start, self.spent_before, self.clock = seconds, start, spent_before, clock
        self.every = every  # steps between two estimates (estimate_every)

    @property
    def deadline(self) -> float:
        return self.start + self.seconds - self.spent_before

    def spent(self) -> float:
        """Seconds of the budget used so far, this attempt included: what a checkpoint records."""
        return self.spent_before + (self.clock() - self.start)

    def reserve(self, eval_s: float) -> float:
        """Seconds kept for what follows the last step: the final evaluation's `eval_s`, the finish, margins."""
        return eval_s + self.FINISH_S + self.MARGIN_S + self.MARGIN_FRAC * self.seconds

    def late_by(self, reserve_s: float) -> float:
        """Seconds past the deadline at which the run would end if it stopped training now (<= 0: in time)."""
        return self.clock() + reserve_s - self.deadline

    def total_steps(self, global_step: int, step_s: float, reserve_s: float, cap: int | None = None,
                    check_every: int = 1) -> int:
        """The step count to train to: what is done plus what fits before the deadline, at most `cap`.
        While time is left it is at least `check_every` steps ahead, so that the next estimate (made every
        `check_every` steps) can still correct one made from slow early steps; past the deadline it is
        one more step, so that a run always makes progress and ends with an evaluation."""
        left = self.deadline - self.clock() - reserve_s
        fits = int(left / max(step_s, 1e-9))
        total = global_step + (max(fits, check_every + 1) if left > 0 else 1)
        return min(total, cap) if cap else total


def eval_seconds_guess(eval_images: int, tta: bool, train_img_s: float) -> float:
    """The final evaluation before it was timed: forward only at ~2.5x the training speed (twice with TTA)."""
    return eval_images * (2 if tta else 1) / max(1e-9, 2.5 * train_img_s)


class StepClock:
    """Seconds per optimizer step over the last `window` or more steps, measured after `warmup` steps of this
    process (which pay for one-time costs: allocator, kernel selection, first copies).

    The clock is read at marked steps only: the budget marks the steps where it estimates, each followed by
    a broadcast that waits for the device. Where the host runs ahead of the device between two such waits
    (CUDA, XLA), a reading in between times the host's enqueueing, not the device's work (a window inside one
    interval of 50 steps would see a tiny model's steps at the speed of their kernel launches); readings all
    taken just before a wait stand at the same point of that cycle, so the host's lead cancels out."""

    def __init__(self, warmup: int = 3, window: int = 20, clock=time.perf_counter):
        self.warmup, self.window, self.clock = warmup, window, clock
        self.seen = 0
        self.marks: list[tuple[int, float]] = []  # (steps this process has run, clock)

    def tick(self, mark: bool = True) -> None:
        """One optimizer step done; `mark`: read the clock (at a point where the host waits for the device)."""
        self.seen += 1
        if self.seen >= self.warmup and mark:
            self.marks.append((self.seen, self.clock()))
            while len(self.marks) > 2 and self.marks[-1][0] - self.marks[1][0] >= self.window:
                self.marks.pop(0)

    def ready(self) -> bool:
        """The warm-up is over: what runs now runs at its steady speed."""
        return self.seen >= self.warmup

    def step_s(self) -> float | None:
        if len(self.marks) < 2:
            return None
        (s0, t0), (s1, t1) = self.marks[0], self.marks[-1]
        return (t1 - t0) / (s1 - s0)

"""Is the tuner's decision still right? Rank 0 times the run's own steps against the img/s the decision expects.

    the launcher (tools/tune.py) -> TUNED_ENV: {"img_s": expected, "label": the choice, "key", "at"}
    rank 0, each optimizer step -> seconds between consecutive steps, after WARMUP_STEPS, evaluations and
                                   checkpoints left out (the loop calls `gap()` after them)
    after WINDOW_S of such steps, or at the last step of a shorter run (MIN_STEPS at least)
                                -> measured img/s; more than SHORT_BY below the expectation: one line, and an
                                   event in metrics.jsonl that the launcher turns into "measure again" in the cache
"""
from __future__ import annotations

import json
import os
import time
from typing import Callable

TUNED_ENV = "PHALANX_TUNED"
"""JSON the launcher sets for the ranks after tuning: the expected img/s, the choice's label, its cache key and
when it was decided (so that a later run's event cannot mark a newer decision)."""

SHORT_BY = 0.10
"""A run training more than this share slower than the decision expected marks it to be measured again."""

WINDOW_S = 60.0
"""Seconds of training steps the rate is measured over (the first minute)."""

WARMUP_STEPS = 5
"""Steps left out first: the allocator, oneDNN's primitives, cuDNN's choices."""

MIN_STEPS = 10
"""A run shorter than this (after the warm-up) says nothing: too few steps to tell the noise from a change."""


def expectation() -> dict | None:
    """What the launcher's tuning expects of this run (None: nothing was tuned, or no rate is known)."""
    try:
        got = json.loads(os.environ.get(TUNED_ENV, ""))
        return got if float(got.get("img_s") or 0) > 0 else None
    except (ValueError, TypeError, AttributeError):
        return None


class RateCheck:
    """Rank 0's img/s over its first minute of steps (see the module docstring), compared once with `expected`."""

    def __init__(self, expected: dict | None, global_batch: int, clock: Callable[[], float] = time.perf_counter):
        self.expected, self.global_batch, self.clock = expected, global_batch, clock
        self.seen = self.steps = 0
        self.seconds = 0.0
        self.last: float | None = None
        self.done = expected is None

    def gap(self) -> None:
        """Something other than a training step ran since the last step (evaluation, checkpoint, epoch's start):
        the next step's time is not counted."""
        self.last = None

    def step(self, last_step: bool) -> dict | None:
        """Called after each optimizer step; returns the verdict once (a dict for metrics.jsonl), else None."""
        if self.done:
            return None
        now = self.clock()
        if self.seen >= WARMUP_STEPS and self.last is not None:
            self.seconds += now - self.last
            self.steps += 1
        self.seen += 1
        self.last = now
        if self.seconds < WINDOW_S and not (last_step and self.steps >= MIN_STEPS):
            if last_step:
                self.done = True
            return None
        self.done = True
        return self.verdict()

    def verdict(self) -> dict:
        measured = self.steps * self.global_batch / max(self.seconds, 1e-9)
        expected = float(self.expected["img_s"])
        short = 1.0 - measured / expected
        return {"measured_img_s": round(measured, 1), "expected_img_s": round(expected, 1), "steps": self.steps,
                "seconds": round(self.seconds, 2), "short": round(short, 4), "stale": short > SHORT_BY,
                "label": self.expected.get("label", "?"), "key": self.expected.get("key"),
                "at": self.expected.get("at")}


def verdict_line(v: dict) -> str:
    """One line for a stale decision: what was expected, what this run measures, what happens next."""
    return (f"phalanx: the tuned layout ({v['label']}) was expected to train at {v['expected_img_s']:,.0f} img/s; "
            f"this run trains at {v['measured_img_s']:,.0f} ({100 * v['short']:.0f}% short over {v['steps']} steps): "
            f"the choices are measured again at the next start (or now: --tune true)")

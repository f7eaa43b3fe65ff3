"""The budget arithmetic with a fake clock."""
import pytest

from phalanx.config import parse_duration
from phalanx.train.budget import BUDGET_EVERY, Budget, StepClock, estimate_every, eval_seconds_guess


@pytest.mark.parametrize("text,seconds", [("90s", 90), ("90", 90), ("5m", 300), ("1.5h", 5400), (" 2m ", 120)])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "0s", "-5m", "5 minutes", "1e400s", "abc", "5d"])
def test_bad_durations_are_refused(text):
    with pytest.raises(ValueError):
        parse_duration(text)


class FakeClock:
    def __init__(self, t=1000.0):
        self.t = t

    def __call__(self):
        return self.t


def test_steps_fit_before_the_deadline_with_the_reserve():
    clock = FakeClock()
    b = Budget(90.0, start=clock.t, clock=clock)
    clock.t += 10  # start-up: launcher, data, model
    # before it is timed, the final evaluation is 20,000 forwards at 2.5 x 2,000 img/s = 4 s
    assert eval_seconds_guess(eval_images=10_000, tta=True, train_img_s=2000.0) == pytest.approx(4.0)
    reserve = b.reserve(4.0)
    assert reserve == pytest.approx(4 + 1.2 + 0.5 + 0.9)  # evaluation, finish 1.2 s, margin 0.5 s + 1% of 90 s
    total = b.total_steps(global_step=20, step_s=0.25, reserve_s=reserve)
    assert total == 20 + int((90 - 10 - reserve) / 0.25)
    # the run's clock if it trains exactly that: it ends its steps with the reserve left
    assert clock.t + (total - 20) * 0.25 + reserve <= b.deadline + 1e-9
    assert b.total_steps(20, 0.25, reserve, cap=100) == 100
    # slow early steps (a warm-up) predict few steps: still enough for the next estimate to correct it
    assert b.total_steps(20, 30.0, reserve, check_every=5) == 26


def test_estimates_are_broadcast_at_the_agreement_cadence_where_a_read_waits_for_the_device():
    from phalanx.train.cadence import log_every
    assert estimate_every(steps_per_epoch=234, host_reads_sync=False) == BUDGET_EVERY  # CPU: every 5 steps
    assert estimate_every(234, host_reads_sync=True) == log_every(234) == 50  # CUDA: when the loss is read
    assert estimate_every(8, host_reads_sync=True) == BUDGET_EVERY  # never more often than on CPU


def test_a_resumed_run_has_what_is_left_of_its_budget():
    clock = FakeClock()
    b = Budget(60.0, start=clock.t, spent_before=45.0, clock=clock)
    assert b.deadline == clock.t + 15
    clock.t += 5
    assert b.spent() == 50
    assert b.total_steps(100, 1.0, reserve_s=2.0) == 100 + 8


def test_past_the_deadline_one_more_step_still_ends_the_run_with_an_evaluation():
    clock = FakeClock()
    b = Budget(10.0, start=clock.t, clock=clock)
    clock.t += 30
    assert b.total_steps(7, 0.5, reserve_s=1.0) == 8


def test_step_clock_times_the_device_where_the_host_runs_ahead_of_it_between_estimates():
    """A GPU-like run: the host queues a step in 1 ms, the device runs it in 10 ms, and the host waits for the
    device only at the budget's estimates (every 50 steps, a broadcast). Clock readings between two waits
    time the queueing; readings at the estimates time the device."""
    host = FakeClock(0.0)
    device_done = 0.0
    every_step = StepClock(warmup=3, window=20, clock=host)  # what a reading at every step would see
    at_marks = StepClock(warmup=3, window=20, clock=host)
    for step in range(1, 301):
        host.t += 0.001
        device_done = max(device_done, host.t) + 0.010
        every_step.tick()
        at_marks.tick(mark=step % 50 == 0)
        if step % 50 == 0:
            if step >= 100:
                assert at_marks.step_s() == pytest.approx(0.010, rel=0.02), step
                assert every_step.step_s() == pytest.approx(0.001)  # 10x too fast: 10x the steps that fit
            host.t = max(host.t, device_done)  # the estimate's broadcast waits for the queued steps


def test_step_clock_skips_the_warm_up_and_follows_recent_steps():
    t = FakeClock(0.0)
    sc = StepClock(warmup=3, window=4, clock=t)
    for step_time in (5.0, 3.0, 1.0):  # slow first steps: not measured
        t.t += step_time
        sc.tick()
    assert sc.step_s() is None
    for _ in range(4):
        t.t += 0.25
        sc.tick()
    assert sc.step_s() == pytest.approx(0.25)
    for _ in range(4):  # the machine got busier: the last 4 steps count
        t.t += 0.5
        sc.tick()
    assert sc.step_s() == pytest.approx(0.5)


def test_a_budget_counts_from_the_process_start_not_from_after_import_torch(monkeypatch):
    """The entry point marks the command's start at its process's start (`import torch`, ~3 s on a 2-core AMD
    EPYC, is part of the user's wall time); without /proc at the entry module's import; a process older than a
    minute was not started for this command. Ranks inherit the time the launcher recorded."""
    import time

    from phalanx.train import budget as B
    monkeypatch.setenv(B.START_ENV, "0")  # so that monkeypatch restores the variable, set or not, afterwards
    monkeypatch.delenv(B.START_ENV)
    monkeypatch.setattr(B, "process_age_s", lambda: 3.0)
    B.mark_entry(loaded_at=time.time())
    start = B.command_start(new=True)
    assert time.time() - start == pytest.approx(3.0, abs=0.5)
    assert float(__import__("os").environ[B.START_ENV]) == start  # for the ranks it starts
    assert B.command_start() == start  # a rank's view
    assert time.time() - B.command_start(new=True) < 0.5  # the mark served one command: the next starts now
    for age in (None, 3600.0):  # no /proc; an old process that called the entry point
        monkeypatch.setattr(B, "process_age_s", lambda age=age: age)
        B.mark_entry(loaded_at=time.time() - 1.5)
        assert time.time() - B.command_start(new=True) == pytest.approx(1.5, abs=0.5)


def test_process_age_reads_this_process_start_from_proc():
    import os
    import time

    from phalanx.train.budget import process_age_s
    if not os.path.exists("/proc/self/stat"):
        pytest.skip("no /proc here")
    a = process_age_s()
    time.sleep(0.1)
    b = process_age_s()
    assert a is not None and a >= 0 and b - a == pytest.approx(0.1, abs=0.05)


def test_a_budget_spent_before_the_first_step_says_so_in_one_line(monkeypatch):
    import logging
    import types

    from phalanx.train.setup import first_estimate
    monkeypatch.setenv("PHALANX_TUNED_IMG_S", "2000")
    clock = FakeClock()
    cfg = types.SimpleNamespace(budget="5s", tta_flip=True, global_batch=256, max_steps=0)
    records = []
    log = logging.getLogger("test-budget-warning")
    log.addHandler(type("H", (logging.Handler,), {"emit": lambda self, r: records.append(r.getMessage())})())
    b = Budget(5.0, start=clock.t, clock=clock)
    clock.t += 7.0  # start-up took longer than the whole budget
    assert first_estimate(b, cfg, eval_images=10_000, log=log) == 1
    assert len(records) == 1 and records[0].startswith("--budget 5s is too short for this run: 7.0 s are spent")
    assert "trains one step and ends ~" in records[0]
    records.clear()
    b = Budget(90.0, start=clock.t, clock=clock)
    clock.t += 7.0
    assert first_estimate(b, cfg, eval_images=10_000, log=log) > 100
    assert records == []

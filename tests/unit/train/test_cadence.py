"""When the loop logs, evaluates, checkpoints and stops."""
import os
import signal

import torch

from phalanx.config import CheckpointConfig
from phalanx.train import cadence


def test_log_about_four_times_an_epoch_at_most_every_50_steps():
    assert cadence.log_every(117) == 29
    assert cadence.log_every(1000) == 50
    assert cadence.log_every(2) == 1
    due = [s for s in range(1, 118) if cadence.log_due(s, s, 117, 117, 29)]
    assert due == [29, 58, 87, 116, 117]  # and at the epoch's end
    assert cadence.log_due(5, 5, 117, 5, 29)  # the run's last step (max_steps)


def test_evaluate_every_n_epochs_and_after_the_last():
    assert [e for e in range(6) if cadence.eval_due(e, 2, cadence.is_last_epoch(e, 6, 0, 99))] == [1, 3, 5]
    assert [e for e in range(5) if cadence.eval_due(e, 2, cadence.is_last_epoch(e, 5, 0, 99))] == [1, 3, 4]
    assert cadence.is_last_epoch(1, 6, 20, 20)  # max_steps reached before the last epoch


def test_the_ema_takes_in_every_kth_step_and_the_rest_at_the_last():
    # every 3 steps, 8 steps in all: updates after steps 3 and 6 (3 steps each) and 8 (the 2 since 6)
    assert [cadence.ema_steps(s, 3, last=s == 8) for s in range(1, 9)] == [0, 0, 3, 0, 0, 3, 0, 2]
    assert [cadence.ema_steps(s, 3, last=s == 6) for s in range(1, 7)] == [0, 0, 3, 0, 0, 3]
    assert [cadence.ema_steps(s, 1, last=s == 4) for s in range(1, 5)] == [1, 1, 1, 1]  # the default
    assert cadence.ema_steps(2, 5, last=True) == 2  # a run shorter than one interval still gets its average


def test_periodic_checkpoints_by_steps_or_minutes_never_at_an_epochs_end():
    by_steps = CheckpointConfig(every_steps=3)
    assert [s for s in range(1, 11) if cadence.periodic_checkpoint_due(by_steps, s, s, 10, 0.0)] == [3, 6, 9]
    by_time = CheckpointConfig(every_minutes=10)
    assert not cadence.periodic_checkpoint_due(by_time, 4, 4, 10, 9.9)
    assert cadence.periodic_checkpoint_due(by_time, 4, 4, 10, 10.0)
    assert not cadence.periodic_checkpoint_due(by_time, 10, 10, 10, 60.0)  # the epoch-end one covers it
    assert not cadence.periodic_checkpoint_due(CheckpointConfig(), 4, 4, 10, 1e9)


def test_preemption_signal_sets_the_flag_and_restore_puts_the_handler_back():
    before = signal.getsignal(signal.SIGUSR1)
    p = cadence.Preemption()
    try:
        assert not p.agreed(torch.device("cpu"))
        os.kill(os.getpid(), signal.SIGUSR1)
        assert p.requested and p.signal_name == "SIGUSR1"
        assert p.agreed(torch.device("cpu"))  # one process: its own flag
    finally:
        p.restore()
    assert signal.getsignal(signal.SIGUSR1) is before

"""When the loop logs, evaluates, checkpoints and stops: small decisions, each testable alone."""
from __future__ import annotations

import contextlib
import signal

import torch
import torch.distributed as dist

from phalanx.config import CheckpointConfig
from phalanx.runtime import hang


def log_every(steps_per_epoch: int) -> int:
    """Training metrics about four times an epoch, at most every 50 steps."""
    return max(1, min(50, steps_per_epoch // 4))


def log_due(global_step: int, step_in_epoch: int, steps_per_epoch: int, total_steps: int, every: int) -> bool:
    """Reduce and write the training loss now: every `every` steps, at each epoch's end and at the last step."""
    return global_step % every == 0 or step_in_epoch == steps_per_epoch or global_step >= total_steps


def eval_due(epoch: int, eval_every: int, last: bool) -> bool:
    """Evaluate after epoch `epoch` (0-based): every `eval_every` epochs and after the last."""
    return (epoch + 1) % eval_every == 0 or last


def is_last_epoch(epoch: int, epochs: int, global_step: int, total_steps: int) -> bool:
    return epoch == epochs - 1 or global_step >= total_steps


def ema_steps(step: int, every: int, last: bool) -> int:
    """How many optimizer steps the EMA takes in after optimizer step `step` (1-based), updated every `every`
    steps and at the last: `every` at its multiples, the remainder at a last step between them, else 0.
    A function of the step alone, so a resumed run updates its average where the uninterrupted one did."""
    if step % every == 0:
        return every
    return step % every if last else 0


def periodic_checkpoint_due(ckpt: CheckpointConfig, global_step: int, step_in_epoch: int, steps_per_epoch: int,
                            minutes_since_last: float) -> bool:
    """A periodic checkpoint now (every N steps or M minutes); never at an epoch's end, which has its own."""
    if step_in_epoch >= steps_per_epoch:
        return False
    by_steps = bool(ckpt.every_steps) and global_step % ckpt.every_steps == 0
    by_time = bool(ckpt.every_minutes) and minutes_since_last >= ckpt.every_minutes
    return by_steps or by_time


def agree_every(steps_per_epoch: int, host_reads_sync: bool) -> int:
    """Steps between the ranks' agreements on what signals and clocks decide (preemption, checkpoints by time).

    Every step where reading a flag back costs nothing (CPU). Where a read waits for the queued step (CUDA),
    at the logging cadence, when the loss is read anyway: the step runs without host synchronisation in
    between. The same number on every rank, so every rank stops or checkpoints after the same step.
    """
    return log_every(steps_per_epoch) if host_reads_sync else 1


def agree_all(flags: list[bool], device: torch.device) -> list[bool]:
    """Each flag true on every rank when it is true on any rank (clocks and signals differ between ranks):
    one all-reduce for all of them; none for one process."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return list(flags)
    t = torch.tensor([int(f) for f in flags], device=device)
    hang.entered("all_reduce (agree)")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]


def agree(flag: bool, device: torch.device) -> bool:
    """True on every rank when it is true on any rank."""
    return agree_all([flag], device)[0]


class Preemption:
    """SIGTERM / SIGUSR1 (SLURM) set a flag; ranks agree on it at their agreement cadence (`agree_every`),
    checkpoint, exit 0."""

    def __init__(self):
        self.requested = False
        self.signal_name = ""
        self._old = {}
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            with contextlib.suppress(ValueError):  # not the main thread (e.g. an embedding application)
                self._old[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.requested = True
        self.signal_name = signal.Signals(signum).name

    def agreed(self, device: torch.device) -> bool:
        """True on every rank as soon as any rank got the signal."""
        return agree(self.requested, device)

    def restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)

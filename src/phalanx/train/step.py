"""One training step: forward and backward per micro-batch, then the optimizer step.

    micro-batch -> model under autocast -> loss (sum / global batch x world) -> backward
                   (gradient all-reduce on the last micro-batch only) -> clip -> optimizer -> schedule
                   -> ranks agree on the model (norm statistics) -> EMA

With `--parallel.invariant` the loss is sum / global batch and the strategy's `no_sync` context keeps each
micro-batch's gradient apart, summing them all in one fixed order after the last (parallel/invariant.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from phalanx.data.loader import Batch
from phalanx.observe.profile import region
from phalanx.runtime import hang
from phalanx.train.state import TrainState


def forward_backward(state: TrainState, batch: Batch, loss_scale: float, label_smoothing: float,
                     sync: bool) -> torch.Tensor:
    """Accumulate this micro-batch's gradients; returns its loss sum (detached, on the device)."""
    if sync:
        hang.entered("gradient reduction (forward/backward)")
    with state.strategy.no_sync(sync):
        with region("forward"):
            with state.precision.autocast():
                out = state.model(batch.x)
            # Sum over this rank's images / global batch x world: DDP's mean over ranks then gives the
            # global-batch mean, however unevenly the batch was split.
            if batch.lam is None:
                loss_sum = F.cross_entropy(out.float(), batch.y, reduction="sum", label_smoothing=label_smoothing)
            else:  # mixup/CutMix: soft targets lam * y + (1 - lam) * y_b
                loss_sum = mixed_cross_entropy(out.float(), batch.y, batch.y_b, batch.lam, label_smoothing)
        with region("backward"):  # the gradient reduction runs in here (DDP's buckets, FSDP's reduce-scatter)
            state.precision.backward(loss_sum * loss_scale)
    return loss_sum.detach()


def mixed_cross_entropy(logits: torch.Tensor, y: torch.Tensor, y_b: torch.Tensor, lam: torch.Tensor,
                        label_smoothing: float = 0.0) -> torch.Tensor:
    """Sum over the batch of the cross-entropy against the target lam_i * smooth(y_i) + (1 - lam_i) *
    smooth(y_b_i): F.cross_entropy's label smoothing of each label, mixed (both are linear in the target,
    so this equals the dense-target cross-entropy timm computes), from one log_softmax."""
    logp = F.log_softmax(logits, 1)
    nll = -(lam * logp.gather(1, y[:, None])[:, 0] + (1 - lam) * logp.gather(1, y_b[:, None])[:, 0])
    if label_smoothing:
        nll = (1 - label_smoothing) * nll - label_smoothing * logp.mean(1)
    return nll.sum()


def optimizer_step(state: TrainState, grad_clip: float, ema_steps: int = 1) -> None:
    """The update, then the EMA takes in the last `ema_steps` steps (0: not at this step; see
    cadence.ema_steps)."""
    with region("optimizer"):
        if grad_clip > 0:
            state.precision.unscale_(state.optimizer)
            state.strategy.clip_gradients(grad_clip)
        state.precision.step(state.optimizer)
        state.optimizer.zero_grad(set_to_none=True)
        state.scheduler.step()
    with region("sync"):
        state.strategy.after_step()  # one model on every rank, before the EMA takes it in
    if state.ema is not None and ema_steps:
        with region("ema"):
            state.ema.update_parameters(state.plain, steps=ema_steps)


def train_step(state: TrainState, batch: Batch, accum: int, loss_scale: float, label_smoothing: float = 0.0,
               grad_clip: float = 0.0, ema_steps: int = 1) -> tuple[torch.Tensor, bool]:
    """(loss sum of the micro-batch, whether the optimizer stepped: on the last of `accum` micro-batches)."""
    last = batch.micro == accum - 1
    loss_sum = forward_backward(state, batch, loss_scale, label_smoothing, sync=last)
    if last:
        optimizer_step(state, grad_clip, ema_steps)
    state.accel.step_barrier()  # XLA: the traced micro-step becomes one graph here (no host read)
    return loss_sum, last

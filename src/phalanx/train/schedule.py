"""The optimizer and its learning-rate schedule (given for the global batch)."""
from __future__ import annotations

import math
import sys

import torch
import torch.nn as nn

from phalanx import config as C


def build_optimizer(model: nn.Module, cfg: C.OptimConfig, fused: bool = False) -> torch.optim.Optimizer:
    """Weight decay on conv/linear weights only: decaying norms and biases only hurts. `fused`: torch's
    single-kernel SGD and AdamW (the accelerator's `fused_optimizers`), where the parameters allow it."""
    params = [p for p in model.parameters() if p.requires_grad]  # not a frozen whitening stem
    decay = [p for p in params if p.ndim > 1]
    rest = [p for p in params if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    fused_kw = {"fused": True} if fused and fused_allowed(params, cfg.name) else {}
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0,
                               **fused_kw)
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, **fused_kw)
    return torch.optim.Adadelta(groups, lr=cfg.lr)


def fused_allowed(params: list[torch.Tensor], name: str) -> bool:
    """torch's fused SGD has no rule for FSDP's sharded (DTensor) parameters (its fused AdamW has)."""
    dtensor = sys.modules.get("torch.distributed.tensor")  # not imported: no parameter is a DTensor
    return name == "adamw" or dtensor is None or not any(isinstance(p, dtensor.DTensor) for p in params)


def lr_factor(cfg: C.ScheduleConfig, step: int, total: int, steps_per_epoch: int) -> float:
    """Multiplier of the peak learning rate at optimizer step `step` (0-based) of `total`."""
    if cfg.name == "constant":
        return 1.0
    if cfg.name == "step":
        return cfg.gamma ** (step // max(1, steps_per_epoch * cfg.step_epochs))
    warm = int(cfg.warmup * total)
    if step < warm:
        return (step + 1) / warm
    frac = (step - warm) / max(1, total - warm)
    if cfg.name == "onecycle":  # linear warm-up, then linear decay to final_frac
        return 1.0 - (1.0 - cfg.final_frac) * frac
    return cfg.final_frac + (1.0 - cfg.final_frac) * 0.5 * (1.0 + math.cos(math.pi * frac))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: C.ScheduleConfig, total_steps: int | dict,
                    steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR over `total_steps`: a number, or a dict {"total": n} whose value may change during the run
    (a wall-clock budget lays the schedule over the steps that fit, as they are measured)."""
    horizon = total_steps if isinstance(total_steps, dict) else {"total": total_steps}
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(cfg, s, max(1, horizon["total"]), steps_per_epoch))

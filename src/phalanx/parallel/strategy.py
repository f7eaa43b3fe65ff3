"""How the model is spread over the ranks. The loop talks to a Strategy only; DDP is one (ddp.py),
FSDP2 will be another file beside it.

    wrap           the module the loop trains (and compiles), from the plain model on its device
    no_sync        the context of a micro-step's backward: skip the gradient reduction unless `sync`
    after_step     keep the ranks holding one model after each optimizer step
    model_state    the weights and buffers to checkpoint / export; load_model_state takes them back
    optim_state    the optimizer state to checkpoint; load_optim_state takes it back
"""
from __future__ import annotations

from pathlib import Path
from typing import ContextManager, Protocol

import torch
import torch.nn as nn


class Strategy(Protocol):
    name: str
    plain: nn.Module
    """The model itself (set by `wrap`), whose state_dict has no wrapper prefixes."""

    def wrap(self, model: nn.Module) -> nn.Module: ...

    def no_sync(self, sync: bool) -> ContextManager: ...

    def after_step(self) -> None: ...

    def model_state(self) -> dict[str, torch.Tensor]: ...

    def load_model_state(self, sd: dict[str, torch.Tensor], source: Path) -> None: ...

    def optim_state(self, optimizer: torch.optim.Optimizer) -> dict: ...

    def load_optim_state(self, optimizer: torch.optim.Optimizer, sd: dict, source: Path) -> None: ...


def build_strategy(cfg, env) -> Strategy:
    """The strategy `--parallel.strategy` names (ddp, the only one so far)."""
    from phalanx.parallel.ddp import DDPStrategy
    return DDPStrategy(cfg, env)

"""How the model is spread over the ranks. The loop talks to a Strategy only: DDP replicates the
model (ddp.py), FSDP2 shards it (fsdp.py).

    wrap           the module the loop trains (and compiles), from the plain model on its device
    averaged       the EMA of the weights, laid out like the model
    no_sync        the context of a micro-step's backward: skip the gradient reduction unless `sync`
    after_step     keep the ranks holding one model after each optimizer step
    clip_gradients scale the gradients down to a total norm of at most max_norm
    model_state    the weights and buffers to checkpoint: full tensors, or this rank's shards when `sharded`
    optim_state    the optimizer state to checkpoint, likewise
    full_state     a module's plain, full state_dict for the exported weights (collective when sharded)
    load_full      full tensors (a replicated checkpoint, any world size) into the model or its EMA
    load_optim_state   a full optimizer state_dict (torch's, keyed by parameter index)
    memory         bytes of parameters, gradients and optimizer state held by this rank
"""
from __future__ import annotations

from pathlib import Path
from typing import ContextManager, Protocol

import torch
import torch.nn as nn
from torch.optim.swa_utils import AveragedModel


class Strategy(Protocol):
    name: str
    plain: nn.Module
    """The model itself (set by `wrap`), whose state_dict has no wrapper prefixes."""
    sharded: bool
    """Checkpoints hold each rank's shards (DCP), not one full copy written by rank 0."""
    lockstep: bool
    """Each forward is a collective: every rank must run as many (evaluation pads with empty chunks)."""

    def wrap(self, model: nn.Module) -> nn.Module: ...

    def averaged(self, decay: float) -> AveragedModel: ...

    def no_sync(self, sync: bool) -> ContextManager: ...

    def after_step(self) -> None: ...

    def clip_gradients(self, max_norm: float) -> None: ...

    def model_state(self) -> dict[str, torch.Tensor]: ...

    def optim_state(self, optimizer: torch.optim.Optimizer) -> dict: ...

    def full_state(self, module: nn.Module) -> dict[str, torch.Tensor]: ...

    def load_full(self, module: nn.Module, sd: dict[str, torch.Tensor], source: Path) -> None: ...

    def load_optim_state(self, optimizer: torch.optim.Optimizer, sd: dict, source: Path) -> None: ...

    def memory(self, optimizer: torch.optim.Optimizer) -> dict[str, int]: ...


def build_strategy(cfg, env) -> Strategy:
    """The strategy `--parallel.strategy` names (DDP with a fixed-order gradient sum under `--parallel.invariant`)."""
    # Imported here, not above: fsdp.py imports FSDP2 and DCP's state-dict API (~0.3 s), which a DDP run and
    # the launcher never use.
    if cfg.parallel.strategy == "fsdp" and cfg.parallel.invariant:
        from phalanx.parallel.invariant_fsdp import InvariantFSDPStrategy  # here: imports FSDP2, see above
        return InvariantFSDPStrategy(cfg, env)
    if cfg.parallel.strategy == "fsdp":
        from phalanx.parallel.fsdp import FSDPStrategy  # imported here: see above
        return FSDPStrategy(cfg, env)
    if cfg.parallel.invariant:
        from phalanx.parallel.invariant import InvariantDDPStrategy  # here: as DDP's, only where it is used
        return InvariantDDPStrategy(cfg, env)
    from phalanx.parallel.ddp import DDPStrategy  # here too, beside the others
    return DDPStrategy(cfg, env)

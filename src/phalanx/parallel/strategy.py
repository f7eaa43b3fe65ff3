"""How the model is spread over the ranks. The loop talks to a Strategy only: DDP replicates the
model (ddp.py), FSDP2 shards it (fsdp.py).

    wrap           the module the loop trains (and compiles), from the plain model on its device
    averaged       the EMA of the weights, laid out like the model
    no_sync        the context of a micro-step's backward: skip the gradient reduction unless `sync`
    after_step     keep the ranks holding one model after each optimizer step
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
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from phalanx.errors import CheckpointError


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

    def model_state(self) -> dict[str, torch.Tensor]: ...

    def optim_state(self, optimizer: torch.optim.Optimizer) -> dict: ...

    def full_state(self, module: nn.Module) -> dict[str, torch.Tensor]: ...

    def load_full(self, module: nn.Module, sd: dict[str, torch.Tensor], source: Path) -> None: ...

    def load_optim_state(self, optimizer: torch.optim.Optimizer, sd: dict, source: Path) -> None: ...

    def memory(self, optimizer: torch.optim.Optimizer) -> dict[str, int]: ...


def build_strategy(cfg, env) -> Strategy:
    """The strategy `--parallel.strategy` names."""
    if cfg.parallel.strategy == "fsdp":
        from phalanx.parallel.fsdp import FSDPStrategy
        return FSDPStrategy(cfg, env)
    from phalanx.parallel.ddp import DDPStrategy
    return DDPStrategy(cfg, env)


# ----------------------------------------------------------------------------- shared by the strategies

def _local(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    from torch.distributed.tensor import DTensor
    return [t.to_local() if isinstance(t, DTensor) else t for t in tensors]


def averaged_model(model: nn.Module, decay: float) -> AveragedModel:
    """An EMA of `model`'s parameters and buffers. The update runs on each rank's own tensors: the
    sharded parameters' local shards (FSDP) and the replicated buffers alike, with no communication."""
    ema_fn = get_ema_multi_avg_fn(decay)

    def update(ema_list, model_list, n_averaged):
        ema_fn(_local(ema_list), _local(model_list), n_averaged)

    ema = AveragedModel(model, multi_avg_fn=update, use_buffers=True)
    # Its update count stays on the host: AveragedModel branches on it (`n_averaged == 0`) at every update,
    # which on a GPU would wait for the step to finish and on XLA would cut the traced step in two.
    ema.n_averaged = ema.n_averaged.cpu()
    return ema


def optim_state_by_name(model: nn.Module, optimizer: torch.optim.Optimizer, sd: dict, source: Path) -> dict:
    """torch's optimizer state_dict (parameters numbered in param_groups order) keyed by parameter name,
    as torch.distributed.checkpoint's state_dict API takes it."""
    names = {id(p): n for n, p in model.named_parameters()}
    order = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
    try:
        groups = [dict(g, params=[order[i] for i in g["params"]]) for g in sd["param_groups"]]
        state = {order[i]: v for i, v in sd["state"].items()}
    except (IndexError, KeyError, TypeError) as e:
        raise CheckpointError(f"{source}: optimizer state does not match the model ({type(e).__name__}: {e}); was "
                              f"it written by another model or optimizer?") from None
    return {"state": state, "param_groups": groups}


def local_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes this rank holds: parameters, their gradients (one per trainable parameter, as backward
    allocates them) and optimizer state, counting only this rank's shard of a sharded tensor."""
    def nbytes(t: torch.Tensor) -> int:
        t = _local([t])[0]
        return t.numel() * t.element_size()

    params = list(model.parameters())
    optim = sum(nbytes(v) for s in optimizer.state.values() for v in s.values()
                if isinstance(v, torch.Tensor) and v.dim() > 0)
    return {"param_bytes": sum(map(nbytes, params)),
            "grad_bytes": sum(nbytes(p) for p in params if p.requires_grad),
            "optim_bytes": optim}

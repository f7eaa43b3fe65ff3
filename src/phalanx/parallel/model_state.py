"""What both strategies (ddp.py, fsdp.py) do with a model's state: its EMA, the optimizer state by parameter
name, whether saved weights fit the model, and the bytes a rank holds."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
from torch.optim.swa_utils import AveragedModel

from phalanx.errors import CheckpointError


def _local(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    from torch.distributed.tensor import DTensor
    return [t.to_local() if isinstance(t, DTensor) else t for t in tensors]


class DeviceEMA(AveragedModel):
    """AveragedModel's EMA with its update count on the model's device and an update that never reads it.

    torch's `update_parameters` branches on the count (`bool(n_averaged == 0)`, `n_averaged > 0`): a host read
    that on a GPU waits for the step to finish, and on XLA cuts the traced step in two; with the count on the
    host instead, its `.to(device)` each step is a blocking copy. Here the first update (a copy) and the later
    ones (decay x ema + (1 - decay) x model) are one computation whose factors the device picks from the count:
    torch's values (to rounding), no host read, one graph for every step.
    The update runs on each rank's own tensors: the sharded parameters' local shards (FSDP) and the
    replicated buffers alike, with no communication.
    """

    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay {decay}: must be in [0, 1]")
        super().__init__(model, use_buffers=True)
        self.decay = decay
        first = next(iter(_local(list(model.parameters()) + list(model.buffers()))), None)
        if first is not None:
            self.n_averaged = self.n_averaged.to(first.device)
        self._lists: tuple | None = None  # (model, EMA floats, its floats, EMA integers, its integers)
        self._counted = False  # an update ran since the count was last set: it is >= 1, the factors are numbers

    def _tensor_lists(self, model: nn.Module) -> tuple:
        """The tensors an update reads and writes, found once per model: the module's parameters and buffers stay
        the same tensors from step to step (updated in place: the optimizer, the ranks' norm statistics), so the
        per-step walk of both modules, the local shards' lookup and the split by dtype are done here, once."""
        if self._lists is None or self._lists[0] is not model:
            ema = _local([*self.module.parameters(), *self.module.buffers()])
            cur = _local([t.detach() for t in (*model.parameters(), *model.buffers())])
            floats = [(e, c) for e, c in zip(ema, cur) if e.is_floating_point()]
            ints = [(e, c) for e, c in zip(ema, cur) if not e.is_floating_point()]
            self._lists = (model, [e for e, _ in floats], [c for _, c in floats], [e for e, _ in ints],
                           [c for _, c in ints])
        return self._lists

    def _load_from_state_dict(self, *args, **kwargs):  # a loaded count may be 0 again: the factors are chosen
        self._counted = False                           # on the device until the next update
        super()._load_from_state_dict(*args, **kwargs)

    @torch.no_grad()
    def update_parameters(self, model: nn.Module, steps: int = 1) -> None:
        """Take in `model` as `steps` updates with its current weights would: decay**steps (an update every
        k optimizer steps, `--ema_every`). Two foreach calls for the floating-point tensors, four for the integer
        ones, over lists built once (`_tensor_lists`)."""
        decay = self.decay ** steps
        _, ema_f, cur_f, ema_i, cur_i = self._tensor_lists(model)
        if self._counted:  # not the first update: the factors are (decay, 1 - decay), numbers (no device op)
            keep, take = decay, 1.0 - decay
        else:
            # ema = ema * keep + cur * take: (0, 1) the first time, a copy, (decay, 1 - decay) after; both factors
            # 0-dim tensors the device chooses from the count (no host read), equal to the numbers above after.
            first = self.n_averaged == 0
            keep = torch.where(first, 0.0, decay)
            take = torch.where(first, 1.0, 1.0 - decay)
        if ema_f:
            torch._foreach_mul_(ema_f, keep)
            torch._foreach_add_(ema_f, torch._foreach_mul(cur_f, take))
        if ema_i:  # BatchNorm's batch counts, as torch's EMA does them: in floating point, truncated back.
            torch._foreach_copy_(ema_i, torch._foreach_add(torch._foreach_mul(ema_i, keep),
                                                           torch._foreach_mul(cur_i, take)))
        self.n_averaged += 1
        self._counted = True


def averaged_model(model: nn.Module, decay: float) -> AveragedModel:
    """An EMA of `model`'s parameters and buffers whose update needs no host synchronisation (DeviceEMA)."""
    return DeviceEMA(model, decay)


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


def check_fits(module: torch.nn.Module, sd: dict[str, torch.Tensor], source: Path) -> None:
    """One CheckpointError line when the weights `sd` belong to another model (names or shapes);
    reads shapes only, so `module` may live on the meta device."""
    own = module.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    shapes = [f"{k}: {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in sd and sd[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        detail = "; ".join(filter(None, [
            f"missing {', '.join(missing[:3])}{'...' if len(missing) > 3 else ''}" if missing else "",
            f"unexpected {', '.join(unexpected[:3])}{'...' if len(unexpected) > 3 else ''}" if unexpected else "",
            f"shape {shapes[0]}" if shapes else ""]))
        raise CheckpointError(f"{source}: weights do not match the model ({detail}); "
                              f"was it written by another model or width?")


def load_into(module: torch.nn.Module, sd: dict[str, torch.Tensor], source: Path) -> None:
    """load_state_dict with one clear line when the weights belong to another model."""
    check_fits(module, sd, source)
    module.load_state_dict(sd)

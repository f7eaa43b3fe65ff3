"""Collectives Phalanx needs beyond DDP's gradient all-reduce: exact metric sums, one model on every rank."""
from __future__ import annotations

import hashlib

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.modules.batchnorm import _NormBase

from phalanx.runtime import hang


def _multi_rank() -> bool:
    return dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over all ranks in place (no-op for one process)."""
    if _multi_rank():
        hang.entered("all_reduce (sum)")
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_object(obj, src: int = 0):
    if _multi_rank():
        box = [obj]
        hang.entered("broadcast_object")
        dist.broadcast_object_list(box, src=src)
        return box[0]
    return obj


def barrier() -> None:
    if _multi_rank():
        hang.entered("barrier")
        dist.barrier()


# ----------------------------------------------------------------------------- one model on every rank

def norm_statistics(model: nn.Module) -> list[torch.Tensor]:
    """The running statistics each rank updates from its own shard: float buffers of BatchNorm-like
    layers (running mean and variance). SyncBatchNorm's are excluded: it keeps them in sync itself."""
    return [b for m in model.modules() if isinstance(m, _NormBase) and not isinstance(m, nn.SyncBatchNorm)
            for b in m.buffers(recurse=False) if b.is_floating_point()]


@torch.no_grad()
def average_across_ranks(tensors: list[torch.Tensor]) -> None:
    """Replace each tensor by its mean over the ranks, in place, with one all-reduce.

    Called after every optimizer step on the norm statistics (instead of DDP's broadcast of rank 0's
    buffers before each forward), so the ranks hold one model at every step: evaluation, checkpoints
    and the export see the same weights on every rank, and the result does not depend on when they
    happen. The sum is taken in float64: the mean of equal values is then exactly that value for any
    world size below 2**29, so averaging statistics that already agree changes nothing.
    """
    if not tensors or not _multi_rank():
        return
    flat = torch.cat([t.reshape(-1).to(torch.float64) for t in tensors])
    hang.entered("all_reduce (norm statistics)")
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= dist.get_world_size()
    offset = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[offset:offset + n].view_as(t))
        offset += n


def state_digest(model: nn.Module) -> str:
    """sha256 of the model's parameters and buffers (their bytes, in state_dict order), 16 hex digits.
    A sharded parameter (FSDP's DTensor) counts as its full value: collective then, on every rank."""
    from torch.distributed.tensor import DTensor
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        if isinstance(v, DTensor):
            v = v.full_tensor()
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def ranks_holding(model: nn.Module) -> list[str]:
    """Every rank's `state_digest` (one all-gather of short strings); equal entries = one model."""
    mine = state_digest(model)
    if not _multi_rank():
        return [mine]
    got: list = [None] * dist.get_world_size()
    hang.entered("all_gather_object (model digests)")
    dist.all_gather_object(got, mine)
    return got

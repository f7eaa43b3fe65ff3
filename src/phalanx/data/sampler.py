"""Global data order: which samples each rank trains on at each step.

The order of epoch e is one permutation of the whole training set, a function of (seed, e) alone.
Global batch k is the fixed slice [k*B, (k+1)*B) of it; micro-batch m of an accumulation step is a
fixed sub-slice; each rank takes a contiguous part of that. So 1, 2 or 3 ranks see the same
samples per step, a resume needs only (epoch, step), and there is no `set_epoch` to forget.
The incomplete tail of an epoch (N mod B samples, different ones each epoch) is not trained on,
so every step has the same global batch and no rank waits on another.
"""
from __future__ import annotations

import torch


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from several integers (splitmix-style; stable across runs and platforms)."""
    x = 0x9E3779B97F4A7C15
    for p in parts:
        x = (x ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        x ^= x >> 31
    return x & 0x7FFFFFFFFFFFFFFF


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(mix_seed(seed, epoch, 0x5A3F))
    return torch.randperm(n, generator=g)


def steps_per_epoch(n: int, global_batch: int) -> int:
    return n // global_batch


def shard_bounds(size: int, world: int, rank: int) -> tuple[int, int]:
    """Contiguous part of `size` items owned by `rank`; parts differ by at most one item."""
    return rank * size // world, (rank + 1) * size // world


def micro_batch_bounds(step: int, micro: int, global_batch: int, accum: int, world: int, rank: int
                       ) -> tuple[int, int, int]:
    """(start in the epoch permutation, this rank's offset within the micro-batch, its length)."""
    micro_size = global_batch // accum
    start = step * global_batch + micro * micro_size
    lo, hi = shard_bounds(micro_size, world, rank)
    return start, lo, hi - lo


class GlobalSampler:
    """Indices of this rank's part of every micro-batch of an epoch."""

    def __init__(self, n: int, global_batch: int, seed: int, world: int = 1, rank: int = 0, accum: int = 1):
        if global_batch > n:
            raise ValueError(f"global_batch={global_batch} is larger than the {n} training images")
        self.n, self.global_batch, self.seed, self.world, self.rank, self.accum = n, global_batch, seed, world, rank, accum
        self.steps = steps_per_epoch(n, global_batch)

    def epoch(self, epoch: int, start_step: int = 0):
        """Yield (step, micro, indices) from `start_step` on."""
        perm = epoch_permutation(self.n, self.seed, epoch)
        for step in range(start_step, self.steps):
            for micro in range(self.accum):
                start, lo, length = micro_batch_bounds(step, micro, self.global_batch, self.accum, self.world,
                                                       self.rank)
                yield step, micro, perm[start + lo: start + lo + length]

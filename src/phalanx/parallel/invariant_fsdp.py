"""World-size-invariant FSDP2 (`--parallel.invariant true --parallel.strategy fsdp`): the weights of
invariant DDP (parallel/invariant.py), bit for bit, with parameters, gradients and optimizer state sharded.

    each micro-batch j (rank r holds j = m*W + r): forward and backward as under FSDP2 (parameters all-gathered,
        exact copies), then FSDP2's reduce-scatter of the unit's flat gradient, replaced by `FixedOrderReduceScatter`:
        an all_to_all hands rank s chunk s of every rank's micro-batch gradient, kept apart, and FSDP2 is handed
        zeros (its sharded .grad then holds 0 + ... + 0)
    after the step's last micro-batch: rank s sums its chunks of g_0 .. g_{M-1} in `summation_order(M)` (the one
        pairwise tree of invariant DDP) and hands FSDP2 that sum as the last reduce-scatter's output (0 + x = x)
    norm statistics: `MicroBatchCombiner` without gradients (the same tree); gradient clipping: the fixed-order norm

Each element's gradient is the same chain of additions over the same M values as under invariant DDP, whichever
rank holds its shard; the optimizer and the EMA are elementwise, so a shard of the update is the update of the
shard. Parameters are kept fp32 by FSDP2 (autocast casts them, as under DDP): FSDP2's bf16 parameter policy would
compute other bits than the one-rank model, which trains unwrapped. Hybrid sharding is refused (its all-reduce
across replica groups sums in an order of its own).

The price: one all_to_all of the whole gradient per micro-batch instead of one reduce-scatter per step (M/W times
FSDP2's reduce-scatter bytes), and each rank keeps its chunk of the M micro-batch gradients until the step's end.
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy
from torch.distributed.tensor import DTensor

from phalanx.config import Config
from phalanx.errors import ConfigError
from phalanx.parallel.fsdp import FSDPStrategy
from phalanx.parallel.invariant import (
    MicroBatchCombiner,
    clip_by_norm_,
    fixed_order_norm,
    fixed_order_sum,
    same_arithmetic_on_every_rank,
    summation_order,
    tracked_norms,
)
from phalanx.runtime.dist import DistEnv


class MicroStep:
    """Which micro-batch of the step the ranks are in (set by the strategy's `no_sync`, read by the reduce-scatters)."""

    def __init__(self):
        self.index, self.last = 0, False


class FixedOrderReduceScatter:
    """FSDP2's reduce-scatter for one shard unit (FSDPModule.set_custom_reduce_scatter), summing in the fixed tree.

    FSDP2 calls it once per micro-batch with the unit's flat gradient (chunk s: the part of every parameter that
    rank s holds) and adds what it writes into `output_tensor` to the sharded .grad. It ignores FSDP2's `op`
    (the divide factor is set to 1: the loss is already sum / global batch)."""

    def __init__(self, step: MicroStep, count: int, world: int):
        self.step, self.count, self.world = step, count, world
        self.chunks: list[torch.Tensor] = []  # [m]: (W, S), row r = rank r's micro-batch m*W + r, my chunk

    def allocate(self, size, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return torch.empty(*size, dtype=dtype, device=device)

    @torch.no_grad()
    def __call__(self, output_tensor: torch.Tensor, input_tensor: torch.Tensor, group, op=None, async_op=False):
        w = self.world
        if self.step.index != len(self.chunks):
            raise RuntimeError(f"invariant fsdp: micro-batch {self.step.index} of the step, but {len(self.chunks)} "
                               f"gradients kept for this unit (a unit without gradients in some micro-batches?)")
        send = input_tensor.view(w, -1)
        if self.chunks and self.chunks[0].shape != send.shape:
            raise RuntimeError("invariant fsdp: a unit's gradient changed size between micro-batches (parameters "
                               "unused by some micro-batches are not supported)")
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=group)
        self.chunks.append(recv)
        if not self.step.last:
            output_tensor.zero_()
            return None
        parts = [self.chunks[j // w][j % w] for j in summation_order(self.count)]
        output_tensor.copy_(fixed_order_sum(parts))
        self.chunks = []
        return None


class InvariantFSDPStrategy(FSDPStrategy):
    """FSDP2 whose gradient sum, norm statistics and gradient norm are those of invariant DDP."""

    def __init__(self, cfg: Config, env: DistEnv):
        super().__init__(cfg, env)
        self.count = cfg.global_batch // cfg.parallel.micro_batch
        self.step = MicroStep()
        self.comms: list[FixedOrderReduceScatter] = []
        self.combiner: MicroBatchCombiner | None = None
        self._param_rows: list[tuple[nn.Parameter, int]] = []
        self._rows = 0

    def wrap(self, model: nn.Module) -> nn.Module:
        cfg, env = self.cfg, self.env
        if env.distributed and not hasattr(FSDPModule, "set_custom_reduce_scatter"):
            raise ConfigError(f"--parallel.invariant true with --parallel.strategy fsdp needs FSDP2's custom "
                              f"reduce-scatter (torch {torch.__version__} has none); use --parallel.strategy ddp")
        same_arithmetic_on_every_rank(cfg, env)
        wrapped = super().wrap(model)
        # Rows of each parameter in the fixed-order gradient norm, in parameter order (FSDP2 keeps it; a sharded
        # parameter is a DTensor whose shape is the whole tensor's).
        for p in self.plain.parameters():
            self._param_rows.append((p, self._rows))
            self._rows += p.shape[0] if p.dim() else 1
        world, rank = env.world, env.rank
        if not env.distributed:  # one rank trains unwrapped: invariant DDP's combiner, gradients included
            self.combiner = MicroBatchCombiner(self.plain, self.count, 1, 0)
            return wrapped
        for module in self.plain.modules():
            if isinstance(module, FSDPModule):
                comm = FixedOrderReduceScatter(self.step, self.count, world)
                module.set_custom_reduce_scatter(comm)
                module.set_gradient_divide_factor(1.0)
                self.comms.append(comm)
        if tracked_norms(self.plain):
            self.combiner = MicroBatchCombiner(self.plain, self.count, world, rank, grads=False)
        return wrapped

    def _mixed_precision(self) -> MixedPrecisionPolicy:
        """fp32 parameters (autocast casts them for compute, as it does for DDP and for one rank)."""
        if self.env.accel.autocast_dtype(self.cfg.precision) == torch.float16:
            return super()._mixed_precision()  # refused there, in one line
        return MixedPrecisionPolicy()

    @contextlib.contextmanager
    def no_sync(self, sync: bool):
        """Every micro-batch's gradient goes through the fixed-order reduce-scatter (FSDP2 always syncs); the sum
        is handed over on the step's last (`sync`)."""
        self.step.last = sync
        stats = self.combiner.micro_batch(last=sync) if self.combiner is not None else contextlib.nullcontext()
        with stats:
            yield
        self.step.index = 0 if sync else self.step.index + 1

    def after_step(self) -> None:
        """Nothing to agree on: every rank combined the same norm statistics in the same order."""

    @torch.no_grad()
    def clip_gradients(self, max_norm: float) -> None:
        """Clip by the fixed-order norm of invariant DDP, from each rank's rows of the sharded gradients."""
        world, rank = self.env.world, self.env.rank
        parts, grads = [], []
        for p, first in self._param_rows:
            g = p.grad
            if g is None:
                continue
            if isinstance(g, DTensor):  # FSDP2 shards dim 0 as torch.chunk does: rank r holds rows r*c .. r*c+n-1
                g = g.to_local()
                first += min(rank * math.ceil(p.shape[0] / world), p.shape[0])
            parts.append((g, first))
            grads.append(g)
        total = fixed_order_norm(parts, self._rows, self.env.device, sum_over_ranks=self.env.distributed)
        clip_by_norm_(grads, total, max_norm)

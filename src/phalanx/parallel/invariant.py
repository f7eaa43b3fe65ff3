"""World-size-invariant data parallelism (`--parallel.invariant true`): the same weights, bit for bit, at every
world size W that divides the micro-batch count M.

    global batch of B images -> M = B / micro_batch micro-batches, j = 0..M-1 (fixed slices of the global batch)
    rank r holds j = m*W + r, m = 0..M/W-1 (the sampler's accumulation layout with M/W micro-steps per rank)
    each micro-batch: forward + backward alone, one intra-op thread, BatchNorm over the micro-batch (a ghost
        batch) -> its gradient g_j (loss sum / B) and batch statistics s_j in slot m of this rank, nothing summed
    after the last, the sum of g_0..g_{M-1} (and of s_j) as one pairwise tree whose leaves are the indices in
    `summation_order(M)`:
      M a power of two: the order is bit-reversed, so rank r's micro-batches (j = r mod W) are one subtree of it:
        each rank adds its own (a subtree), all_to_all gives rank s slice s of every rank's partial sum, rank s
        adds them (the top of the tree) and all_gather hands the sums round: DDP's bytes on the wire
      otherwise: all_to_all gives rank s slice s of every g_j; it sums them in the order 0..M-1; all_gather

Why this is exact: g_j depends only on the weights, the micro-batch and the thread count, never on which rank
computed it, and every sum is a chain of elementwise additions whose order is a function of M alone (elementwise
IEEE additions are exact functions of their operands: no kernel splits them by threads). The weights, optimizer
state, EMA and norm statistics therefore agree on every rank and for every W. DDP is not used: its bucketed
ring all-reduce sums in an order that depends on W.

BatchNorm's running statistics, per step: mean_s = (s_0 + ... + s_{M-1}) / M in the same fixed tree, then
torch's own update once: running = (1 - momentum) * running + momentum * mean_s (momentum None: the cumulative
average, 1 / num_batches_tracked), and num_batches_tracked += 1. To read s_j exactly, each layer's momentum is
kept at 1.0 during training and its buffers zeroed before each micro-batch's forward, which then leaves exactly
the micro-batch's statistics (mean, unbiased variance) in them; the layer's own momentum is applied here.
"""
from __future__ import annotations

import contextlib
import logging
import math

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.modules.batchnorm import _NormBase

from phalanx.config import Config, invariant_world_error
from phalanx.errors import ConfigError
from phalanx.parallel.ddp import DDPStrategy
from phalanx.runtime.dist import DistEnv

INVARIANT_THREADS = 1
"""Intra-op threads of every rank in invariant mode: a micro-batch's gradients differ in their last bits between
1 and 2 threads on the CPUs measured (oneDNN splits its reductions by thread), and 1 allows every world size."""


def micro_steps(cfg: Config, world: int) -> int:
    """Micro-batches each rank computes per optimizer step: M / W in invariant mode, else `grad_accum`."""
    if not cfg.parallel.invariant:
        return cfg.grad_accum
    count = cfg.global_batch // cfg.parallel.micro_batch
    why = invariant_world_error(cfg.global_batch, cfg.parallel.micro_batch, world)
    if why:  # a world the launcher could not check (--nproc auto, a user's torchrun)
        raise ConfigError(why)
    return count // world


def loss_scale(cfg: Config, world: int) -> float:
    """Factor of a micro-batch's loss sum: 1 / B when the gradients are summed (invariant), world / B when DDP
    averages them over the ranks."""
    return (1 if cfg.parallel.invariant else world) / cfg.global_batch


def is_power_of_two(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def bit_reversed(n: int) -> list[int]:
    """0..n-1 (n a power of two) in bit-reversed order: 8 -> [0, 4, 2, 6, 1, 5, 3, 7]. A pairwise tree over
    this order has, for every power of two W dividing n, the W sets {j : j = r mod W} as its subtrees."""
    bits = n.bit_length() - 1
    return [int(format(i, f"0{bits}b")[::-1], 2) if bits else 0 for i in range(n)]


def summation_order(count: int) -> list[int]:
    """The leaves of the one fixed tree in which micro-batches 0..count-1 are summed, whatever the world size."""
    return bit_reversed(count) if is_power_of_two(count) else list(range(count))


def fixed_order_sum(parts: list[torch.Tensor]) -> torch.Tensor:
    """parts[0] + ... + parts[n-1] as one fixed pairwise tree over the indices, ((p0 + p1) + (p2 + p3)) + ...:
    elementwise additions only, so each element of the result is a function of the n values and of n alone,
    whichever process holds them and however many threads it runs. Returns a new tensor."""
    if not parts:
        raise ValueError("fixed_order_sum of no tensors")
    level = list(parts)
    while len(level) > 1:
        pairs = [level[i] + level[i + 1] for i in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            pairs.append(level[-1])
        level = pairs
    return level[0].clone() if len(parts) == 1 else level[0]


def pairwise_row_sums(x: torch.Tensor) -> torch.Tensor:
    """Each row of a 2-D tensor summed as one fixed pairwise tree over its columns (the tree of `fixed_order_sum`):
    elementwise additions only, so a row's sum is the same whether it is a row of a whole tensor or of a shard."""
    while x.shape[1] > 1:
        even = x.shape[1] - x.shape[1] % 2
        pairs = x[:, 0:even:2] + x[:, 1:even:2]
        x = torch.cat([pairs, x[:, even:]], dim=1) if even < x.shape[1] else pairs
    return x[:, 0]


def row_square_sums(grad: torch.Tensor) -> torch.Tensor:
    """The sum of squares of each dim-0 row of a gradient (one value for a scalar), in the fixed tree."""
    g = grad.detach().float()
    rows = g.shape[0] if g.dim() else 1
    if g.numel() == 0:
        return torch.zeros(rows, dtype=torch.float32, device=g.device)
    g = g.reshape(rows, -1)
    return pairwise_row_sums(g * g)


def fixed_order_norm(parts: list[tuple[torch.Tensor | None, int]], rows: int, device: torch.device,
                     sum_over_ranks: bool = False) -> torch.Tensor:
    """The L2 norm of all gradients as sqrt of one fixed pairwise tree over every dim-0 row of every parameter
    (in parameter order), from `parts` = (this rank's gradient rows or None, the global index of its first row).

    torch's clip_grad_norm_ takes a norm per tensor with a reduction kernel whose order follows the tensor's
    shape, so a shard's norm is not a part of the whole tensor's. Here every row is summed in a fixed tree, and a
    row lies whole on one rank: with `sum_over_ranks` each rank fills only its own rows and an all_reduce of
    vectors with disjoint non-zero entries is exact (x + 0 = x), so every world size gets the same bits."""
    vec = torch.zeros(rows, dtype=torch.float32, device=device)
    for grad, first in parts:
        if grad is not None:
            sums = row_square_sums(grad)
            vec[first:first + sums.numel()] = sums
    if sum_over_ranks:
        dist.all_reduce(vec)
    return pairwise_row_sums(vec.view(1, -1))[0].sqrt()


def clip_by_norm_(grads: list[torch.Tensor], total: torch.Tensor, max_norm: float) -> None:
    """torch's clip_grad_norm_ scaling (max_norm / (total + 1e-6), at most 1) with a given norm: elementwise."""
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(coef.to(g.dtype))


def tracked_norms(model: nn.Module) -> list[_NormBase]:
    """The BatchNorm-like layers that keep running statistics."""
    return [m for m in model.modules()
            if isinstance(m, _NormBase) and m.track_running_stats and m.running_mean is not None]


class MicroBatchCombiner:
    """Keeps each micro-batch's gradient and norm statistics apart, then combines them in the fixed order.

    One row per local micro-batch: [flattened gradients of every trainable parameter | running mean and variance
    of every tracked norm layer | padding to a multiple of W]; row m of rank r is micro-batch j = m*W + r.
    With M a power of two each rank first adds its rows (its subtree of the bit-reversed tree), and only that
    partial sum is exchanged.
    """

    def __init__(self, model: nn.Module, count: int, world: int, rank: int, grads: bool = True):
        """`grads=False`: the norm statistics only (FSDP sums the gradients through its own reduce-scatter)."""
        if count % world:
            raise ValueError(f"{count} micro-batches cannot be shared by {world} ranks")
        self.count, self.world, self.rank, self.local = count, world, rank, count // world
        self.params = [p for p in model.parameters() if p.requires_grad] if grads else []
        self.norms = tracked_norms(model)
        self.momenta = [m.momentum for m in self.norms]
        for m in self.norms:  # a forward now leaves exactly its batch's statistics (buffers zeroed before it)
            m.momentum = 1.0
        self.stats = [b for m in self.norms for b in (m.running_mean, m.running_var)]
        self.n_grad = sum(p.numel() for p in self.params)
        n = self.n_grad + sum(b.numel() for b in self.stats)
        self.slice = math.ceil(n / world)
        device = next((t.device for t in [*self.params, *self.stats]), torch.device("cpu"))
        self.rows = torch.zeros(self.local, self.slice * world, dtype=torch.float32, device=device)
        self.filled = 0
        self.before: list[torch.Tensor] = []  # the norm statistics before this step's first micro-batch
        self.tracked: list[torch.Tensor] = []  # and their batch counts (each forward adds one)
        self.bytes_sent = 0  # payload handed to collectives by this rank since construction

    @contextlib.contextmanager
    def micro_batch(self, last: bool):
        """The context of one micro-batch's forward and backward: on leaving, its gradient is put aside (and,
        after the last of the step, all are combined into every parameter's .grad)."""
        if self.filled == 0:
            self.before = [b.detach().clone() for b in self.stats]
            self.tracked = [m.num_batches_tracked.clone() for m in self.norms]
        with torch.no_grad():
            for b in self.stats:
                b.zero_()
        yield
        self._stash()
        if last:
            if self.filled != self.local:
                raise RuntimeError(f"invariant step: {self.filled} micro-batches on this rank, expected {self.local}")
            self._combine()

    @torch.no_grad()
    def _stash(self) -> None:
        row, off = self.rows[self.filled], 0
        for p in self.params:
            n = p.numel()
            if p.grad is None:  # not used by this forward
                row[off:off + n].zero_()
            else:
                row[off:off + n].copy_(p.grad.reshape(-1))
            # the next backward writes a fresh gradient rather than adding to this one in a layout-dependent order
            p.grad = None
            off += n
        for b in self.stats:
            row[off:off + b.numel()].copy_(b.reshape(-1))
            off += b.numel()
        self.filled += 1

    @torch.no_grad()
    def _combine(self) -> None:
        w, k, s = self.world, self.local, self.slice
        if is_power_of_two(self.count):  # then W and K are powers of two too
            # rank r's leaves j = m*W + r, m in bit_reversed(K), are the subtree of the tree over bit_reversed(M)
            # that holds the indices = r mod W; the tree's top W leaves are those subtrees in bit_reversed(W) order
            part = fixed_order_sum([self.rows[m] for m in bit_reversed(k)])
            if w > 1:
                recv = torch.empty_like(part).view(w, s)
                dist.all_to_all_single(recv, part.view(w, s))  # recv[r] = this rank's slice of rank r's sum
                mine = fixed_order_sum([recv[r] for r in bit_reversed(w)])
                total = torch.empty_like(part)
                dist.all_gather_into_tensor(total, mine)
                self.bytes_sent += 2 * (w - 1) * s * part.element_size()
            else:
                total = part
        elif w > 1:
            # send[d, m] = slice d of local row m; recv[r, m] = this rank's slice of rank r's row m (j = m*W + r)
            send = self.rows.view(k, w, s).transpose(0, 1).contiguous()
            recv = torch.empty_like(send)
            dist.all_to_all_single(recv, send)
            mine = fixed_order_sum([recv[j % w, j // w] for j in range(self.count)])
            total = torch.empty(w * s, dtype=mine.dtype, device=mine.device)
            dist.all_gather_into_tensor(total, mine)
            self.bytes_sent += (send.numel() - k * s + (w - 1) * s) * send.element_size()  # to the other ranks
        else:
            total = fixed_order_sum([self.rows[j] for j in range(self.count)])
        off = 0
        for p in self.params:
            n = p.numel()
            p.grad = total[off:off + n].view(p.shape).to(p.dtype)
            off += n
        i = 0
        for m, momentum, tracked in zip(self.norms, self.momenta, self.tracked):
            m.num_batches_tracked.copy_(tracked + 1)  # one update per step, whatever M is
            f = 1.0 / float(m.num_batches_tracked) if momentum is None else momentum
            for b in (m.running_mean, m.running_var):
                mean = total[off:off + b.numel()].view(b.shape) / self.count
                b.copy_((1.0 - f) * self.before[i] + f * mean)
                i, off = i + 1, off + b.numel()
        self.filled = 0


def same_arithmetic_on_every_rank(cfg: Config, env: DistEnv) -> None:
    """One intra-op thread on CPU; deterministic kernels on GPUs (torch's error, rather than other bits, where an
    op has none). Untested on GPUs so far."""
    if env.accel.kind == "cpu" and torch.get_num_threads() != INVARIANT_THREADS:
        logging.getLogger("phalanx").info(
            f"invariant training: {INVARIANT_THREADS} intra-op thread per rank (not {torch.get_num_threads()}): "
            f"a micro-batch's gradients must not depend on the thread count")
        torch.set_num_threads(INVARIANT_THREADS)
        env.threads = INVARIANT_THREADS
    if env.accel.kind != "cpu":
        env.accel.configure_training(deterministic=True, tf32=cfg.tf32)
        torch.use_deterministic_algorithms(True)


class InvariantDDPStrategy(DDPStrategy):
    """Replicated like DDP, with the gradient sum of `MicroBatchCombiner` in place of DDP's all-reduce."""

    def __init__(self, cfg: Config, env: DistEnv):
        super().__init__(cfg, env)
        self.combiner: MicroBatchCombiner | None = None

    def wrap(self, model: nn.Module) -> nn.Module:
        cfg, env = self.cfg, self.env
        same_arithmetic_on_every_rank(cfg, env)
        model = model.to(env.device)
        if cfg.model.channels_last:
            model = model.to(memory_format=torch.channels_last)
        if env.distributed:  # as DDP's constructor does: every rank starts from rank 0's weights and buffers
            with torch.no_grad():
                for t in [*model.parameters(), *model.buffers()]:
                    dist.broadcast(t.data, src=0)
        self.plain = model
        count = cfg.global_batch // cfg.parallel.micro_batch
        self.combiner = MicroBatchCombiner(model, count, env.world, env.rank)
        if cfg.model.compile:
            model = torch.compile(model, mode=cfg.model.compile_mode)
        return model

    def no_sync(self, sync: bool):
        """Each micro-batch's gradient is kept apart; after the last of the step (`sync`) they are summed in the
        fixed order on every rank (the all_to_all and all_gather run here)."""
        return self.combiner.micro_batch(last=sync)

    @torch.no_grad()
    def clip_gradients(self, max_norm: float) -> None:
        """Clip by the fixed-order norm (every rank holds every whole gradient: no communication)."""
        parts, rows = [], 0
        for p in self.plain.parameters():
            parts.append((p.grad, rows))
            rows += p.shape[0] if p.dim() else 1
        total = fixed_order_norm(parts, rows, self.env.device)
        clip_by_norm_([p.grad for p in self.plain.parameters() if p.grad is not None], total, max_norm)

    def after_step(self) -> None:
        """Nothing to agree on: every rank computed the same sums, statistics included."""

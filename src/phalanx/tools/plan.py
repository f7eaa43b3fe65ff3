"""The scaling model behind `phalanx bench plan` (commands/bench.py): step time, communication share and memory
per rank of DDP, FSDP, HSDP and DDP with PyTorch's gradient-compression hooks (bf16, PowerSGD) on N GPUs per node
and M nodes, predicted from the measured compute of one step, the model's parameter shapes and the alpha-beta cost
of ring and tree collectives. Everything above `measure_workload` is pure arithmetic (tests/unit/tools/test_plan.py
checks it against numbers worked by hand).

Cost of a collective over p ranks, payload n bytes, on a link of bandwidth B (bytes/s) and latency a (s):
    all-reduce, ring      2(p-1)/p * n/B + 2(p-1) * a
    all-reduce, tree      2 * n/B + 2 * ceil(log2 p) * a        (pipelined double binary tree)
    all-gather / reduce-scatter, ring      (p-1)/p * n/B + (p-1) * a     (n: the full, unsharded size)
A collective over ranks of several nodes runs at the slower of the two links (`--link` is what one node has to
the network, shared by its ranks) with the larger latency; one within a node runs on the node's link
(`--intra-link`, e.g. NVLink). Each DDP bucket is a separate all-reduce and pays the latency again.

Assumptions, stated where the table prints them: compute per rank is the one-device compute of the global batch
divided by the ranks (linear in the batch); communication overlaps the backward pass (and FSDP's forward gathers the
forward pass) up to `overlap` of it, except DDP's last bucket, which cannot; the compression hooks' own arithmetic
(casts, PowerSGD's matmuls and orthogonalisation) is not counted; memory is weights, gradients, optimizer state,
activations and what each strategy adds (gathered FSDP units, compression buffers), not the allocator's slack.
"""
from __future__ import annotations

import math
import re
import time
from dataclasses import asdict, dataclass, field

GiB = 2 ** 30
STRATEGIES = ("ddp", "ddp_bf16", "ddp_powersgd", "fsdp", "hsdp")


# ----------------------------------------------------------------------------------------------- links and costs

@dataclass(frozen=True)
class Link:
    bytes_per_s: float
    latency_s: float


_UNITS = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}


def parse_rate(text: str) -> float:
    """Bytes per second from '100Gb/s', '100Gbit/s', '400Gbps' (bits) or '25GB/s', '900 GB/s' (bytes); raises
    ValueError naming the forms it takes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([kKmMgGtT]?)(B|b|bit|bits|Byte|Bytes)?"
                     r"(?:/s|ps)\s*", text)
    if not m or float(m.group(1)) <= 0:
        raise ValueError(f"{text!r}: give a bandwidth such as 100Gb/s (bits) or 25GB/s (bytes)")
    value, prefix, unit = float(m.group(1)), m.group(2).lower(), m.group(3) or "b"
    scale = _UNITS[prefix] / (1 if unit.startswith("B") else 8)
    return value * scale


def ring_allreduce_s(n: float, p: int, link: Link, calls: int = 1) -> float:
    """Seconds for a ring all-reduce of n bytes (in `calls` collectives) over p ranks."""
    if p <= 1 or n <= 0:
        return 0.0
    return 2 * (p - 1) / p * n / link.bytes_per_s + calls * 2 * (p - 1) * link.latency_s


def tree_allreduce_s(n: float, p: int, link: Link, calls: int = 1) -> float:
    """Seconds for a (pipelined, double binary) tree all-reduce of n bytes over p ranks."""
    if p <= 1 or n <= 0:
        return 0.0
    return 2 * n / link.bytes_per_s + calls * 2 * math.ceil(math.log2(p)) * link.latency_s


def allreduce_s(n: float, p: int, link: Link, calls: int = 1) -> float:
    """The faster of ring and tree, as NCCL picks (ring for large payloads, tree for many ranks and small ones)."""
    return min(ring_allreduce_s(n, p, link, calls), tree_allreduce_s(n, p, link, calls))


def allgather_s(n: float, p: int, link: Link, calls: int = 1) -> float:
    """Seconds for a ring all-gather (or reduce-scatter) whose full, unsharded size is n bytes."""
    if p <= 1 or n <= 0:
        return 0.0
    return (p - 1) / p * n / link.bytes_per_s + calls * (p - 1) * link.latency_s


@dataclass(frozen=True)
class Cluster:
    gpus_per_node: int
    nodes: int
    inter: Link
    """What one node has to the network (all its ranks share it)."""
    intra: Link
    """Between the ranks of one node (NVLink; loopback on a CPU machine)."""

    @property
    def world(self) -> int:
        return self.gpus_per_node * self.nodes

    def flat(self) -> Link:
        """The link a collective over every rank runs at: the slower link, the larger latency."""
        if self.nodes == 1:
            return self.intra
        return Link(min(self.inter.bytes_per_s, self.intra.bytes_per_s),
                    max(self.inter.latency_s, self.intra.latency_s))


# ----------------------------------------------------------------------------------------------- the workload

@dataclass(frozen=True)
class Workload:
    shapes: tuple[tuple[int, ...], ...]
    """Every parameter's shape, in the order DDP buckets them (the model's parameters reversed)."""
    compute_s: float
    """Forward + backward of the whole global batch on one device."""
    optim_s: float = 0.0
    """The optimizer step over the whole model on one device."""
    activation_bytes: float = 0.0
    """Activations saved for backward for the whole global batch (one device)."""
    backward_frac: float = 2 / 3
    """The share of `compute_s` in the backward pass."""
    optim_state_per_param: int = 4
    """Bytes of optimizer state per fp32 parameter: SGD with momentum 4, AdamW 8."""
    param_gather_bytes: int = 4
    """Bytes per parameter FSDP gathers: 2 with bf16 parameters for compute, else 4."""
    unit_params: tuple[int, ...] = ()
    """Parameters of each FSDP shard unit (empty: one unit, the whole model)."""

    @property
    def params(self) -> int:
        return sum(math.prod(s) for s in self.shapes)

    @property
    def grad_bytes(self) -> int:
        return 4 * self.params


@dataclass(frozen=True)
class Options:
    overlap: float = 1.0
    """Share of the backward (forward) pass that communication can hide behind (0: none, 1: all of it)."""
    bucket_bytes: float = 25 * 2 ** 20
    powersgd_rank: int = 1
    min_compression_rate: float = 2.0
    """PowerSGD's own rule: compress a layer only when (n+m)r * this < n*m."""
    reshard_after_forward: bool = True


@dataclass
class Row:
    strategy: str
    step_ms: float
    comm_ms: float
    """All communication of a step, overlapped or not."""
    exposed_ms: float
    """What the step waits for."""
    comm_share: float
    """exposed / step."""
    memory_gib: float
    bytes_per_rank: float
    """Payload handed to collectives per step and rank (all-reduce input; full size of gathers and scatters)."""
    note: str = ""
    parts: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------- PowerSGD bytes

def powersgd_layer(shape: tuple[int, ...], rank: int, min_rate: float = 2.0) -> tuple[bool, int]:
    """(compressed?, numbers sent) for one gradient under torch's powerSGD_hook: viewed as n x (prod of the
    rest), compressed to P (n x r) and Q (m x r), r = min(n, m, rank), when (n+m)r * min_rate < n*m."""
    n = shape[0] if shape else 1
    m = math.prod(shape[1:]) if len(shape) > 1 else 1
    r = min(n, m, rank)
    if (n + m) * r * min_rate < n * m:
        return True, (n + m) * r
    return False, n * m


def powersgd_bytes(shapes, rank: int, min_rate: float = 2.0) -> dict:
    """fp32 bytes one rank all-reduces per step with PowerSGD: the P and Q factors of the compressed layers and the
    rest uncompressed; and the hook's memory (error feedback: a copy of every gradient; warm start: P and Q)."""
    compressed = plain = n_layers = 0
    for s in shapes:
        yes, numbers = powersgd_layer(tuple(s), rank, min_rate)
        if yes:
            compressed += numbers
            n_layers += 1
        else:
            plain += numbers
    total = sum(math.prod(s) for s in shapes)
    return {"bytes": 4 * (compressed + plain), "factor_bytes": 4 * compressed, "uncompressed_bytes": 4 * plain,
            "compressed_layers": n_layers, "memory_bytes": 4 * total + 4 * compressed}


def buckets(grad_bytes: float, bucket_bytes: float) -> int:
    return max(1, math.ceil(grad_bytes / bucket_bytes))


# ----------------------------------------------------------------------------------------------- strategies

def _exposed(comm: float, hide_behind: float, overlap: float, floor: float = 0.0) -> float:
    """What a step waits for of `comm` seconds that may overlap `overlap` of `hide_behind` seconds of compute;
    never less than `floor` (what must follow the last computation)."""
    return max(min(comm, floor), comm - overlap * hide_behind)


def _row(name, w: Workload, compute, optim, comm, exposed, memory, sent, note, **parts) -> Row:
    step = compute + optim + exposed
    return Row(name, 1e3 * step, 1e3 * comm, 1e3 * exposed, exposed / step if step > 0 else 0.0, memory / GiB,
               sent, note, {k: round(v * 1e3, 4) if isinstance(v, float) else v for k, v in parts.items()})


def plan_ddp(w: Workload, c: Cluster, o: Options, compression: str = "none") -> Row:
    """DDP: every rank holds everything; gradients all-reduced in buckets during backward, optionally compressed
    by PyTorch's bf16 or PowerSGD hook."""
    p = c.world
    compute = w.compute_s / p
    state = 4 * w.params + w.grad_bytes + w.optim_state_per_param * w.params  # weights, grads (= buckets), optimizer
    memory = state + w.activation_bytes / p
    n_buckets = buckets(w.grad_bytes, o.bucket_bytes)
    last = min(o.bucket_bytes, w.grad_bytes)
    if compression == "none":
        sent, calls, note = w.grad_bytes, n_buckets, "fp32 gradients"
    elif compression == "bf16":
        sent, calls, last = w.grad_bytes / 2, n_buckets, last / 2
        memory += w.grad_bytes / 2  # the bf16 copies of the buckets in flight
        note = "bf16 hook: half the bytes; the sum rounded to bf16"
    elif compression == "powersgd":
        ps = powersgd_bytes(w.shapes, o.powersgd_rank, o.min_compression_rate)
        sent, calls = ps["bytes"], 3 * n_buckets  # per bucket: the uncompressed part, then P, then Q
        last = sent / n_buckets
        memory += ps["memory_bytes"]
        note = (f"PowerSGD r={o.powersgd_rank}: {ps['compressed_layers']} of {len(w.shapes)} tensors compressed, "
                f"{w.grad_bytes / max(sent, 1):.1f}x fewer bytes; its matmuls not counted")
    else:
        raise ValueError(f"unknown compression {compression!r}")
    link = c.flat()
    comm = allreduce_s(sent, p, link, calls)
    floor = allreduce_s(last, p, link, 3 if compression == "powersgd" else 1)
    exposed = _exposed(comm, w.backward_frac * compute, o.overlap, floor)
    name = "ddp" if compression == "none" else f"ddp_{compression}"
    return _row(name, w, compute, w.optim_s, comm, exposed, memory, sent, note, allreduce=comm)


def _fsdp_costs(w: Workload, shard: int, link: Link, o: Options) -> tuple[float, float, float, float]:
    """(all-gather forward, all-gather backward, reduce-scatter, bytes) of FSDP over `shard` ranks on `link`."""
    units = max(1, len(w.unit_params) + 1)  # the units and the root
    gathered = w.param_gather_bytes * w.params
    ag_fwd = allgather_s(gathered, shard, link, units)
    ag_bwd = ag_fwd if o.reshard_after_forward else 0.0
    rs = allgather_s(w.grad_bytes, shard, link, units)  # reduce-scatter: the same cost as an all-gather
    sent = gathered * (2 if o.reshard_after_forward else 1) + w.grad_bytes
    return ag_fwd, ag_bwd, rs, sent if shard > 1 else 0


def _fsdp_memory(w: Workload, shard: int, p: int) -> float:
    """Sharded weights, gradients and optimizer state; the largest unit gathered twice (this one and the
    prefetched next) in the gather dtype; this rank's activations."""
    state = (4 * w.params + w.grad_bytes + w.optim_state_per_param * w.params) / shard
    unit = max(w.unit_params) if w.unit_params else w.params
    gathered = 2 * w.param_gather_bytes * unit if shard > 1 else 0
    return state + gathered + w.activation_bytes / p


def plan_fsdp(w: Workload, c: Cluster, o: Options) -> Row:
    """FSDP over every rank: parameters gathered for forward (and again for backward when resharded),
    gradients reduce-scattered; the optimizer steps on the shard."""
    p = c.world
    compute = w.compute_s / p
    ag_fwd, ag_bwd, rs, sent = _fsdp_costs(w, p, c.flat(), o)
    fwd = (1 - w.backward_frac) * compute
    exposed = _exposed(ag_fwd, fwd, o.overlap) + _exposed(ag_bwd + rs, w.backward_frac * compute, o.overlap)
    note = "sharded over all ranks" + ("" if o.reshard_after_forward else ", gathered once (no reshard)")
    return _row("fsdp", w, compute, w.optim_s / p, ag_fwd + ag_bwd + rs, exposed, _fsdp_memory(w, p, p), sent,
                note, allgather_fwd=ag_fwd, allgather_bwd=ag_bwd, reduce_scatter=rs)


def plan_hsdp(w: Workload, c: Cluster, o: Options) -> Row:
    """HSDP: FSDP within each node (its intra-node link), and each rank's gradient shard all-reduced with its peers
    on the other nodes; a node's ranks share its network link, so together they move the whole gradient."""
    p, g, m = c.world, c.gpus_per_node, c.nodes
    compute = w.compute_s / p
    ag_fwd, ag_bwd, rs, sent = _fsdp_costs(w, g, c.intra, o)
    # g concurrent all-reduces of n/g bytes share the node's link: the bandwidth term of one of n bytes.
    inter = Link(c.inter.bytes_per_s / g, c.inter.latency_s) if m > 1 else c.inter
    across = allreduce_s(w.grad_bytes / g, m, inter, max(1, len(w.unit_params) + 1))
    sent += w.grad_bytes / g if m > 1 else 0
    fwd = (1 - w.backward_frac) * compute
    exposed = _exposed(ag_fwd, fwd, o.overlap) + _exposed(ag_bwd + rs + across, w.backward_frac * compute,
                                                          o.overlap)
    note = (f"sharded within a node ({g}), replicated across {m} nodes" if m > 1 and g > 1 else
            "one node: the same as FSDP" if m == 1 else "one rank per node: the same as DDP, in units")
    return _row("hsdp", w, compute, w.optim_s / g, ag_fwd + ag_bwd + rs + across, exposed, _fsdp_memory(w, g, p),
                sent, note, allgather_fwd=ag_fwd, allgather_bwd=ag_bwd, reduce_scatter=rs, allreduce_nodes=across)


def plan(w: Workload, c: Cluster, o: Options = Options()) -> list[Row]:
    """One row per strategy: DDP, DDP with the bf16 and PowerSGD hooks, FSDP, HSDP."""
    return [plan_ddp(w, c, o), plan_ddp(w, c, o, "bf16"), plan_ddp(w, c, o, "powersgd"), plan_fsdp(w, c, o),
            plan_hsdp(w, c, o)]


def table(rows: list[Row], c: Cluster, w: Workload, o: Options) -> str:
    """The plan as printed: a header naming the cluster and the assumptions, then one line per strategy."""
    head = (f"{c.nodes} node(s) x {c.gpus_per_node} GPU(s) = {c.world} ranks; network {c.inter.bytes_per_s / 1e9:.2f}"
            f" GB/s per node, {c.inter.latency_s * 1e6:.1f} us; within a node {c.intra.bytes_per_s / 1e9:.2f} GB/s, "
            f"{c.intra.latency_s * 1e6:.1f} us\nmodel: {w.params:,d} parameters ({w.grad_bytes / 2**20:.2f} MiB of "
            f"fp32 gradients); compute {w.compute_s * 1e3:.2f} ms per global batch on one device -> "
            f"{w.compute_s * 1e3 / c.world:.3f} ms per rank; overlap with backward {o.overlap:.0%}")
    lines = [head, f"{'strategy':<13} {'step ms':>9} {'comm %':>7} {'GiB/rank':>9} {'MiB sent':>9}  note"]
    for r in rows:
        lines.append(f"{r.strategy:<13} {r.step_ms:>9.3f} {100 * r.comm_share:>6.1f}% {r.memory_gib:>9.3f} "
                     f"{r.bytes_per_rank / 2**20:>9.2f}  {r.note}")
    return "\n".join(lines)


def as_json(rows: list[Row], c: Cluster, w: Workload, o: Options) -> dict:
    return {"world": c.world, "nodes": c.nodes, "gpus_per_node": c.gpus_per_node, "cluster": asdict(c),
            "params": w.params, "compute_ms": w.compute_s * 1e3, "optim_ms": w.optim_s * 1e3,
            "activation_bytes": w.activation_bytes, "options": asdict(o),
            "rows": [asdict(r) for r in rows]}


# ----------------------------------------------------------------------------------------------- measured inputs

def describe_model(model: str, width: int, size: int, channels: int, classes: int) -> dict:
    """The model's parameter shapes in DDP's bucket order (its parameters reversed) and the parameters of each FSDP
    shard unit, from a copy built on the meta device (nothing allocated, nothing timed)."""
    import torch

    from phalanx.models import build_model  # here, not above: the planner's arithmetic needs no torchvision
    from phalanx.parallel.fsdp import shard_units  # here too: FSDP2's imports, for the description only
    with torch.device("meta"):
        net = build_model(model, classes, channels, size, width)
    return {"shapes": [tuple(q.shape) for q in reversed(list(net.parameters()))],
            "unit_params": [sum(q.numel() for q in u.parameters()) for u in shard_units(net)[0]]}


def measure_step(model: str, width: int, size: int, channels: int, classes: int, global_batch: int,
                 precision: str, steps: int = 5, max_batch: int | None = None) -> dict:
    """Measured on this machine's first device, channels-last as training runs it: the median seconds of forward +
    backward of the global batch and of one SGD step, and the bytes autograd saves for backward (summed in a
    saved-tensors hook, so that a CPU measures them too; the parameters themselves not counted). With
    `max_batch`, at most that many images are run and the compute and activations scaled to the global batch
    (linear in the batch, as the planner assumes anyway). `steps` 0: the activations alone (one forward and
    backward, not timed)."""
    batch = min(global_batch, max_batch or global_batch)
    got = _measure(model, width, size, channels, classes, batch, precision, steps)
    scale = global_batch / batch
    return got | {"compute_s": got["compute_s"] * scale, "activation_bytes": got["activation_bytes"] * scale,
                  "measured_batch": batch}


def _measure(model: str, width: int, size: int, channels: int, classes: int, global_batch: int,
             precision: str, steps: int) -> dict:
    import torch

    from phalanx import runtime  # here, not above: the planner's arithmetic needs none of this
    from phalanx.models import build_model  # here too
    from phalanx.train.precision import Precision  # here too
    accel = runtime.accelerator()
    dev = accel.bind(0)
    net = build_model(model, classes, channels, size, width).to(dev).to(memory_format=torch.channels_last)
    prec = Precision.from_config(precision, accel)
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(global_batch, channels, size, size, device=dev).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, classes, (global_batch,), device=dev)
    params = {q.data_ptr() for q in net.parameters()}
    saved = [0]

    def pack(t):
        if t.data_ptr() not in params:
            saved[0] += t.numel() * t.element_size()
        return t

    def fwd_bwd(count: bool = False):
        with prec.autocast(), torch.autograd.graph.saved_tensors_hooks(pack if count else (lambda t: t),
                                                                       lambda t: t):
            loss = torch.nn.functional.cross_entropy(net(x), y)
        loss.backward()

    fwd_bwd(count=True)
    if steps == 0:  # the activations alone
        return {"compute_s": 0.0, "optim_s": 0.0, "activation_bytes": saved[0],
                "param_gather_bytes": 2 if prec.dtype == torch.bfloat16 else 4, "device": str(dev),
                "precision": prec.name, "threads": torch.get_num_threads()}
    opt.step()
    opt.zero_grad(set_to_none=False)
    accel.synchronize(dev)
    compute, optim = [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        fwd_bwd()
        accel.synchronize(dev)
        t1 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=False)
        accel.synchronize(dev)
        compute.append(t1 - t0)
        optim.append(time.perf_counter() - t1)
    return {"compute_s": sorted(compute)[steps // 2], "optim_s": sorted(optim)[steps // 2],
            "activation_bytes": saved[0], "param_gather_bytes": 2 if prec.dtype == torch.bfloat16 else 4,
            "device": str(dev), "precision": prec.name, "threads": torch.get_num_threads()}

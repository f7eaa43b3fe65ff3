"""Choices measured, not assumed: what `auto` means is timed on this machine, for this model and batch.

    candidates  on CPU every layout of this node's cores (N ranks x T threads, N x T = cores), bf16 and
                fp32 where bf16 is native, channels-last and contiguous; on a GPU channels-last and
                contiguous (one rank per GPU, bf16 where supported, are not in question), compiled
                when the run compiles (`--model.compile`; on a CPU the candidates are timed eager: the
                threads that stand for ranks would compile concurrently)
    measure     each candidate trains a few steps of the real model on a synthetic batch of the real
                image shape. N Python threads stand for the N ranks (torch ops release the GIL; each
                thread runs its ops on T intra-op threads), each with its own copy of the model and 1/N
                of the global batch, and their gradients are all-reduced through a real gloo group
                between the threads: the compute, the memory contention and the communication of the
                layout, without starting processes. Result: the global batch over the slowest thread's
                step time.
    search      one choice at a time (layout, then precision, then memory format), each measured with
                the best of the ones before: a handful of candidates, not the product. A field's candidates
                are measured in REPEATS interleaved rounds (A B C, B C A, C A B: a drift of the machine's
                speed hits all alike); a candidate's rate is its median, its spread the range of its rounds
    cache       CACHE/tune.json, keyed by the machine (CPU model and usable cores, or the GPU), torch
                version, model, image shape, global batch and what was asked: the next run starts at once.
                A decision measured on a busy machine (1-minute load average over BUSY_LOAD of the CPUs
                before measuring, or the best candidate's rounds spread over NOISY) is not cached.
    check       a decision records the img/s it expects; every run times its own first minute of steps
                (train/rate_check.py) and, more than 10% short, says so in one line and the decision is
                measured again at the next start (`--tune true`: now). A decision where another candidate
                was within the noise is measured again at the next start too (RECHECKS times at most).

Why not the rules: a rule measured on one CPU was wrong on the next one (2 ranks x 1 thread was 1.5x
faster on an AVX-512 Xeon, 12-17% slower than 1 x 2 on a Zen 3 EPYC; see README).
"""
from __future__ import annotations

import datetime
import hashlib
import json
import os
import threading
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from phalanx import runtime
from phalanx.data.mix import world_fits
from phalanx.models import build_model
from phalanx.runtime import cpu as host  # read at each call: a test (or a caller) may stand in for the host
from phalanx.runtime.dist import threads_per_rank
from phalanx.runtime.launch import resolve_nproc
from phalanx.train.budget import TUNED_RATE_ENV
from phalanx.train.rate_check import TUNED_ENV

VERSION = 1  # of the cache entries; bump when the measurement changes (entries without rounds still read)

REPEATS = 3
"""Interleaved rounds of a field's measurements (each candidate once per round)."""

BUSY_LOAD = 1.0
"""A decision is not cached when the 1-minute load average before measuring exceeded this share of the CPUs. Not
less: the load average lags by about a minute, so the command's own data preparation, or a run that ended just
before, counts in it (up to one per CPU); more runnable processes than CPUs means another job shares them. A
quieter disturbance shows in the spread of the interleaved rounds instead."""

NOISY = 0.25
"""... nor when the best candidate's rounds spread ((max - min) / median) by more than this. Not less: on the quiet
2-core AMD EPYC (load average 1.0, the tuner alone) the rounds of the best candidate spread by 10-14%, and a
tighter bound left every decision uncached there, to be measured again (9 s) at every start."""

RECHECKS = 2
"""Starts that measure again a decision whose runner-up was within the noise, before it is taken as a tie."""


@dataclass(frozen=True)
class Choice:
    nproc: int = 1
    threads: int = 1
    precision: str = "fp32"      # "bf16" or "fp32" (fp16 is a GPU choice a user makes, not a tuned one)
    channels_last: bool = True

    def label(self) -> str:
        return (f"{self.nproc} rank{'s' if self.nproc > 1 else ''} x {self.threads} thread"
                f"{'s' if self.threads > 1 else ''}, {self.precision}, "
                f"{'channels-last' if self.channels_last else 'contiguous'}")


@dataclass(frozen=True)
class Question:
    """What is to be decided (the `auto` fields) and what is fixed, for one model, batch and machine."""
    kind: str                    # accelerator kind (runtime.KINDS), one that is tuned
    cores: int                   # usable cores of this node (CPU)
    layouts: tuple[tuple[int, int], ...]   # candidate (ranks, threads); one entry when fixed
    precisions: tuple[str, ...]  # candidate autocast dtypes; one entry when fixed
    memory_formats: tuple[bool, ...]       # candidate channels_last values; one entry when fixed
    model: tuple                 # (name, width, norm, act, small_input)
    shape: tuple[int, int, int]  # (h, w, c)
    num_classes: int
    global_batch: int            # images per micro-step summed over the ranks
    compile_mode: str = ""       # torch.compile's mode when the run compiles on a GPU (timed compiled), else ""

    @property
    def open(self) -> bool:
        return len(self.layouts) > 1 or len(self.precisions) > 1 or len(self.memory_formats) > 1


def layouts_for(cores: int, global_batch: int) -> tuple[tuple[int, int], ...]:
    """(ranks, threads) using every core, each rank with at least 32 images per step."""
    out = [(n, cores // n) for n in range(1, cores + 1) if cores % n == 0 and global_batch // n >= 32]
    return tuple(out) or ((1, cores),)


def machine() -> str:
    """The CPU model and usable cores, or the GPU's name: what a measurement holds for."""
    cpu = host.cpu_model()
    bound = runtime.accelerator().describe()  # the GPUs ranks are bound to, where they are
    return f"{cpu} ({host.usable_cores()} cores)" + (f", {bound}" if bound else "")


def cache_key(q: Question) -> str:
    text = json.dumps([VERSION, machine(), torch.__version__, asdict(q)], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------- the search

Measure = Callable[[Choice], float]
"""img/s of one candidate."""


def median(xs: list[float]) -> float:
    ys = sorted(xs)
    n = len(ys)
    return ys[n // 2] if n % 2 else (ys[n // 2 - 1] + ys[n // 2]) / 2


def spread(xs: list[float]) -> float:
    """(max - min) / median of one candidate's rounds: 0 for a single measurement."""
    return (max(xs) - min(xs)) / max(median(xs), 1e-9)


def search(q: Question, measure: Measure, repeats: int = REPEATS) -> tuple[Choice, list[tuple[Choice, list[float]]]]:
    """(the fastest choice, every (choice, its rounds' img/s) measured, fastest median first), one field at a time:
    layout first (the largest effect), then precision, then memory format, each with the best of the fields before.
    A field's candidates are measured in `repeats` interleaved rounds, each round in a rotated order."""
    seen: dict[Choice, list[float]] = {}

    n, t = q.layouts[0]
    best = Choice(n, t, q.precisions[0], q.memory_formats[0])
    for field, values in (("layout", q.layouts), ("precision", q.precisions), ("channels_last", q.memory_formats)):
        if len(values) < 2:
            continue
        options = [replace(best, nproc=v[0], threads=v[1]) if field == "layout" else replace(best, **{field: v})
                   for v in values]
        for r in range(repeats):
            for c in options[r % len(options):] + options[:r % len(options)]:
                if len(seen.setdefault(c, [])) < repeats:  # the best of a field before is measured again
                    seen[c].append(measure(c))                # only up to `repeats` rounds in all
        best = max(options, key=lambda c: median(seen[c]))
    if not seen:
        return best, []
    return best, sorted(seen.items(), key=lambda kv: -median(kv[1]))


def runner_up_within_noise(measured: list[tuple[Choice, list[float]]]) -> Choice | None:
    """The fastest other candidate whose median lies within the best's or its own half range of the best's
    median (the measurements cannot tell them apart), or None."""
    if len(measured) < 2:
        return None
    (_, b), *others = measured
    for c, xs in others:
        noise = max(max(b) - min(b), max(xs) - min(xs)) / 2
        if median(b) - median(xs) <= noise:
            return c
    return None


def host_load() -> tuple[float, int]:
    """(1-minute load average, CPUs of the machine): how busy the machine was before a measurement."""
    try:
        return os.getloadavg()[0], os.cpu_count() or 1
    except OSError:  # no load average on this platform: taken as quiet
        return 0.0, os.cpu_count() or 1


def busy(load: tuple[float, int], best_rounds: list[float]) -> str:
    """Why a decision was measured on a busy machine ("" when it was not): the load average, or its best
    candidate's rounds spread too far apart."""
    avg, cpus = load
    if avg > BUSY_LOAD * cpus:
        return f"load average {avg:.2f} on {cpus} CPU{'s' if cpus > 1 else ''}"
    if len(best_rounds) > 1 and spread(best_rounds) > NOISY:
        return f"its measurements spread by {100 * spread(best_rounds):.0f}%"
    return ""


# ----------------------------------------------------------------------------- one measurement

def measure_choice(c: Choice, q: Question, min_seconds: float = 0.5, max_steps: int = 8,
                   device: torch.device | None = None, phases: dict | None = None) -> float:
    """img/s of `c`: `c.nproc` threads train copies of the model on their part of a synthetic global
    batch, all-reducing gradients through an in-process gloo group (see the module docstring).
    `phases`, when given, receives rank 0's mean seconds per step of forward + backward ("compute_s"),
    of the gradient all-reduce ("comm_s", not overlapped with backward here, unlike DDP), of the
    optimizer ("optim_s"), and the bytes all-reduced per step ("grad_bytes")."""
    device = device or torch.device("cpu")
    groups = _thread_groups(c.nproc)
    times: list[float] = [0.0] * c.nproc
    errors: list[BaseException] = []
    start = threading.Barrier(c.nproc)

    def rank(r: int) -> None:
        try:
            times[r], split = _time_rank(r, c, q, device, groups, start, min_seconds, max_steps)
            if r == 0 and phases is not None:
                phases.update(split)
        except BaseException as e:  # noqa: BLE001 (re-raised in the caller's thread)
            errors.append(e)
            start.abort()

    threads = torch.get_num_threads()
    torch.set_num_threads(c.threads)
    try:
        if c.nproc == 1:  # in this thread: `torch.compile(mode="reduce-overhead")`'s CUDA graphs keep per-thread
            rank(0)       # state, and a model compiled in a thread of its own failed on an H100 (torch 2.11)
        else:
            workers = [threading.Thread(target=rank, args=(r,), daemon=True) for r in range(c.nproc)]
            for t in workers:
                t.start()
            for t in workers:
                t.join()
    finally:
        torch.set_num_threads(threads)
    if errors:
        raise errors[0]
    return q.global_batch / max(times)


def _time_rank(r: int, c: Choice, q: Question, device: torch.device, groups, start: threading.Barrier,
               min_seconds: float, max_steps: int) -> tuple[float, dict]:
    """(seconds per step, rank r's mean split of a step) for rank r of layout `c`, after two untimed steps; the
    ranks start timing together at `start`."""
    per_rank = max(1, q.global_batch // c.nproc)
    dtype = torch.bfloat16 if c.precision == "bf16" else None
    fmt = torch.channels_last if c.channels_last else torch.contiguous_format
    net, opt, x, y = _synthetic_rank(q, per_rank, device, fmt, seed=r)
    accel = runtime.of(device)
    split = {"compute_s": 0.0, "comm_s": 0.0, "optim_s": 0.0, "grad_bytes": 0}

    def sync() -> float:
        accel.synchronize(device)
        return time.perf_counter()

    def step() -> None:
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            out = net(x)
        F.cross_entropy(out.float(), y).backward()
        t1 = sync()
        if groups is not None:  # as DDP: one all-reduce of the flattened gradients
            flat = torch.cat([p.grad.reshape(-1) for p in net.parameters() if p.grad is not None])
            groups[r].allreduce([flat]).wait()
            split["grad_bytes"] = flat.numel() * flat.element_size()
        t2 = sync()
        opt.step()
        opt.zero_grad(set_to_none=True)
        t3 = sync()
        split["compute_s"] += t1 - t0
        split["comm_s"] += t2 - t1
        split["optim_s"] += t3 - t2

    for _ in range(2):  # warm-up: allocator, oneDNN primitives, cuDNN choices
        step()
    split.update(compute_s=0.0, comm_s=0.0, optim_s=0.0)
    start.wait()
    t0, steps = time.perf_counter(), 0
    while steps < max_steps and (steps < 2 or time.perf_counter() - t0 < min_seconds):
        step()
        steps += 1
    return (time.perf_counter() - t0) / steps, {k: v / steps if k.endswith("_s") else v for k, v in split.items()}


def _synthetic_rank(q: Question, per_rank: int, device: torch.device, fmt: torch.memory_format, seed: int):
    """(model, optimizer, images, labels) of one measured rank: its copy of the model (compiled when the run
    compiles: in the first warm-up step, which is not timed) and a synthetic batch of its share."""
    h, w, ch = q.shape
    torch.manual_seed(seed)
    net = build_model(q.model[0], q.num_classes, ch, h, *q.model[1:]).to(device, memory_format=fmt)
    if q.compile_mode:
        net = torch.compile(net, mode=q.compile_mode)
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)
    x = torch.randn(per_rank, ch, h, w, device=device).contiguous(memory_format=fmt)
    return net, opt, x, torch.randint(0, q.num_classes, (per_rank,), device=device)


def _thread_groups(n: int):
    """n gloo process groups joined in this process (one per thread), or None for one rank."""
    if n == 1:
        return None
    import torch.distributed as dist
    store = dist.HashStore()
    groups: list = [None] * n

    def join(r: int) -> None:
        groups[r] = dist.ProcessGroupGloo(dist.PrefixStore("tune", store), r, n, datetime.timedelta(seconds=60))

    ts = [threading.Thread(target=join, args=(r,), daemon=True) for r in range(n)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return groups


# ----------------------------------------------------------------------------- cache

def load_cached(path: Path, key: str) -> dict | None:
    try:
        entry = json.loads(path.read_text()).get(key)
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(entry, dict) or not isinstance(entry.get("choice"), dict):
        return None
    try:
        Choice(**entry["choice"])
    except TypeError:
        return None
    return entry


def store_cached(path: Path, key: str, entry: dict) -> None:
    """Add one decision to the cache file (atomically; a cache that cannot be written is not an error)."""
    try:
        data = json.loads(path.read_text()) if path.is_file() else {}
        if not isinstance(data, dict):
            data = {}
    except (OSError, ValueError):
        data = {}
    data[key] = entry
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, path)
    except OSError:
        pass


def decide(q: Question, cache: Path | None, measure: Measure, refresh: bool = False,
           load: Callable[[], tuple[float, int]] | None = None, repeats: int = REPEATS) -> tuple[Choice, dict]:
    """(the choice, its record: measured rates and rounds, whether it came from the cache, seconds spent, what it
    expects of a run). A cached decision is measured again when a run found it stale or its runner-up was within
    the noise ("recheck"); a decision measured on a busy machine is not cached."""
    key = cache_key(q)
    hit = load_cached(cache, key) if cache is not None else None
    if hit is not None and not refresh and not hit.get("recheck"):
        return Choice(**hit["choice"]), dict(hit, cached=True, key=key)
    before = (load or host_load)()
    if hit is not None and not refresh and busy(before, []):  # to be measured again, but not on a busy machine:
        return Choice(**hit["choice"]), dict(hit, cached=True, key=key, deferred=busy(before, []))  # kept for now
    t0 = time.perf_counter()
    best, measured = search(q, measure, repeats)
    entry = {"choice": asdict(best), "machine": machine(), "torch": torch.__version__,
             "rates": [[c.label(), round(median(xs), 1)] for c, xs in measured],
             "rounds": [[round(x, 1) for x in xs] for _, xs in measured],
             "seconds": round(time.perf_counter() - t0, 2), "date": time.strftime("%Y-%m-%d"),
             "at": round(time.time(), 3), "load": [round(before[0], 2), before[1]]}
    why = busy(before, measured[0][1]) if measured else ""
    if measured:
        # A run of the same choice trained at train_ratio x the synthetic rate: expect that again.
        same = hit is not None and hit.get("choice") == entry["choice"]
        ratio = float(hit.get("train_ratio") or 1.0) if same else 1.0
        entry["expect_img_s"] = round(median(measured[0][1]) * ratio, 1)
        runner = runner_up_within_noise(measured)
        rechecks = int(hit.get("rechecks") or 0) if hit is not None and hit.get("runner_up") else 0
        if runner is not None and rechecks < RECHECKS:
            entry.update(runner_up=runner.label(), rechecks=rechecks + 1,
                         recheck=f"{runner.label()} was within the noise")
        elif runner is not None:
            entry["tie"] = runner.label()
    if cache is not None and measured and not why:
        store_cached(cache, key, entry)
    return best, dict(entry, cached=False, key=key, busy=why,
                      again=(hit or {}).get("recheck", "") if not refresh else "")


def expected_img_s(record: dict) -> float | None:
    """The img/s a decision expects of a run (its measured best where it records no expectation)."""
    try:
        return float(record.get("expect_img_s") or record["rates"][0][1])
    except (KeyError, IndexError, TypeError, ValueError):
        return None


def mark_checked(cache: Path, key: str, verdict: dict) -> bool:
    """A run's rate check (train/rate_check.py) recorded in the decision it checked: stale, it is measured again
    at the next start; the first check of a decision that holds sets what later runs are expected to do (the
    synthetic measurement leaves out the loader, augmentation and EMA). False when the decision is gone or newer."""
    entry = load_cached(cache, key)
    if entry is None or verdict.get("at") != entry.get("at") or not entry.get("rates"):
        return False
    observed = float(verdict["measured_img_s"])
    entry.update(observed_img_s=observed, train_ratio=round(observed / float(entry["rates"][0][1]), 4))
    if verdict.get("stale"):
        entry["recheck"] = (f"a run trained at {observed:,.0f} img/s, {100 * verdict['short']:.0f}% short of the "
                            f"{verdict['expected_img_s']:,.0f} expected")
    elif "checked" not in entry:
        entry["expect_img_s"] = observed
    entry["checked"] = time.strftime("%Y-%m-%d")
    store_cached(cache, key, entry)
    return True


def follow_up(cache: Path, run_dir: Path) -> bool:
    """After a run: its rate check (the last "tune_check" event of its metrics.jsonl) into the cache."""
    verdict = None
    try:
        with open(run_dir / "metrics.jsonl") as f:
            for line in f:
                if '"tune_check"' in line:
                    verdict = json.loads(line)
    except (OSError, ValueError):
        return False
    return verdict is not None and bool(verdict.get("key")) and mark_checked(cache, verdict["key"], verdict)


def device_of(q: Question) -> torch.device:
    # the first device where ranks are bound to devices (a GPU); the host otherwise
    return torch.device(q.kind, 0) if runtime.KINDS[q.kind]().device_count() else torch.device("cpu")


def table(record: dict) -> str:
    """The measured candidates, fastest first: median img/s of their rounds, the rounds' spread, speed relative
    to the fastest."""
    rates = record.get("rates") or []
    if not rates:
        return "(nothing measured)"
    rounds = record.get("rounds") or [[r] for _, r in rates]
    width = max(len(label) for label, _ in rates)
    lines = [f"{'candidate':<{width}}  {'img/s':>9}  {'spread':>6}  {'rounds':>6}  {'vs best':>7}"]
    lines += [f"{label:<{width}}  {r:>9,.0f}  {100 * spread(xs):>5.1f}%  {len(xs):>6}  {r / rates[0][1]:>7.2f}"
              for (label, r), xs in zip(rates, rounds)]
    load = record.get("load")
    where = f", load average {load[0]:.2f} on {load[1]} CPUs" if load else ""
    return "\n".join(lines + [f"({record.get('machine', '?')}, torch {record.get('torch', '?')}{where})"])


def summary_line(choice: Choice, record: dict) -> str:
    """One line: what was chosen, and what it was measured against (or that the cache said so), and whether the
    decision is kept (not on a busy machine) or measured again at the next start (a runner-up within the noise)."""
    expect = expected_img_s(record)
    if record.get("cached"):
        expects = f"; expects {expect:,.0f} img/s" if expect else ""
        later = (f"; to be measured again ({record['recheck']}), not now: the machine is busy ({record['deferred']})"
                 if record.get("deferred") else "")
        return f"tuned: {choice.label()} (measured on {record.get('date', '?')}, cached{expects}){later}"
    rates = record.get("rates") or []
    if not rates:
        return f"tuned: {choice.label()} (nothing to measure)"
    best = rates[0][1]
    rounds = (record.get("rounds") or [[best]])[0]
    others = "; ".join(f"{label}: {r:,.0f}" for label, r in rates[1:])
    line = (f"tuned in {record['seconds']:.1f} s on {record['machine']}: {choice.label()} at {best:,.0f} img/s "
            f"(+-{50 * spread(rounds):.0f}% over {len(rounds)} rounds)" + (f" (against {others})" if others else ""))
    if record.get("again"):
        line = f"measured again ({record['again']}): " + line
    if record.get("busy"):
        line += f"; not cached: the machine was busy ({record['busy']}), measured again at the next start"
    elif record.get("recheck"):
        line += f"; {record['runner_up']} was within the noise: measured again at the next start"
    elif record.get("tie"):
        line += f"; {record['tie']} is as fast within the noise"
    return line


# ----------------------------------------------------------------------------- a run's `auto` fields

def question_for(cfg, explicit: set[str], shape: tuple[int, int, int], num_classes: int) -> Question | None:
    """What `cfg` leaves to measurement on this node (None: nothing, or a device kind not tuned here).
    The layout is open on CPU with `--nproc auto` on one node (nodes of a multi-node run must agree,
    so they use the rule); precision with `--precision auto` where bf16 is native on the CPU (a GPU
    takes bf16 where it has it); the memory format unless `--model.channels_last` was given."""
    accel = runtime.accelerator(cfg.device)
    if not accel.tuned:
        return None
    bound = accel.device_count() > 0  # one rank per device (GPUs); else ranks share the host's cores
    micro = cfg.global_batch // cfg.grad_accum
    cores = host.usable_cores()
    fits = world_fits(cfg)
    if not bound and cfg.parallel.nproc == "auto" and cfg.parallel.nnodes == 1:
        layouts = layouts_for(cores, micro)
        if fits is not None:  # only layouts the run can use (mixup's pairs whole, invariant micro-batches shared)
            layouts = tuple(lay for lay in layouts if fits(lay[0])) or layouts
        if cfg.parallel.invariant:  # every rank computes with one thread (parallel/invariant.py): ranks alone vary
            layouts = tuple(dict.fromkeys((n, 1) for n, _ in layouts))
    else:
        n, _ = resolve_nproc(cfg.parallel, cfg.device, micro, fits)
        layouts = ((n, threads_per_rank(cfg.parallel, n)),)
    if bound:  # one rank per GPU: measure one rank's share on one GPU
        micro, layouts = max(1, micro // layouts[0][0]), ((1, 1),)
    if cfg.precision == "auto" and accel.tunes_precision():
        precisions = ("bf16", "fp32")
    else:
        dtype = accel.autocast_dtype(cfg.precision)
        precisions = ({None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype],)
    formats = (cfg.model.channels_last,) if "model.channels_last" in explicit else (True, False)
    m = cfg.model
    compile_mode = m.compile_mode if m.compile and accel.compile_modes else ""
    return Question(accel.kind, cores, layouts, precisions, formats, (m.name, m.width, m.norm, m.act, m.small_input),
                    tuple(shape), num_classes, micro, compile_mode)


def tune_run(cfg, explicit: set[str], shape: tuple[int, int, int], num_classes: int, cache: Path,
             say: Callable[[str], None] = print, refresh: bool = False) -> list[str]:
    """Measure (or read from the cache; `refresh`: measure now) what `cfg` leaves open, apply it to `cfg`, say it
    in one line and return it as command-line overrides for the ranks to be launched (all ranks get the same).
    The ranks are told what speed to expect (rate_check.TUNED_ENV)."""
    q = question_for(cfg, explicit, shape, num_classes)
    if q is None or not q.open:
        return []
    device = device_of(q)
    # timed with the settings training runs with (on CUDA: cuDNN autotuning, TF32 with --tf32)
    runtime.accelerator(cfg.device).configure_training(deterministic=cfg.deterministic, tf32=cfg.tf32)
    choice, record = decide(q, cache, lambda c: measure_choice(c, q, device=device), refresh=refresh)
    say(f"phalanx: {summary_line(choice, record)}")
    expect = expected_img_s(record)
    if expect:  # a --budget's first estimate of the speed, and what the ranks check their own speed against
        os.environ[TUNED_RATE_ENV] = repr(expect)
        os.environ[TUNED_ENV] = json.dumps({"img_s": expect, "label": choice.label(), "key": record["key"],
                                            "at": record.get("at")})
    argv = []
    if len(q.layouts) > 1:
        cfg.parallel.nproc, cfg.parallel.threads_per_rank = str(choice.nproc), choice.threads
        argv += ["--parallel.threads_per_rank", str(choice.threads)]
    if len(q.precisions) > 1:
        cfg.precision = choice.precision
        argv += ["--precision", choice.precision]
    if len(q.memory_formats) > 1:
        cfg.model.channels_last = choice.channels_last
        argv += ["--model.channels_last", "true" if choice.channels_last else "false"]
    return argv

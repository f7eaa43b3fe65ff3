"""`phalanx doctor`: what this machine offers a training run, measured, and what stands in its way.

    versions      Python, torch (its CUDA), torchvision, Phalanx, optional extras
    devices       CPU model, usable cores, ISA (AVX2, AVX-512, AVX-512 BF16, AMX); GPUs with memory and
                  compute capability; XLA devices when torch_xla is installed
    backends      a short all-reduce across 2 local processes on loopback per process-group backend
                  (or the one asked for with --backend): latency and bus bandwidth
    numerics      bf16 support; a measured fp32 (and bf16 where native) matmul rate in GFLOP/s
    storage       free space in /dev/shm, the cache folder and the output folder, and whether they are writable
    data          whether the default dataset (Fashion-MNIST) is here, and prepared
    layout        what `--nproc auto` would choose, and why

Each problem is one line of advice on stderr and makes the exit code 1; `--json` prints the whole
report as one JSON object on stdout. Runs in a few seconds (most of it the backend check).
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import shutil
import time
from pathlib import Path

import torch
import torch.distributed as dist

import phalanx
from phalanx import config as C
from phalanx import runtime
from phalanx.data.mix import world_fits
from phalanx.data.sources import cache_dir, find_fashion_mnist, store_path_for
from phalanx.data.store import is_store
from phalanx.errors import DataError, first_line
from phalanx.runtime.cpu import cpu_model, usable_cores
from phalanx.runtime.dist import threads_per_rank
from phalanx.runtime.launch import resolve_nproc
from phalanx.tools.bench import matmul_peak

BACKENDS = ("gloo", "nccl")
MIN_FREE_GIB = 1.0
"""Less free disk than this in the cache or output folder is a problem: a store or a checkpoint will not fit."""
MIN_SHM_MIB = 256
"""Less free /dev/shm than this is a problem: DataLoader workers (streamed data) pass batches through it."""
PROBE_TIMEOUT_S = 30.0
ISA_FLAGS = {"avx2": "AVX2", "avx512f": "AVX-512", "avx512_bf16": "AVX-512 BF16", "amx_tile": "AMX"}


def run_checks(backend: str | None = None, cache_dir: str = "", out_dir: str = "") -> dict:
    """The whole report: {section: findings, ..., 'problems': [one line each], 'notes': [...]}."""
    cfg = C.build_config(None, [])  # what a plain `phalanx train` runs: the default recipe
    problems: list[str] = []
    notes: list[str] = []
    t0 = time.perf_counter()
    # The backend check forks (gloo): first, before anything here starts a thread pool or a CUDA context.
    asked = [backend] if backend else [b for b in BACKENDS if runtime.for_backend(b).is_available()]
    backends = [probe_backend(b) for b in asked]
    report: dict = {"versions": versions(), "cpu": cpu_info(), **device_info(problems, notes), "backends": backends}
    for r in report["backends"]:
        if not r["ok"]:
            problems.append(f"backend {r['backend']}: {r['error']}")
    report["bf16"] = bf16_info()
    report["matmul"] = matmul_rates()
    report["storage"] = storage_info(cache_dir or cfg.data.cache_dir, out_dir or cfg.out_dir, problems)
    report["dataset"] = dataset_info(cache_dir or cfg.data.cache_dir, notes)
    report["layout"] = layout_info(cfg, notes)
    report["seconds"] = round(time.perf_counter() - t0, 2)
    report["problems"], report["notes"] = problems, notes
    report["ok"] = not problems
    return report


# ----------------------------------------------------------------------------- versions and devices

def versions() -> dict:
    import importlib.metadata as md

    import torchvision

    out = {"python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
           "torchvision": torchvision.__version__, "phalanx": phalanx.__version__}
    for extra in ("onnxruntime", "tensorboard", "matplotlib"):
        try:
            out[extra] = md.version(extra)
        except md.PackageNotFoundError:
            out[extra] = None
    return out


def cpu_info() -> dict:
    flags: set = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "flags":
                flags = set(value.split())
                break
    except OSError:  # not Linux: the ISA stays unknown
        pass
    model = cpu_model()
    try:
        capability = torch.backends.cpu.get_cpu_capability()
    except AttributeError:  # pragma: no cover - older torch
        capability = None
    return {"model": model, "cores_usable": usable_cores(), "cores_online": os.cpu_count(),
            "cgroup_cpus": cgroup_cpus(), "isa": {name: (flag in flags) if flags else None
                                                  for flag, name in ISA_FLAGS.items()},
            "torch_kernels": capability}


def cgroup_cpus() -> float | None:
    """The cgroup v2 CPU quota in CPUs (a container's --cpus), None when unlimited or unknown."""
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        return None if quota == "max" else round(int(quota) / int(period), 2)
    except (OSError, ValueError):
        return None


def device_info(problems: list[str], notes: list[str]) -> dict:
    """{'gpus': [...], 'xla': {'devices': [...]} or None}: what each accelerator kind lists on this node."""
    gpus = runtime.KINDS["cuda"].inventory(problems, notes) or []
    xla = runtime.KINDS["xla"].inventory(problems, notes)
    return {"gpus": gpus, "xla": None if xla is None else {"devices": [d["device"] for d in xla]}}


def bf16_info() -> dict:
    return {"cpu_native": runtime.KINDS["cpu"].bf16_supported(), "cuda": runtime.KINDS["cuda"].bf16_supported()}


# ----------------------------------------------------------------------------- process-group backends

def probe_backend(backend: str, world: int = 2) -> dict:
    """A short all-reduce among `world` processes on loopback: {'backend', 'ok', 'ranks', 'latency_us',
    'size_mib', 'busbw_gbs', 'error'}. Latency: a 4-byte all-reduce; bandwidth: nccl-tests' bus bandwidth
    (2 (n-1)/n x size / time) of a 16 MiB (gloo) or 256 MiB (nccl) all-reduce."""
    import multiprocessing as mp

    res = {"backend": backend, "ok": False, "ranks": world, "error": None}
    available = {"gloo": dist.is_gloo_available, "nccl": dist.is_nccl_available}[backend]()
    kind = runtime.for_backend(backend)
    if available and not kind.is_available():
        res["error"] = (f"torch sees no {kind.kind.upper()} device; {backend} needs one: on CPUs use --backend gloo "
                        f"(what --parallel.backend auto picks)")
        return res
    if not available:
        res["error"] = f"this torch build ({torch.__version__}) has no {backend}; reinstall torch from pytorch.org"
        return res
    if devices := kind().device_count():
        res["ranks"] = world = min(world, devices)  # NCCL refuses two ranks on one GPU
    try:
        store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                              timeout=datetime.timedelta(seconds=PROBE_TIMEOUT_S))
    except (RuntimeError, OSError) as e:
        res["error"] = f"cannot listen on 127.0.0.1 for the rendezvous ({e}): is the loopback interface up?"
        return res
    # fork for gloo (the launcher's choice on CPU: no second import of torch); CUDA needs fresh processes.
    ctx = mp.get_context("fork" if backend == "gloo" and hasattr(os, "fork") else "spawn")
    procs = [ctx.Process(target=_all_reduce_worker, args=(backend, r, world, store.port), daemon=True)
             for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + PROBE_TIMEOUT_S
    for p in procs:
        p.join(max(0.1, deadline - time.monotonic()))
    hung = [p for p in procs if p.is_alive()]
    for p in hung:
        p.kill()
        p.join()
    errors = [store.get(k).decode() for k in (f"error{r}" for r in range(world)) if store.check([k])]
    if errors:
        res["error"] = f"the {world}-process all-reduce on 127.0.0.1 failed: {errors[0]}"
    elif hung or not store.check(["result"]):
        res["error"] = (f"the {world}-process all-reduce on 127.0.0.1 did not finish within {PROBE_TIMEOUT_S:.0f} s "
                        f"(exit codes {[p.exitcode for p in procs]}): check that loopback TCP works and, for NCCL, "
                        f"NCCL_DEBUG=INFO")
    else:
        res.update(json.loads(store.get("result").decode()), ok=True)
    return res


def _all_reduce_worker(backend: str, rank: int, world: int, port: int) -> None:
    """One rank of probe_backend: rank 0 leaves the timings in the store as 'result'."""
    store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=datetime.timedelta(seconds=PROBE_TIMEOUT_S))
    try:
        torch.set_num_threads(1)
        accel = runtime.for_backend(backend)()
        device = accel.bind(rank)
        kwargs = {"device_id": device} if accel.device_count() else {}
        dist.init_process_group(backend, store=dist.PrefixStore("pg", store), rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=PROBE_TIMEOUT_S), **kwargs)
        small = torch.ones(1, device=device)
        big = torch.ones((256 if backend == "nccl" else 16) << 18, device=device)  # 256 / 16 MiB of fp32

        def timed(t: torch.Tensor, n: int) -> float:
            for _ in range(2):  # warm-up: connections, buffers
                dist.all_reduce(t)
            accel.synchronize(device)
            start = time.perf_counter()
            for _ in range(n):
                dist.all_reduce(t)
            accel.synchronize(device)
            return (time.perf_counter() - start) / n

        latency, big_s = timed(small, 50), timed(big, 10)
        size = big.numel() * big.element_size()
        if rank == 0:
            store.set("result", json.dumps({
                "latency_us": round(latency * 1e6, 1), "size_mib": size >> 20, "all_reduce_ms": round(big_s * 1e3, 2),
                # one rank moves nothing: no bus bandwidth to speak of
                "busbw_gbs": round(2 * (world - 1) / world * size / big_s / 1e9, 3) if world > 1 else None}))
        dist.destroy_process_group()
    except Exception as e:
        store.set(f"error{rank}", f"rank {rank}: {type(e).__name__}: {first_line(e)[:200]}")


# ----------------------------------------------------------------------------- numerics

def matmul_rates(seconds: float = 0.6) -> list[dict]:
    """Measured square-matmul rates in GFLOP/s (tools/bench.py's matmul_peak) on the first device ranks would be
    bound to, or on the CPU with all usable cores: fp32, and bf16 where it is native."""
    # The GPUs ranks would be bound to, else the host's cores (not XLA: a matmul there times its compilation).
    accel = next(kind() for kind in (runtime.KINDS["cuda"], runtime.KINDS["cpu"]) if kind.is_available())
    bound = accel.device_count() > 0  # a GPU: one rank per device; else the host's cores
    device = accel.bind(0)
    dtypes = [torch.float32] + ([torch.bfloat16] if accel.bf16_supported() else [])
    n = 8192 if bound else 1024
    threads = torch.get_num_threads()
    if not bound:
        torch.set_num_threads(usable_cores())
    out = []
    try:
        for dt in dtypes:
            rate = matmul_peak(device, dt, n=n, seconds=seconds / len(dtypes))
            out.append({"dtype": str(dt).replace("torch.", ""), "device": str(device), "n": n,
                        "threads": None if bound else torch.get_num_threads(), "gflops": round(rate / 1e9, 1)})
    finally:
        torch.set_num_threads(threads)
    return out


# ----------------------------------------------------------------------------- storage, data, layout

def folder_space(path: Path) -> dict:
    """Free space and writability of `path`, or of its nearest existing parent when it does not exist yet."""
    probe = path.expanduser().absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    usage = shutil.disk_usage(probe)
    return {"path": str(path), "exists": path.exists(), "free_gib": round(usage.free / 2**30, 1),
            "writable": os.access(probe, os.W_OK)}


def storage_info(cache_configured: str, out_dir: str, problems: list[str]) -> dict:
    out: dict = {"shm": None}
    shm = Path("/dev/shm")
    if shm.is_dir():
        free_mib = shutil.disk_usage(shm).free / 2**20
        out["shm"] = {"path": str(shm), "free_gib": round(free_mib / 1024, 2)}
        if free_mib < MIN_SHM_MIB:
            problems.append(f"/dev/shm has {free_mib:.0f} MiB free: DataLoader workers (streamed data) need more; "
                            f"in Docker run with --shm-size=8g (or --ipc=host)")
    for key, path, flag in (("cache", cache_dir(cache_configured), "--data.cache_dir or PHALANX_CACHE"),
                            ("output", Path(out_dir), "--out_dir")):
        info = out[key] = folder_space(path)
        if not info["writable"]:
            problems.append(f"{key} folder {path}: not writable by this user; choose another with {flag}")
        elif info["free_gib"] < MIN_FREE_GIB:
            problems.append(f"{key} folder {path}: only {info['free_gib']} GiB free; free some space or choose "
                            f"another with {flag}")
    return out


def dataset_info(cache_configured: str, notes: list[str]) -> dict:
    """Where the default dataset's files are, and whether their prepared store exists (a note when absent:
    `phalanx train` installs it, and other data needs none of it)."""
    try:
        folder = find_fashion_mnist(False, cache_dir(cache_configured))
    except DataError:
        notes.append("the default dataset (Fashion-MNIST) is not here: `phalanx train` installs it "
                     "(sudo apt-get install dataset-fashion-mnist, or a download), or pass --data FOLDER")
        return {"name": "fashion_mnist", "present": False, "path": None, "prepared_store": None}
    store, _ = store_path_for("fashion_mnist", cache_configured, auto_install=False)
    return {"name": "fashion_mnist", "present": True, "path": str(folder),
            "prepared_store": str(store) if is_store(store) else None}


def layout_info(cfg, notes: list[str]) -> dict | None:
    """What `phalanx train --nproc auto` chooses with the default recipe's global batch."""
    try:
        nproc, why = resolve_nproc(cfg.parallel, cfg.device, cfg.global_batch // cfg.grad_accum, world_fits(cfg))
        accel = runtime.accelerator(cfg.device)
    except (ValueError, RuntimeError) as e:
        notes.append(f"--nproc auto: cannot choose a layout ({e})")
        return None
    return {"nproc": nproc, "threads_per_rank": threads_per_rank(cfg.parallel, nproc), "device": accel.kind,
            "backend": accel.backend, "global_batch": cfg.global_batch, "why": why}


# ----------------------------------------------------------------------------- the text report

def render(r: dict) -> str:
    v, cpu = r["versions"], r["cpu"]
    extras = ", ".join(f"{k} {v[k]}" for k in ("onnxruntime", "tensorboard", "matplotlib") if v.get(k)) or "none"
    isa = ", ".join(f"{name} {'yes' if ok else 'no'}" for name, ok in cpu["isa"].items() if ok is not None)
    quota = f", cgroup quota {cpu['cgroup_cpus']} CPUs" if cpu["cgroup_cpus"] else ""
    lines = [
        ("versions", f"Python {v['python']}, torch {v['torch']} (CUDA {v['torch_cuda'] or 'none'}), torchvision "
                     f"{v['torchvision']}, phalanx {v['phalanx']}; extras: {extras}"),
        ("cpu", f"{cpu['model']}: {cpu['cores_usable']} usable core(s) of {cpu['cores_online']}{quota}; "
                f"{isa or 'ISA unknown'}; torch CPU kernels {cpu['torch_kernels']}"),
        ("gpus", "; ".join(f"{g['index']}: {g['name']}, {g['memory_gib']} GiB, compute capability {g['capability']}"
                           for g in r["gpus"]) or "none (torch.cuda.is_available() is False)"),
        ("xla", "torch_xla not installed" if r["xla"] is None else
                ", ".join(r["xla"]["devices"]) or "torch_xla installed, no devices"),
    ]
    for i, b in enumerate(r["backends"]):
        bw = f" = bus bandwidth {b['busbw_gbs']} GB/s" if b.get("busbw_gbs") is not None else " (one rank)"
        text = (f"{b['backend']}: works, {b['ranks']} process(es) on loopback: latency {b['latency_us']:.0f} us, "
                f"{b['size_mib']} MiB all-reduce {b['all_reduce_ms']} ms{bw}"
                if b["ok"] else f"{b['backend']}: FAILS: {b['error']}")
        lines.append(("backends" if i == 0 else "", text))
    bf = r["bf16"]
    lines.append(("bf16", f"CPU {'native (AVX-512 BF16 / AMX)' if bf['cpu_native'] else 'not native (emulated)'}"
                          + (f"; CUDA {'yes' if bf['cuda'] else 'no'}" if bf["cuda"] is not None else "")))
    lines.append(("matmul", "; ".join(
        f"{m['dtype']} {m['gflops']:,.1f} GFLOP/s ({m['device']}, {m['n']}x{m['n']}"
        + (f", {m['threads']} threads)" if m["threads"] else ")") for m in r["matmul"])))
    st = r["storage"]
    if st["shm"]:
        lines.append(("/dev/shm", f"{st['shm']['free_gib']} GiB free"))
    for key in ("cache", "output"):
        f = st[key]
        lines.append((key, f"{f['path']}{'' if f['exists'] else ' (not created yet)'}: {f['free_gib']} GiB free, "
                           f"{'writable' if f['writable'] else 'NOT writable'}"))
    d = r["dataset"]
    lines.append(("dataset", f"Fashion-MNIST at {d['path']}; prepared store "
                             f"{d['prepared_store'] or 'not yet (made on the first run)'}" if d["present"] else
                  "Fashion-MNIST not here"))
    lay = r["layout"]
    if lay:
        lines.append(("--nproc auto", f"{lay['nproc']} rank(s) x {lay['threads_per_rank']} thread(s) on "
                                      f"{lay['device']}, {lay['backend']}, for global batch {lay['global_batch']} "
                                      f"({lay['why']})"))
    width = max(len(k) for k, _ in lines)
    text = [f"{k:<{width}}  {t}" for k, t in lines] + [f"note: {n}" for n in r["notes"]]
    text.append(f"{len(r['problems'])} problem(s), listed below" if r["problems"] else
                f"no problems found ({r['seconds']} s)")
    return "\n".join(text)

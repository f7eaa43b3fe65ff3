"""Throughput against world size and layout, the split of a step, the input pipeline, and FLOP accounting:
what `phalanx bench scaling|flops|step|loader|all` runs (commands/bench.py). Each prints a table and one JSON
object (the last line of stdout).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

from phalanx.errors import ConfigError, first_line
from phalanx.runtime.cpu import max_processes


def check_model_args(model: str, width: int, size: int = 28, channels: int = 1) -> None:
    """ConfigError, one line naming the options, for a model the benchmark cannot build, one that does not take
    `size`x`size` images, or one whose weights, gradients and optimizer state exceed this machine's memory:
    built and run once on the meta device (nothing allocated), before anything is timed."""
    from phalanx.models import build_model, model_refusal  # torchvision's model zoo: for the model benchmarks only
    why = model_refusal(model)
    if why is not None:
        raise ConfigError(f"--model {model}: {why}")
    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. a zero-sized layer for a tiny image: the error below says it
            net = build_model(model, 10, channels, size, width)
            with torch.no_grad():
                net.eval()(torch.zeros(1, channels, size, size))
    except ConfigError:
        raise
    except (RuntimeError, ValueError, NotImplementedError) as e:
        raise ConfigError(f"--model {model} --width {width} --size {size}: cannot build or run it ({first_line(e)}); "
                          f"choose a larger --size or another --width or --model") from None
    state_bytes = 4 * 4 * sum(p.numel() for p in net.parameters())  # fp32 weights, gradients, momentum, a copy
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if state_bytes > memory:
        raise ConfigError(f"--model {model} --width {width}: its weights, gradients and optimizer state need "
                          f"{state_bytes / 2**30:,.0f} GiB, more than this machine's {memory / 2**30:,.0f} GiB; "
                          f"choose a smaller --width")


def check_ranks(option: str, n: int | None) -> None:
    """ConfigError for more ranks than this machine can usefully run (the limit `phalanx train` applies)."""
    most = max_processes()
    if n is not None and n > most:
        raise ConfigError(f"{option} {n}: more ranks than this node can usefully run (at most {most})")


def train_rate(nproc: int, threads: int, steps: int, batch: int, extra: list[str]) -> dict:
    """Run a short real training and read its steady-state img/s from metrics.jsonl."""
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        cmd = [sys.executable, "-m", "phalanx", "train", "--nproc", str(nproc), "--threads_per_rank", str(threads),
               "--epochs", "1", "--max_steps", str(steps), "--global_batch", str(batch), "--progress", "false",
               "--ckpt.at_epoch_end", "false", "--run_dir", str(run_dir), *extra]
        t0 = time.perf_counter()
        r = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if r.returncode == 2:  # the training refused its options (those after `--`): the user's to fix
            said = (r.stderr.strip().splitlines() or ["exit code 2"])[-1].removeprefix("phalanx: error: ")
            raise ConfigError(f"the benchmark's training refused its options: {said}")
        if r.returncode != 0:
            raise RuntimeError(f"benchmark run failed:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
        rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        rates = [x["img_s"] for x in rows if x["event"] == "train"]
        rates = rates[1:] or rates  # the first window includes warm-up
        summary = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").is_file() else {}
        return {"nproc": nproc, "threads": threads, "img_s": round(sum(rates) / max(1, len(rates)), 1),
                "wall_s": round(wall, 1), "acc": summary.get("acc"), "memory_per_rank": summary.get("memory_per_rank")}


def scaling(max_world: int | None = None, steps: int = 90, global_batch: int = 512, json_path: Path | None = None,
            extra: list[str] = ()) -> int:
    """img/s for world sizes 1..max_world (default: the GPUs, or the cores) and the scaling efficiency; on CPU
    also the same cores as 1 process x all threads against all processes x 1 thread."""
    from phalanx import runtime  # deferred: doctor imports this module for matmul_peak
    from phalanx.runtime.cpu import usable_cores  # deferred: doctor imports this module for matmul_peak
    accel = runtime.accelerator()
    on_devices = accel.device_count() > 0  # ranks bound to devices (GPUs): one thread each
    max_world = max_world or accel.device_count() or usable_cores()
    extra = list(extra)
    cores = usable_cores()
    rows = []
    for n in range(1, max_world + 1):
        threads = 1 if on_devices else max(1, cores // n)
        rows.append(train_rate(n, threads, steps, global_batch, extra))
    base = rows[0]["img_s"]
    for r in rows:
        r["speedup"] = round(r["img_s"] / base, 3)
        r["efficiency"] = round(r["img_s"] / (base * r["nproc"]), 3)
    layouts = []
    if not on_devices and cores > 1:  # same cores, split differently: processes x threads
        layouts = [train_rate(1, cores, steps, global_batch, extra),
                   train_rate(cores, 1, steps, global_batch, extra)]
    out = {"device": accel.kind, "cores": cores, "global_batch": global_batch, "steps": steps,
           "torch": torch.__version__, "scaling": rows, "layouts": layouts,
           "date": time.strftime("%Y-%m-%d")}
    print(f"{'world':>5} {'threads':>7} {'img/s':>9} {'speedup':>8} {'efficiency':>10}")
    for r in rows:
        print(f"{r['nproc']:>5} {r['threads']:>7} {r['img_s']:>9,.0f} {r['speedup']:>8.2f} {r['efficiency']:>10.2f}")
    for r in layouts:
        print(f"layout {r['nproc']} process(es) x {r['threads']} thread(s): {r['img_s']:,.0f} img/s")
    if json_path:
        Path(json_path).write_text(json.dumps(out, indent=1))
    print(json.dumps(out))
    return 0


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int = 2048, seconds: float = 1.0) -> float:
    """Achieved FLOP/s of a large square matmul on this device and dtype: the practical peak."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    from phalanx import runtime  # deferred: doctor imports this module for matmul_peak
    sync = runtime.of(device).synchronize
    sync(device)
    it, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        it += 1
    sync(device)
    return 2 * n ** 3 * it / (time.perf_counter() - t0)


def flops_per_image(model: torch.nn.Module, shape: tuple[int, int, int], batch: int = 8) -> dict:
    """Forward and forward+backward FLOPs per image, counted by torch.utils.flop_counter."""
    from torch.utils.flop_counter import FlopCounterMode
    x = torch.randn(batch, *shape)
    with FlopCounterMode(display=False) as fc:
        model(x)
    fwd = fc.get_total_flops() / batch
    with FlopCounterMode(display=False) as fc:
        model(x).sum().backward()
    return {"forward": fwd, "train": fc.get_total_flops() / batch}


def flops(model: str = "phalanx_cnn", width: int = 64, size: int = 28, channels: int = 1, batch: int = 256,
          precision: str = "auto", steps: int = 20) -> dict:
    """FLOPs per image, the achieved FLOP/s of training steps (`batch` images per step, this process) and their
    fraction of a matmul peak measured in the same run; printed, and returned."""
    from phalanx import runtime  # deferred: doctor imports this module for matmul_peak
    from phalanx.models import build_model  # deferred: doctor imports this module for matmul_peak
    from phalanx.train.precision import Precision  # deferred: doctor imports this module for matmul_peak
    accel = runtime.accelerator()
    dev = accel.bind(0)
    net = build_model(model, 10, channels, size, width)
    counts = flops_per_image(net, (channels, size, size))
    net = net.to(dev).to(memory_format=torch.channels_last)
    prec = Precision.from_config(precision, accel)
    amp = prec.dtype
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(batch, channels, size, size, device=dev).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,), device=dev)

    def step():
        with prec.autocast():
            loss = torch.nn.functional.cross_entropy(net(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    accel.synchronize(dev)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    accel.synchronize(dev)
    img_s = steps * batch / (time.perf_counter() - t0)
    achieved = img_s * counts["train"]
    peak = matmul_peak(dev, amp or torch.float32)
    out = {"model": model, "device": str(dev), "threads": torch.get_num_threads(), "precision": prec.name,
           "flops_per_image_forward": counts["forward"], "flops_per_image_train": counts["train"],
           "img_s": round(img_s, 1), "achieved_flop_s": achieved, "matmul_peak_flop_s": peak,
           "fraction_of_peak": round(achieved / peak, 4)}
    print(f"{model}: {counts['forward'] / 1e6:.1f} MFLOP/image forward, {counts['train'] / 1e6:.1f} train; "
          f"{img_s:,.0f} img/s = {achieved / 1e9:.1f} GFLOP/s; matmul peak {peak / 1e9:.1f} GFLOP/s "
          f"({prec.name}) -> {100 * achieved / peak:.1f}% of peak")
    print(json.dumps(out))
    return out


def step_split(nproc: int, model: str = "phalanx_cnn", width: int = 32, global_batch: int = 512,
               shape: tuple[int, int, int] = (28, 28, 1), precision: str = "fp32") -> dict:
    """Seconds per step of compute (forward + backward), gradient all-reduce and optimizer, for `nproc` ranks
    of one thread each, measured in this process (phalanx.tools.tune: threads for ranks, a real gloo group)."""
    # deferred: doctor imports this module for matmul_peak
    from phalanx.tools.tune import Choice, Question, measure_choice
    q = Question("cpu", nproc, ((nproc, 1),), (precision,), (True,), (model, width, "batch", "relu"), shape, 10,
                 global_batch)
    phases: dict = {}
    img_s = measure_choice(Choice(nproc, 1, precision, True), q, min_seconds=1.0, max_steps=20, phases=phases)
    comm = phases["comm_s"]
    return {"nproc": nproc, "model": model, "img_s": round(img_s, 1),
            "compute_ms": round(1e3 * phases["compute_s"], 2), "allreduce_ms": round(1e3 * comm, 2),
            "optimizer_ms": round(1e3 * phases["optim_s"], 2), "grad_mb": round(phases["grad_bytes"] / 2**20, 3),
            "bus_gb_s": round(2 * (nproc - 1) / nproc * phases["grad_bytes"] / comm / 1e9, 3) if nproc > 1 else None,
            "comm_fraction": round(comm / (phases["compute_s"] + comm + phases["optim_s"]), 4)}


def step(nproc: int | None = None, model: str = "phalanx_cnn", width: int = 32, global_batch: int = 512) -> int:
    """The split of a training step into compute, gradient all-reduce and optimizer, for 1..nproc (default: the
    cores) single-thread ranks, on the CPU."""
    from phalanx.runtime.cpu import usable_cores  # deferred: doctor imports this module for matmul_peak
    rows = [step_split(n, model, width, global_batch) for n in range(1, (nproc or usable_cores()) + 1)]
    print(_step_table(rows))
    print(json.dumps({"step_split": rows, "torch": torch.__version__}))
    return 0


def _step_table(rows: list[dict]) -> str:
    lines = [f"{'ranks':>5} {'img/s':>8} {'compute ms':>10} {'all-reduce ms':>13} {'optimizer ms':>12} "
             f"{'grad MB':>8} {'bus GB/s':>8} {'comm %':>6}"]
    for r in rows:
        bus = f"{r['bus_gb_s']:.2f}" if r["bus_gb_s"] is not None else "-"
        lines.append(f"{r['nproc']:>5} {r['img_s']:>8,.0f} {r['compute_ms']:>10.1f} {r['allreduce_ms']:>13.2f} "
                     f"{r['optimizer_ms']:>12.2f} {r['grad_mb']:>8.2f} {bus:>8} {100 * r['comm_fraction']:>5.1f}%")
    return "\n".join(lines)


def loader_rate(data: str = "fashion_mnist", global_batch: int = 512, steps: int = 40) -> dict:
    """img/s of one rank's input pipeline alone (gather from the memory-mapped store, augment, normalise),
    on this process's threads, on the CPU."""
    from phalanx.config import AugmentConfig  # deferred: doctor imports this module for matmul_peak
    from phalanx.data.augment import Normalize  # deferred: doctor imports this module for matmul_peak
    from phalanx.data.loader import TrainLoader  # deferred: doctor imports this module for matmul_peak
    from phalanx.data.sampler import GlobalSampler  # deferred: doctor imports this module for matmul_peak
    from phalanx.data.sources import load_store  # deferred: doctor imports this module for matmul_peak
    store = load_store(data)
    split = store["train"]
    sampler = GlobalSampler(len(split), global_batch, 0, 1, 0, 1)
    loader = TrainLoader(split, sampler, AugmentConfig(), Normalize(store.mean, store.std, torch.device("cpu"), True),
                         torch.device("cpu"), 0, prefetch=False)
    n, t0 = 0, None
    for i, batch in enumerate(loader.epoch(0)):
        if i == 2:  # after the first batches: page cache and allocator warm
            t0, n = time.perf_counter(), 0
        n += len(batch.y)
        if i >= steps + 2:
            break
    return {"data": data, "global_batch": global_batch, "threads": torch.get_num_threads(),
            "img_s": round(n / (time.perf_counter() - t0), 1)}


def loader(data: str = "fashion_mnist", global_batch: int = 512, steps: int = 40) -> int:
    """img/s of the input pipeline alone."""
    out = loader_rate(data, global_batch, steps)
    print(f"loader: {out['img_s']:,.0f} img/s ({data}, batch {global_batch}, {out['threads']} thread(s))")
    print(json.dumps(out))
    return 0


def everything(out_dir: Path = Path("bench"), steps: int = 60) -> int:
    """Scaling, step split, loader and FLOPs in one run: one JSON, one table, one PNG (in `out_dir`)."""
    import contextlib
    import io

    from phalanx.runtime.cpu import usable_cores  # deferred: doctor imports this module for matmul_peak
    out_dir = Path(out_dir)
    cores = usable_cores()
    scaling_rows = [train_rate(n, max(1, cores // n), steps, 512, []) for n in range(1, cores + 1)]
    split_rows = [step_split(n) for n in range(1, cores + 1)]
    load = loader_rate()
    with contextlib.redirect_stdout(io.StringIO()):  # its own lines: the summary below says it
        fl = flops(width=32, batch=256)
    out = {"cores": cores, "torch": torch.__version__, "scaling": scaling_rows, "step_split": split_rows,
           "loader": load, "flops": fl, "date": time.strftime("%Y-%m-%d")}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "bench.json").write_text(json.dumps(out, indent=1))
    print(f"{'world':>5} {'threads':>7} {'train img/s':>11}")
    for r in scaling_rows:
        print(f"{r['nproc']:>5} {r['threads']:>7} {r['img_s']:>11,.0f}")
    print(_step_table(split_rows))
    print(f"loader alone: {load['img_s']:,.0f} img/s; {fl['flops_per_image_train'] / 1e6:.1f} MFLOP per training "
          f"image, {100 * fl['fraction_of_peak']:.1f}% of the measured matmul peak")
    try:
        plot(out, out_dir / "bench.png")
        print(f"plot: {out_dir / 'bench.png'}")
    except ImportError:
        print("plot: matplotlib is not installed (pip install matplotlib)")
    print(json.dumps(out))
    return 0


def plot(out: dict, path: Path) -> None:
    """Three panels: training img/s against world size (with the loader's img/s for scale), the step split
    against world size, and the achieved FLOP/s against the matmul peak."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(1, 3, figsize=(14, 4))
    sc = out["scaling"]
    ax[0].plot([r["nproc"] for r in sc], [r["img_s"] for r in sc], "o-", label="training")
    ax[0].axhline(out["loader"]["img_s"], color="gray", ls="--", label="loader alone (1 rank)")
    ax[0].set_yscale("log")  # the loader alone is often 10-100x the training: both stay readable
    ax[0].set(xlabel="ranks (cores split among them)", ylabel="img/s (log scale)", title="throughput against world size")
    ax[0].set_xticks([r["nproc"] for r in sc])
    ax[0].legend()
    sp = out["step_split"]
    xs = [r["nproc"] for r in sp]
    bottom = [0.0] * len(sp)
    for key, label in (("compute_ms", "forward + backward"), ("allreduce_ms", "gradient all-reduce"),
                       ("optimizer_ms", "optimizer")):
        vals = [r[key] for r in sp]
        ax[1].bar(xs, vals, bottom=bottom, label=label)
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax[1].set(xlabel="single-thread ranks", ylabel="ms per step (rank 0)", title="where a step goes")
    ax[1].set_xticks(xs)
    ax[1].legend()
    fl = out["flops"]
    ax[2].bar(["achieved (training)", "matmul peak"], [fl["achieved_flop_s"] / 1e9, fl["matmul_peak_flop_s"] / 1e9])
    ax[2].set(ylabel="GFLOP/s", title=f"{fl['model']}: {100 * fl['fraction_of_peak']:.0f}% of peak")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

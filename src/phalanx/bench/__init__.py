"""`phalanx bench`: throughput against world size and layout, and FLOP accounting.

    phalanx bench scaling [--max-world N] [--steps S] [--global_batch B] [--json FILE]
    phalanx bench flops   [--model NAME] [--batch B] [--precision auto|bf16|fp32]
    phalanx bench step    [--nproc N] [--model NAME] [--width W] [--global_batch B]   compute vs communication
    phalanx bench loader  [--data D] [--global_batch B] [--steps S]                    input pipeline img/s
    phalanx bench all     [--out DIR]     all of the above: one JSON, one table, one PNG (bench.png)

Each prints a table and one JSON object (last line of stdout).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


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
        if r.returncode != 0:
            raise RuntimeError(f"benchmark run failed:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
        rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        rates = [x["img_s"] for x in rows if x["event"] == "train"]
        rates = rates[1:] or rates  # the first window includes warm-up
        summary = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").is_file() else {}
        return {"nproc": nproc, "threads": threads, "img_s": round(sum(rates) / max(1, len(rates)), 1),
                "wall_s": round(wall, 1), "acc": summary.get("acc"), "memory_per_rank": summary.get("memory_per_rank")}


def scaling(argv: list[str]) -> int:
    from phalanx import runtime
    from phalanx.runtime.cpu import usable_cores
    p = argparse.ArgumentParser(prog="phalanx bench scaling", description="img/s for world sizes 1..N and the "
                                "scaling efficiency; on CPU also compares process x thread layouts.")
    accel = runtime.accelerator()
    on_devices = accel.device_count() > 0  # ranks bound to devices (GPUs): one thread each
    default_n = accel.device_count() or usable_cores()
    p.add_argument("--max-world", type=int, default=default_n, help="largest world size (default: GPUs or cores)")
    p.add_argument("--steps", type=int, default=90, help="optimizer steps per measurement (logged every 29)")
    p.add_argument("--global_batch", type=int, default=512, help="global batch (fixed across world sizes)")
    p.add_argument("--json", type=Path, help="also write the JSON here")
    p.add_argument("extra", nargs="*", help="extra `phalanx train` options, after --")
    a = p.parse_args(argv)
    cores = usable_cores()
    rows = []
    for n in range(1, a.max_world + 1):
        threads = 1 if on_devices else max(1, cores // n)
        rows.append(train_rate(n, threads, a.steps, a.global_batch, a.extra))
    base = rows[0]["img_s"]
    for r in rows:
        r["speedup"] = round(r["img_s"] / base, 3)
        r["efficiency"] = round(r["img_s"] / (base * r["nproc"]), 3)
    layouts = []
    if not on_devices and cores > 1:  # same cores, split differently: processes x threads
        layouts = [train_rate(1, cores, a.steps, a.global_batch, a.extra),
                   train_rate(cores, 1, a.steps, a.global_batch, a.extra)]
    out = {"device": accel.kind, "cores": cores, "global_batch": a.global_batch, "steps": a.steps,
           "torch": torch.__version__, "scaling": rows, "layouts": layouts,
           "date": time.strftime("%Y-%m-%d")}
    print(f"{'world':>5} {'threads':>7} {'img/s':>9} {'speedup':>8} {'efficiency':>10}")
    for r in rows:
        print(f"{r['nproc']:>5} {r['threads']:>7} {r['img_s']:>9,.0f} {r['speedup']:>8.2f} {r['efficiency']:>10.2f}")
    for r in layouts:
        print(f"layout {r['nproc']} process(es) x {r['threads']} thread(s): {r['img_s']:,.0f} img/s")
    if a.json:
        a.json.write_text(json.dumps(out, indent=1))
    print(json.dumps(out))
    return 0


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int = 2048, seconds: float = 1.0) -> float:
    """Achieved FLOP/s of a large square matmul on this device and dtype: the practical peak."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    from phalanx import runtime
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


def flops(argv: list[str]) -> int:
    from phalanx import runtime
    from phalanx.models import build_model
    from phalanx.train.precision import Precision
    p = argparse.ArgumentParser(prog="phalanx bench flops", description="FLOPs per image, achieved FLOP/s in "
                                "training steps and their fraction of a matmul peak measured in the same run.")
    p.add_argument("--model", default="phalanx_cnn")
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--size", type=int, default=28)
    p.add_argument("--channels", type=int, default=1)
    p.add_argument("--batch", type=int, default=256, help="per-process batch")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    p.add_argument("--steps", type=int, default=20)
    a = p.parse_args(argv)
    accel = runtime.accelerator()
    dev = accel.bind(0)
    model = build_model(a.model, 10, a.channels, a.size, a.width)
    counts = flops_per_image(model, (a.channels, a.size, a.size))
    model = model.to(dev).to(memory_format=torch.channels_last)
    prec = Precision.from_config(a.precision, accel)
    amp = prec.dtype
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(a.batch, a.channels, a.size, a.size, device=dev).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (a.batch,), device=dev)

    def step():
        with prec.autocast():
            loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    accel.synchronize(dev)
    t0 = time.perf_counter()
    for _ in range(a.steps):
        step()
    accel.synchronize(dev)
    img_s = a.steps * a.batch / (time.perf_counter() - t0)
    achieved = img_s * counts["train"]
    peak = matmul_peak(dev, amp or torch.float32)
    out = {"model": a.model, "device": str(dev), "threads": torch.get_num_threads(), "precision": prec.name,
           "flops_per_image_forward": counts["forward"], "flops_per_image_train": counts["train"],
           "img_s": round(img_s, 1), "achieved_flop_s": achieved, "matmul_peak_flop_s": peak,
           "fraction_of_peak": round(achieved / peak, 4)}
    print(f"{a.model}: {counts['forward'] / 1e6:.1f} MFLOP/image forward, {counts['train'] / 1e6:.1f} train; "
          f"{img_s:,.0f} img/s = {achieved / 1e9:.1f} GFLOP/s; matmul peak {peak / 1e9:.1f} GFLOP/s "
          f"({prec.name}) -> {100 * achieved / peak:.1f}% of peak")
    print(json.dumps(out))
    return 0


def step_split(nproc: int, model: str = "phalanx_cnn", width: int = 32, global_batch: int = 512,
               shape: tuple[int, int, int] = (28, 28, 1), precision: str = "fp32") -> dict:
    """Seconds per step of compute (forward + backward), gradient all-reduce and optimizer, for `nproc` ranks
    of one thread each, measured in this process (phalanx.tune: threads for ranks, a real gloo group)."""
    from phalanx.tune import Choice, Question, measure_choice
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


def step(argv: list[str]) -> int:
    from phalanx.runtime.cpu import usable_cores
    p = argparse.ArgumentParser(prog="phalanx bench step", description="The split of a training step into compute, "
                                "gradient all-reduce and optimizer, for 1..N single-thread ranks (on CPU).")
    p.add_argument("--nproc", type=int, default=usable_cores(), help="largest number of ranks")
    p.add_argument("--model", default="phalanx_cnn")
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--global_batch", type=int, default=512)
    a = p.parse_args(argv)
    rows = [step_split(n, a.model, a.width, a.global_batch) for n in range(1, a.nproc + 1)]
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
    from phalanx.config import AugmentConfig
    from phalanx.data.augment import Normalize
    from phalanx.data.loader import TrainLoader
    from phalanx.data.sampler import GlobalSampler
    from phalanx.data.sources import load_store
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


def loader(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="phalanx bench loader", description="img/s of the input pipeline alone.")
    p.add_argument("--data", default="fashion_mnist")
    p.add_argument("--global_batch", type=int, default=512)
    p.add_argument("--steps", type=int, default=40)
    a = p.parse_args(argv)
    out = loader_rate(a.data, a.global_batch, a.steps)
    print(f"loader: {out['img_s']:,.0f} img/s ({a.data}, batch {a.global_batch}, {out['threads']} thread(s))")
    print(json.dumps(out))
    return 0


def everything(argv: list[str]) -> int:
    """Scaling, step split, loader and FLOPs in one run: one JSON, one table, one PNG."""
    import contextlib
    import io

    from phalanx.runtime.cpu import usable_cores
    p = argparse.ArgumentParser(prog="phalanx bench all", description="every benchmark: JSON, table and bench.png")
    p.add_argument("--out", type=Path, default=Path("bench"), help="folder for bench.json and bench.png")
    p.add_argument("--steps", type=int, default=60, help="optimizer steps per scaling measurement")
    a = p.parse_args(argv)
    cores = usable_cores()
    scaling_rows = [train_rate(n, max(1, cores // n), a.steps, 512, []) for n in range(1, cores + 1)]
    split_rows = [step_split(n) for n in range(1, cores + 1)]
    load = loader_rate()
    flops_out = io.StringIO()
    with contextlib.redirect_stdout(flops_out):
        flops(["--width", "32", "--batch", "256"])
    fl = json.loads(flops_out.getvalue().strip().splitlines()[-1])
    out = {"cores": cores, "torch": torch.__version__, "scaling": scaling_rows, "step_split": split_rows,
           "loader": load, "flops": fl, "date": time.strftime("%Y-%m-%d")}
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "bench.json").write_text(json.dumps(out, indent=1))
    print(f"{'world':>5} {'threads':>7} {'train img/s':>11}")
    for r in scaling_rows:
        print(f"{r['nproc']:>5} {r['threads']:>7} {r['img_s']:>11,.0f}")
    print(_step_table(split_rows))
    print(f"loader alone: {load['img_s']:,.0f} img/s; {fl['flops_per_image_train'] / 1e6:.1f} MFLOP per training "
          f"image, {100 * fl['fraction_of_peak']:.1f}% of the measured matmul peak")
    try:
        plot(out, a.out / "bench.png")
        print(f"plot: {a.out / 'bench.png'}")
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


def cli(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    sub = {"scaling": scaling, "flops": flops, "step": step, "loader": loader, "all": everything}.get(argv[0])
    if sub is None:
        print(f"phalanx: error: unknown benchmark {argv[0]!r}; choose scaling, flops, step, loader or all",
              file=sys.stderr)
        return 2
    return sub(argv[1:])

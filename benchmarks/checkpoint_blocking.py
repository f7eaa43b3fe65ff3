"""How long a training step is blocked by one checkpoint, synchronous against asynchronous (`--ckpt.async`).

    python benchmarks/checkpoint_blocking.py [--models phalanx_cnn,resnet18,resnet50] [--repeats 3]

For each model: its weights, SGD momentum and an EMA copy (what a Phalanx checkpoint holds), written with
the same functions a run uses (train/checkpoint.py's atomic save; train/checkpoint_writer.py's stage and
background writer). Synchronous: the step waits for the whole write (safetensors, fsync, checksums, rename).
Asynchronous: the step waits for the copy into host memory only; the write's own time is reported beside it.
Prints a table and one JSON object (last line); --json writes it to a file. Medians of --repeats (the first
checkpoint of a run also allocates the host copy that later ones reuse).
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from phalanx.models import build_model
from phalanx.train import checkpoint as ckpt
from phalanx.train.checkpoint_writer import CheckpointWriter


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration, subprocess.TimeoutExpired):
        return platform.processor() or "unknown CPU"


def training_state(name: str):
    channels, size = (1, 28) if name.startswith("phalanx") else (3, 32)
    model = build_model(name, 10, channels, size, 24)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, channels, size, size)).sum().backward()
    opt.step()  # momentum buffers exist, as in a checkpoint after the first step
    ema = {k: v.clone() for k, v in model.state_dict().items()}
    state = {"position": {"epoch": 0, "step": 1, "global_step": 1}, "scheduler": {"last_epoch": 1},
             "rng": {"0": {"torch": torch.get_rng_state()}}}
    return model, opt, ema, state


def measure(name: str, repeats: int, root: Path) -> dict:
    model, opt, ema, state = training_state(name)
    params = sum(p.numel() for p in model.parameters())
    sync_s, stage_s, write_s = [], [], []
    writer = CheckpointWriter(enabled=True)  # one writer, as in a run: its host copy is reused
    for i in range(repeats):
        t0 = time.perf_counter()
        ckpt.save(root / f"{name}-sync", i + 1, model.state_dict(), opt.state_dict(), state, ema, keep=1)
        sync_s.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        m, o, e, s = writer.stage((model.state_dict(), opt.state_dict(), ema, state))
        writer.submit(lambda: ckpt.save(root / f"{name}-async", i + 1, m, o, s, e, keep=1), t0)
        stage_s.append(writer.blocked_s[-1])
        writer.wait()
        write_s.append(time.perf_counter() - t0)
    writer.close()
    mib = sum(f.stat().st_size for f in (root / f"{name}-sync").rglob("*") if f.is_file()) / 2**20
    return {"model": name, "params_m": round(params / 1e6, 2), "checkpoint_mib": round(mib, 1),
            "sync_blocked_ms": round(1e3 * statistics.median(sync_s), 1),
            "async_blocked_ms": round(1e3 * statistics.median(stage_s), 1),
            "async_write_ms": round(1e3 * statistics.median(write_s), 1)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="phalanx_cnn,resnet18,resnet50")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="intra-op threads (a rank's, on CPU)")
    p.add_argument("--json", default="")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory(prefix="phalanx-ckpt-bench-") as tmp:
        rows = [measure(m, a.repeats, Path(tmp)) for m in a.models.split(",")]
    out = {"cpu": cpu_model(), "torch": torch.__version__, "threads": a.threads, "repeats": a.repeats,
           "date": time.strftime("%Y-%m-%d"), "rows": rows}
    print(f"{'model':<12} {'params':>8} {'ckpt MiB':>9} {'sync blocked':>13} {'async blocked':>14} {'async write':>12}")
    for r in rows:
        print(f"{r['model']:<12} {r['params_m']:>7.2f}M {r['checkpoint_mib']:>9.1f} {r['sync_blocked_ms']:>10.1f} ms"
              f" {r['async_blocked_ms']:>11.1f} ms {r['async_write_ms']:>9.1f} ms")
    print(f"({out['cpu']}, torch {out['torch']}, {a.threads} thread(s), median of {a.repeats})")
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Per-step overhead of Phalanx against the same model, batch and precision in a plain PyTorch loop.

The plain loop trains on a uint8 tensor already in memory (gather, float, normalise: no augmentation);
Phalanx runs `phalanx train --nproc 1 --ema 0` with augmentation, logging, progress accounting
and the preemption check (EMA is a training method, not overhead: it is off on both sides). Both
use the same threads and the same model, whitened stem included. Phalanx's malloc tuning is off
(`--parallel.keep_cpu_memory false`): it speeds up any loop, so it is not the loop's overhead.
Prints a table and JSON.

    python benchmarks/step_overhead.py [--steps 80] [--batch 512] [--threads 2] [--width 64]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F


def plain(steps: int, batch: int, width: int, threads: int) -> float:
    from phalanx.data.sources import load_store
    from phalanx.models import build_model
    torch.set_num_threads(threads)
    store = load_store("fashion_mnist")
    images = torch.from_numpy(np.array(store["train"].images)).permute(0, 3, 1, 2)  # uint8 NCHW, channels-last
    labels = torch.from_numpy(np.array(store["train"].labels))
    model = build_model("phalanx_cnn", 10, 1, 28, width)
    model.whiten_stem((images[:2048].float() / 255 - 0.286) / 0.353)  # the same frozen stem as Phalanx's
    model = model.to(memory_format=torch.channels_last)
    trained = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(trained, lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    g = torch.Generator().manual_seed(0)

    def step():
        idx = torch.randint(0, len(labels), (batch,), generator=g)
        x = ((images[idx].float() / 255 - 0.286) / 0.353).contiguous(memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
        F.cross_entropy(out.float(), labels[idx], label_smoothing=0.1).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(5):
        step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * batch / (time.perf_counter() - t0)


def phalanx(steps: int, batch: int, width: int, threads: int, extra: list[str]) -> float:
    from phalanx.tools.bench import train_rate
    # +29 steps: the first logged window (warm-up) is dropped by train_rate.
    return train_rate(1, threads, steps + 29, batch, ["--model.width", str(width), "--precision", "bf16",
                                                      "--ema", "0", "--parallel.keep_cpu_memory", "false",
                                                      *extra])["img_s"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=80)
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3, help="alternating measurements of each; medians reported")
    p.add_argument("extra", nargs="*", help="extra `phalanx train` options, after --")
    a = p.parse_args()
    # Alternate the two so that drifts of a shared machine's speed hit both alike.
    phs, pls = [], []
    for _ in range(a.repeats):
        phs.append(phalanx(a.steps, a.batch, a.width, a.threads, a.extra))
        pls.append(plain(a.steps, a.batch, a.width, a.threads))
    ph, pl = statistics.median(phs), statistics.median(pls)
    overhead = (pl - ph) / pl
    out = {"plain_img_s": round(pl, 1), "phalanx_img_s": round(ph, 1), "overhead": round(overhead, 4),
           "plain_runs": [round(x, 1) for x in pls], "phalanx_runs": [round(x, 1) for x in phs],
           "batch": a.batch, "width": a.width, "threads": a.threads, "date": time.strftime("%Y-%m-%d"),
           "torch": torch.__version__}
    print(f"plain PyTorch {pl:,.0f} img/s | phalanx {ph:,.0f} img/s | overhead {100 * overhead:+.1f}%")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""FSDP2 against DDP on this machine: training throughput and what each rank holds (parameters,
gradients, optimizer state), from real `phalanx train` runs that differ only in --parallel.strategy.

    python benchmarks/fsdp_vs_ddp.py [--nproc 2] [--steps 60] [--models phalanx_cnn,mnist_net,resnet18]

Prints a table and one JSON object (last line). Throughput is the mean of the logged windows after
the first (warm-up); memory comes from summary.json's `memory_per_rank`.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch


def run(model: str, strategy: str, nproc: int, steps: int, batch: int, extra: list[str]) -> dict:
    from phalanx.tools.bench import train_rate
    r = train_rate(nproc, 1, steps, batch, ["--model.name", model, "--parallel.strategy", strategy, *extra])
    return dict(r, model=model, strategy=strategy)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--global_batch", type=int, default=256)
    p.add_argument("--models", default="phalanx_cnn,mnist_net,resnet18")
    p.add_argument("extra", nargs="*", help="extra `phalanx train` options, after --")
    a = p.parse_args()
    rows = []
    for model in a.models.split(","):
        pair = {s: run(model, s, a.nproc, a.steps, a.global_batch, a.extra) for s in ("ddp", "fsdp")}
        ddp, fsdp = pair["ddp"], pair["fsdp"]
        fsdp["memory_ratio"] = round(fsdp["memory_per_rank"]["total_bytes"] / ddp["memory_per_rank"]["total_bytes"], 3)
        fsdp["step_time_ratio"] = round(ddp["img_s"] / fsdp["img_s"], 3)
        rows += [ddp, fsdp]
    from phalanx.runtime.cpu import cpu_model
    out = {"cpu": cpu_model(), "torch": torch.__version__, "nproc": a.nproc, "global_batch": a.global_batch,
           "steps": a.steps, "rows": rows, "date": time.strftime("%Y-%m-%d")}
    print(f"{'model':<12} {'strategy':<8} {'img/s':>8} {'MiB/rank':>9} {'memory vs ddp':>13} {'step time vs ddp':>16}")
    for r in rows:
        mib = r["memory_per_rank"]["total_bytes"] / 2**20
        print(f"{r['model']:<12} {r['strategy']:<8} {r['img_s']:>8,.0f} {mib:>9.1f} "
              f"{r.get('memory_ratio', 1.0):>13.3f} {r.get('step_time_ratio', 1.0):>16.3f}")
    print(f"({out['cpu']}, {a.nproc} ranks, global batch {a.global_batch}, torch {out['torch']})")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())

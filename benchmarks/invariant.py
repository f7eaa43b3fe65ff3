"""What `--parallel.invariant true` costs: img/s and bytes sent per step, against plain DDP, at 2 ranks.

    python benchmarks/invariant.py [--nproc 2] [--steps 20] [--repeats 5] [--micro_batches 32,128] [--train_steps 60]
    python benchmarks/invariant.py --strategy fsdp      # FSDP2 against invariant FSDP2 (results/invariant_fsdp.json)

Two measurements, the default recipe's model (phalanx_cnn, width 32, Fashion-MNIST's 28x28x1, global batch 256):
- the step alone: each rank (started by torch.distributed.run, one thread each) runs phalanx's own `train_step`
  on synthetic batches, and reads the bytes its TCP sockets sent (`ss -tin`, the kernel's bytes_sent: gloo's
  payload and framing, what really went over the loopback) before and after the timed steps; DDP's all-reduce
  and the invariant all_to_all + all_gather alike.
- end to end: short real `phalanx train` runs (`--max_steps`, Fashion-MNIST), their logged img/s.
Repeats alternate the settings, so that a busier minute of a shared machine hits all of them; the table gives the
median and the best of the repeats (the best is the least disturbed by other work on the machine).
Writes benchmarks/results/invariant.json and prints a table and one JSON object (last line).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def socket_bytes_sent(pid: int) -> int:
    """Bytes sent so far by the TCP sockets of process `pid` (their kernel counters, from `ss -tinp`)."""
    out = subprocess.run(["ss", "-tinpH"], capture_output=True, text=True, check=True).stdout
    total, mine = 0, False
    for line in out.splitlines():
        if not line.startswith((" ", "\t")):  # a socket's line; its counters follow on the next, indented
            mine = f"pid={pid}," in line
        elif mine:
            m = re.search(r"\bbytes_sent:(\d+)", line)
            total += int(m.group(1)) if m else 0
    return total


def worker(a) -> None:
    """One rank: `a.steps` timed optimizer steps of phalanx's train_step; writes its figures as JSON."""
    import torch

    from phalanx import config as C
    from phalanx.data.loader import Batch
    from phalanx.parallel.invariant import loss_scale, micro_steps
    from phalanx.runtime import dist as rdist
    from phalanx.train.setup import build_state
    from phalanx.train.step import train_step

    pairs = [("parallel.threads_per_rank", "1"), ("precision", a.precision), ("tune", "false"),
             ("parallel.strategy", a.strategy)]
    if a.micro_batch:
        pairs += [("parallel.invariant", "true"), ("parallel.micro_batch", str(a.micro_batch))]
    cfg = C.build_config(None, pairs)
    env = rdist.init(cfg.parallel, cfg.device)
    import numpy as np

    class Store(dict):  # what build_state reads of a prepared store: the shape, the classes, training images
        shape, classes = (28, 28, 1), list(range(10))

    class Split:  # synthetic training images: the house CNN's whitened stem is fitted to them
        images = np.random.default_rng(0).integers(0, 256, (2048, 28, 28, 1), dtype=np.uint8)

        def __len__(self) -> int:
            return len(self.images)

    store = Store(train=Split())
    state = build_state(cfg, env, store, lambda t: t.float() / 255, total_steps=10_000, steps_per_epoch=100)
    accum = micro_steps(cfg, env.world)
    per_micro = cfg.global_batch // env.world // accum
    g = torch.Generator().manual_seed(env.rank)
    # as the loader hands them over: NHWC storage seen as NCHW (channels-last strides), normalised floats
    x = torch.randn(accum, per_micro, 28, 28, 1, generator=g).permute(0, 1, 4, 2, 3)
    y = torch.randint(0, 10, (accum, per_micro), generator=g)
    idx = torch.arange(per_micro)
    scale = loss_scale(cfg, env.world)

    def step(k: int) -> None:
        for m in range(accum):
            train_step(state, Batch(k, m, x[m], y[m], idx), accum, scale, cfg.optim.label_smoothing,
                       cfg.optim.grad_clip)

    for k in range(a.warmup):
        step(k)
    torch.distributed.barrier()
    sent0, t0 = socket_bytes_sent(os.getpid()), time.perf_counter()
    for k in range(a.steps):
        step(a.warmup + k)
    torch.distributed.barrier()
    seconds, sent = time.perf_counter() - t0, socket_bytes_sent(os.getpid()) - sent0
    # the two barriers' own bytes (a few hundred) are counted too; negligible against MBs
    out = {"rank": env.rank, "world": env.world, "threads": torch.get_num_threads(), "seconds": seconds,
           "img_s": cfg.global_batch * a.steps / seconds, "bytes_sent_per_step": sent / a.steps,
           "precision": state.precision.name, "micro_steps": accum,
           "params": sum(p.numel() for p in state.plain.parameters())}
    Path(a.out, f"rank{env.rank}.json").write_text(json.dumps(out))
    rdist.teardown()


def step_run(nproc: int, micro_batch: int, steps: int, warmup: int, precision: str, tmp: Path,
             strategy: str = "ddp") -> dict:
    for f in tmp.glob("rank*.json"):
        f.unlink()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), __file__,
           "--worker", "--out", str(tmp), "--micro_batch", str(micro_batch), "--steps", str(steps), "--warmup",
           str(warmup), "--precision", precision, "--strategy", strategy]
    r = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    if r.returncode:
        raise RuntimeError(f"benchmark ranks failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    ranks = [json.loads((tmp / f"rank{k}.json").read_text()) for k in range(nproc)]
    return {"img_s": min(x["img_s"] for x in ranks),  # the slowest rank's clock: the step ends for all there
            "bytes_sent_per_step": sum(x["bytes_sent_per_step"] for x in ranks) / nproc,
            "threads": ranks[0]["threads"], "precision": ranks[0]["precision"],
            "micro_steps": ranks[0]["micro_steps"], "params": ranks[0]["params"]}


def label(micro_batch: int, strategy: str = "ddp") -> str:
    name = "FSDP2" if strategy == "fsdp" else "DDP"
    return f"{name} invariant, micro_batch {micro_batch}" if micro_batch else f"{name} (invariant off)"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--steps", type=int, default=20, help="timed optimizer steps per step measurement")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=5, help="step measurements per setting")
    p.add_argument("--train_repeats", type=int, default=2, help="end-to-end runs per setting")
    p.add_argument("--micro_batches", default="32,128", help="invariant micro-batch sizes to measure")
    p.add_argument("--precision", default="auto")
    p.add_argument("--train_steps", type=int, default=60, help="steps of each end-to-end run (0: skip them)")
    p.add_argument("--strategy", choices=("ddp", "fsdp"), default="ddp")
    p.add_argument("--json", default="", help="default: results/invariant.json (ddp), results/invariant_fsdp.json")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", default="", help=argparse.SUPPRESS)
    p.add_argument("--micro_batch", type=int, default=0, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        worker(a)
        return 0

    import tempfile

    from phalanx.runtime.cpu import cpu_model, usable_cores
    settings = [0] + [int(m) for m in a.micro_batches.split(",") if m]
    runs: dict[int, list[dict]] = {m: [] for m in settings}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(a.repeats):  # alternate, so that a slower minute of a shared machine hits every setting
            for m in settings:
                runs[m].append(step_run(a.nproc, m, a.steps, a.warmup, a.precision, Path(tmp), a.strategy))
    rows = []
    for m in settings:
        rates = [r["img_s"] for r in runs[m]]
        sent = [r["bytes_sent_per_step"] for r in runs[m]]
        rows.append({"setting": label(m, a.strategy), "micro_batch": m, "micro_steps_per_rank": runs[m][0]["micro_steps"],
                     "step_img_s": round(statistics.median(rates), 1), "step_img_s_best": round(max(rates), 1),
                     "step_img_s_all": [round(x, 1) for x in rates],
                     "bytes_sent_per_step_per_rank": round(statistics.mean(sent)),
                     "precision": runs[m][0]["precision"], "threads_per_rank": runs[m][0]["threads"]})
    base = rows[0]
    for r in rows:
        r["step_time_ratio"] = round(base["step_img_s"] / r["step_img_s"], 3)
        r["step_time_ratio_best"] = round(base["step_img_s_best"] / r["step_img_s_best"], 3)
        r["bytes_ratio"] = round(r["bytes_sent_per_step_per_rank"] / max(1, base["bytes_sent_per_step_per_rank"]), 2)
    if a.train_steps:
        from phalanx.tools.bench import train_rate
        for r in rows:
            r["train_img_s_all"] = []
        for _ in range(a.train_repeats):
            for r in rows:
                extra = ["--precision", base["precision"], "--tune", "false", "--data", "fashion_mnist",
                         "--parallel.strategy", a.strategy]
                if r["micro_batch"]:
                    extra += ["--parallel.invariant", "true", "--parallel.micro_batch", str(r["micro_batch"])]
                r["train_img_s_all"].append(train_rate(a.nproc, 1, a.train_steps, 256, extra)["img_s"])
        for r in rows:
            r["train_img_s"] = round(statistics.median(r["train_img_s_all"]), 1)
            r["train_img_s_best"] = max(r["train_img_s_all"])
    result = {"date": time.strftime("%Y-%m-%d"), "cpu": cpu_model(), "cores": usable_cores(), "nproc": a.nproc,
              "model": "phalanx_cnn (width 32), 28x28x1, global batch 256", "params": runs[0][0]["params"],
              "strategy": a.strategy, "steps": a.steps, "repeats": a.repeats, "rows": rows}
    print(f"{'setting':30} {'micro-steps':>11} {'step img/s median/best':>23} {'x time':>11} {'sent/step/rank':>15}"
          f" {'x bytes':>8} {'train img/s median/best':>24}")
    for r in rows:
        e2e = f"{r['train_img_s']:,.0f} / {r['train_img_s_best']:,.0f}" if "train_img_s" in r else "-"
        print(f"{r['setting']:30} {r['micro_steps_per_rank']:>11} {r['step_img_s']:>12,.0f} / {r['step_img_s_best']:<8,.0f}"
              f" {r['step_time_ratio']:>5.2f}/{r['step_time_ratio_best']:<5.2f}"
              f" {r['bytes_sent_per_step_per_rank'] / 2**20:>11.3f} MiB {r['bytes_ratio']:>8.2f} {e2e:>24}")
    out = Path(a.json or HERE / "results" / ("invariant.json" if a.strategy == "ddp" else "invariant_fsdp.json"))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Per-step overhead of Phalanx against the same model, batch and precision in a plain PyTorch loop.

The plain loop trains on a uint8 tensor already in memory (gather, float, normalise: no augmentation);
Phalanx runs `phalanx train --nproc 1 --ema 0` with augmentation, logging, progress accounting
and the preemption check (EMA is a training method, not overhead: it is off on both sides). Both
use the same threads and the same model, whitened stem included. Phalanx's malloc tuning is off
(`--parallel.keep_cpu_memory false`): it speeds up any loop, so it is not the loop's overhead.
Prints a table and JSON.

    python benchmarks/step_overhead.py [--steps 80] [--batch 512] [--threads 2] [--width 64]

`--host` measures the host's own time per step instead, with measurements that survive a shared machine:
- the EMA update alone, as it was (lists rebuilt and factors chosen on the device each step) against the
  fused one (lists cached, number factors after the first update), interleaved rounds of back-to-back
  updates on one thread, with the ops each dispatches (torch.profiler's count: load does not change it);
- the profiler's split of `phalanx train --log.profile` of a tiny model (width 8, batch 64, 1 thread):
  the phases' milliseconds per step (absolute, so with the load average beside them).

    python benchmarks/step_overhead.py --host [--width 24] [--rounds 7] [--updates 200] [--save]
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


class BeforeEMA(torch.optim.swa_utils.AveragedModel):
    """DeviceEMA's update as it was before the fused one (commit dd7434b): lists rebuilt, factors on the device."""

    def __init__(self, model, decay):
        super().__init__(model, use_buffers=True)
        self.decay = decay

    @torch.no_grad()
    def update_parameters(self, model, steps=1):
        from phalanx.parallel.model_state import _local
        decay = self.decay ** steps
        ema = _local([*self.module.parameters(), *self.module.buffers()])
        cur = _local([t.detach() for t in (*model.parameters(), *model.buffers())])
        first = self.n_averaged == 0
        keep = torch.where(first, 0.0, decay)
        take = torch.where(first, 1.0, 1.0 - decay)
        floats = [(e, c) for e, c in zip(ema, cur) if e.is_floating_point()]
        if floats:
            es = [e for e, _ in floats]
            torch._foreach_mul_(es, keep)
            torch._foreach_add_(es, torch._foreach_mul([c for _, c in floats], take))
        ints = [(e, c) for e, c in zip(ema, cur) if not e.is_floating_point()]
        if ints:
            es = [e for e, _ in ints]
            mixed = torch._foreach_add(torch._foreach_mul(es, keep), torch._foreach_mul([c for _, c in ints], take))
            torch._foreach_copy_(es, mixed)
        self.n_averaged += 1


def ema_host(width: int, rounds: int, updates: int) -> dict:
    """µs per EMA update, before and fused, in interleaved rounds on one thread; ops dispatched per update."""
    from phalanx.models import build_model
    from phalanx.parallel.model_state import DeviceEMA
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = build_model("phalanx_cnn", 10, 1, 28, width)
    emas = {"before": BeforeEMA(model, 0.98), "fused": DeviceEMA(model, 0.98)}
    for ema in emas.values():
        for _ in range(5):
            ema.update_parameters(model)
    us: dict[str, list[float]] = {k: [] for k in emas}
    for r in range(rounds):
        for name in (list(emas) if r % 2 == 0 else list(emas)[::-1]):
            ema = emas[name]
            t0 = time.perf_counter()
            for _ in range(updates):
                ema.update_parameters(model)
            us[name].append((time.perf_counter() - t0) * 1e6 / updates)
    ops = {}
    for name, ema in emas.items():
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            ema.update_parameters(model)
        ops[name] = sum(1 for e in prof.events() if e.name.startswith("aten::") and e.cpu_parent is None)
    tensors = len(list(model.parameters())) + len(list(model.buffers()))
    med = {k: statistics.median(v) for k, v in us.items()}
    return {"width": width, "tensors": tensors, "rounds": rounds, "updates_per_round": updates,
            "us_per_update": {k: round(v, 1) for k, v in med.items()},
            "us_runs": {k: [round(x, 1) for x in v] for k, v in us.items()},
            "ratio_fused_to_before": round(med["fused"] / med["before"], 3), "top_level_ops": ops}


def host_split(steps: int) -> dict:
    """The profiler's split of a tiny model's step in `phalanx train` (1 thread): ms per step by phase."""
    import subprocess
    import tempfile
    from pathlib import Path
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        cmd = [sys.executable, "-m", "phalanx", "train", "--tune", "false", "--nproc", "1", "--threads_per_rank", "1",
               "--precision", "fp32", "--model.width", "8", "--global_batch", "64", "--max_steps", str(steps + 30),
               "--log.profile", str(steps), "--log.profile_start", "25", "--progress", "false", "--run_dir",
               str(run), "--log.tensorboard", "false", "--ckpt.at_epoch_end", "false", "--eval_every", "100"]
        subprocess.run(cmd, check=True, capture_output=True, timeout=900)
        got = json.loads((run / "profile" / "rank-0.json").read_text())
    return {"step_ms": round(got["step_ms"], 2), "phases_ms": {k: round(v, 2) for k, v in got["phases"].items()},
            "steps": got["steps"]}


def host_main(a) -> int:
    import os
    load = os.getloadavg()
    ema = ema_host(a.width, a.rounds, a.updates)
    split = host_split(a.profile_steps)
    load_after = os.getloadavg()
    out = {"ema": ema, "split": split, "load_average": [round(load[0], 2), round(load_after[0], 2)],
           "cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__}
    e = ema["us_per_update"]
    print(f"EMA update (phalanx_cnn width {a.width}, {ema['tensors']} tensors, 1 thread): before {e['before']:,.1f} "
          f"us, fused {e['fused']:,.1f} us (x{ema['ratio_fused_to_before']:.2f}); top-level ops per update "
          f"{ema['top_level_ops']['before']} -> {ema['top_level_ops']['fused']}")
    print("step split (width 8, batch 64, 1 thread), ms per step: " + ", ".join(
        f"{k} {v:.2f}" for k, v in split["phases_ms"].items()) + f"; step {split['step_ms']:.2f}")
    print(f"load average {load[0]:.2f} -> {load_after[0]:.2f} on {os.cpu_count()} CPUs")
    print(json.dumps(out))
    if a.save:
        from pathlib import Path
        path = Path(__file__).parent / "results" / "step_overhead.json"
        data = json.loads(path.read_text()) if path.exists() else {}
        data.setdefault("host_per_step", []).append(dict(out, label=a.label))
        path.write_text(json.dumps(data) + "\n")
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=80)
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3, help="alternating measurements of each; medians reported")
    p.add_argument("extra", nargs="*", help="extra `phalanx train` options, after --")
    p.add_argument("--host", action="store_true", help="the host's time per step (EMA before/fused, profiler split)")
    p.add_argument("--rounds", type=int, default=7, help="--host: interleaved rounds of EMA updates")
    p.add_argument("--updates", type=int, default=200, help="--host: EMA updates per round")
    p.add_argument("--profile_steps", type=int, default=40, help="--host: profiled steps of the tiny run")
    p.add_argument("--save", action="store_true", help="--host: append to benchmarks/results/step_overhead.json")
    p.add_argument("--label", default="", help="--host: what this measurement is of (saved with it)")
    a = p.parse_args()
    if a.host:
        if a.width == 64:  # the default recipe's width, unless one was given
            a.width = 24
        return host_main(a)
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

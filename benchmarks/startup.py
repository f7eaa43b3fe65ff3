"""Start-up: seconds from the command's start to the first optimizer step, Phalanx's default recipe against a plain
PyTorch script.

Phalanx: `phalanx train` (the default recipe: Fashion-MNIST, its store prepared and the tuner's decision cached
by a first, untimed run) with `--max_steps 1`; its phases come from the run's summary.json (`startup_s`, see
src/phalanx/train/startup.py). Plain: a script that imports torch, reads Fashion-MNIST's idx files with numpy,
builds a small CNN and SGD, and takes one optimizer step; timed the same way, from its process's start (/proc).
The two alternate, `--repeats` times each; medians and every run are printed, with the load average beside them
(a shared machine inflates both alike; read the ratio). Prints a table and JSON; `--save` writes
benchmarks/results/startup.json.

    python benchmarks/startup.py [--repeats 3] [--save] [-- extra phalanx train options]
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FASHION = "/usr/share/datasets/fashion-mnist"

PLAIN = r'''
import os, time
def age():
    with open("/proc/self/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    with open("/proc/uptime") as f:
        up = float(f.read().split()[0])
    return up - int(fields[19]) / os.sysconf("SC_CLK_TCK")
import gzip, sys
import numpy as np
import torch, torch.nn as nn, torch.nn.functional as F
t_import = age()
def idx(name):
    with gzip.open(os.path.join(sys.argv[1], name)) as f:
        data = f.read()
    dims = data[3]
    shape = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * dims).reshape(shape)
x = torch.from_numpy(idx("train-images-idx3-ubyte.gz").copy()).unsqueeze(1)
y = torch.from_numpy(idx("train-labels-idx1-ubyte.gz").astype(np.int64))
t_data = age()
net = nn.Sequential(nn.Conv2d(1, 24, 3, padding=1), nn.BatchNorm2d(24), nn.ReLU(), nn.MaxPool2d(2),
                    nn.Conv2d(24, 48, 3, padding=1), nn.BatchNorm2d(48), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                    nn.Flatten(), nn.Linear(48, 10))
opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, nesterov=True)
t_model = age()
i = torch.randint(0, len(y), (256,))
F.cross_entropy(net((x[i].float() / 255 - 0.286) / 0.353), y[i]).backward()
opt.step()
t_step = age()
print({"imports": round(t_import, 3), "data": round(t_data - t_import, 3), "model": round(t_model - t_data, 3),
       "first_step": round(t_step - t_model, 3), "total": round(t_step, 3)})
'''


def plain(data: str) -> dict:
    out = subprocess.run([sys.executable, "-c", PLAIN, data], capture_output=True, text=True, timeout=600, check=True)
    return ast.literal_eval(out.stdout.strip().splitlines()[-1])  # the dict the script above prints


def phalanx(cache: str, extra: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        subprocess.run([sys.executable, "-m", "phalanx", "train", "--max_steps", "1", "--progress", "false",
                        "--run_dir", str(run), *extra], check=True, capture_output=True, timeout=900,
                       env=dict(os.environ, PHALANX_CACHE=cache))
        return json.loads((run / "summary.json").read_text())["startup_s"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--data", default=FASHION, help="Fashion-MNIST's idx files, for the plain script")
    p.add_argument("--cache", default=os.environ.get("PHALANX_CACHE", str(Path.home() / ".cache" / "phalanx")))
    p.add_argument("--save", action="store_true")
    p.add_argument("extra", nargs="*", help="extra `phalanx train` options, after --")
    a = p.parse_args()
    phalanx(a.cache, a.extra)  # untimed: prepares the store and caches the tuner's decision if needed
    runs: dict[str, list[dict]] = {"phalanx": [], "plain": []}
    loads = [os.getloadavg()[0]]
    for _ in range(a.repeats):
        runs["phalanx"].append(phalanx(a.cache, a.extra))
        runs["plain"].append(plain(a.data))
        loads.append(os.getloadavg()[0])
    med = {k: {ph: round(statistics.median(r[ph] for r in v), 3) for ph in v[0]} for k, v in runs.items()}
    out = {"median_s": med, "runs": runs, "ratio": round(med["phalanx"]["total"] / med["plain"]["total"], 2),
           "load_average": [round(x, 2) for x in loads], "cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d"),
           "extra": a.extra}
    try:
        import torch
        out["torch"] = torch.__version__
    except ImportError:
        pass
    print(f"{'phase':<12} {'phalanx (s)':>11}")
    for ph, v in med["phalanx"].items():
        print(f"{ph:<12} {v:>11.2f}")
    print(f"plain PyTorch script: {med['plain']['total']:.2f} s (imports {med['plain']['imports']:.2f}); "
          f"phalanx {med['phalanx']['total']:.2f} s: x{out['ratio']:.2f}; load average {loads[0]:.2f} -> "
          f"{loads[-1]:.2f} on {os.cpu_count()} CPUs")
    print(json.dumps(out))
    if a.save:
        (Path(__file__).parent / "results" / "startup.json").write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

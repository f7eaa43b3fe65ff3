"""Training img/s of the house CNN by width and batch in one process: what a narrower network buys.

    python benchmarks/cnn_width.py [--threads 2] [--rounds 4] [--configs 32x256 24x256 16x256 ...]

Forward + backward + SGD (Nesterov) of `PhalanxCNN` on random 28x28 grayscale batches, channels-last,
fp32, no data pipeline and no all-reduce: the model's own cost. Configurations are interleaved over
`--rounds` rounds so that a slow spell of a shared machine does not land on one of them; medians are
reported. Prints a table and one JSON line (with the CPU model).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from phalanx.models.cnn import PhalanxCNN
from phalanx.runtime.cpu import cpu_model


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--images", type=int, default=4096, help="images per configuration per round")
    p.add_argument("--configs", nargs="+", default=["32x256", "32x512", "24x256", "24x512", "16x256", "16x128",
                                                    "40x512"], help="WIDTHxBATCH")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    configs = [tuple(int(v) for v in c.split("x")) for c in a.configs]
    setups = {}
    for w, b in configs:
        m = PhalanxCNN(10, 1, w).to(memory_format=torch.channels_last)
        opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, nesterov=True)
        x = torch.randn(b, 1, 28, 28).contiguous(memory_format=torch.channels_last)
        setups[(w, b)] = (m, opt, x, torch.randint(0, 10, (b,)))
    rates: dict[tuple, list[float]] = {c: [] for c in configs}
    for _ in range(a.rounds):
        for c in configs:
            m, opt, x, y = setups[c]
            steps = max(4, a.images // c[1])
            for i in range(steps + 2):  # two warm-up steps
                if i == 2:
                    t0 = time.perf_counter()
                F.cross_entropy(m(x), y).backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            rates[c].append(steps * c[1] / (time.perf_counter() - t0))
    rows = [{"width": w, "batch": b, "img_s": round(statistics.median(rates[(w, b)])),
             "rounds": [round(r) for r in rates[(w, b)]]} for w, b in configs]
    print(f"{cpu_model()}, {a.threads} thread(s), torch {torch.__version__}")
    print(f"{'width':>6s} {'batch':>6s} {'img/s':>8s}")
    for r in rows:
        print(f"{r['width']:>6d} {r['batch']:>6d} {r['img_s']:>8,d}")
    print(json.dumps({"cpu": cpu_model(), "threads": a.threads, "torch": torch.__version__, "results": rows}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

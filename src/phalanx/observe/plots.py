"""Plots of a run's metrics.jsonl: training loss and test accuracy (needs matplotlib, optional)."""
from __future__ import annotations

from pathlib import Path

from phalanx.observe.console import read_metrics


def plot_run(run_dir: Path) -> Path | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = read_metrics(run_dir / "metrics.jsonl")
    train = [r for r in rows if r.get("event") == "train"]
    evals = [r for r in rows if r.get("event") == "eval"]
    if not train and not evals:
        return None
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    a.plot([r["step"] for r in train], [r["loss"] for r in train])
    a.set_xlabel("step")
    a.set_ylabel("training loss")
    a.grid(alpha=0.3)
    b.plot([r["epoch"] for r in evals], [100 * r["acc"] for r in evals], marker="o")
    b.set_xlabel("epoch")
    b.set_ylabel("test accuracy (%)")
    b.grid(alpha=0.3)
    fig.suptitle(run_dir.name)
    fig.tight_layout()
    out = run_dir / "curves.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out

"""Plots of runs (needs matplotlib, optional): curves.png at the end of a run, and the report's figures.

The report's functions take runs as objects with `label`, `color`, `train` (records with step, wall,
loss, lr, img_s), `evals` (records with step, wall, acc, loss), `rank_img_s` ({rank: [(step,
img/s)]}) and `resumes` (records with step, wall), as phalanx.tools.report builds them, and
write one PNG each.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from phalanx.observe.console import is_number, read_metrics
from phalanx.observe.profile import PHASES


def plot_run(run_dir: Path) -> Path | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    # one record per step (a resumed run's re-logged steps once), half-written lines skipped
    train, evals, _, _ = read_metrics(run_dir / "metrics.jsonl")
    train = [r for r in train if is_number(r.get("loss"))]
    evals = [r for r in evals if is_number(r.get("epoch")) and is_number(r.get("acc"))]
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


# ----------------------------------------------------------------------------- the report's figures

def pyplot():
    """matplotlib.pyplot on the file-only Agg backend (ImportError without matplotlib)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, out: Path) -> Path:
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    pyplot().close(fig)
    return out


def _line(ax, runs, rows: str, x: str, y: str, scale: float = 1.0, suffix: str = "") -> bool:
    """One line per run of rows[x] against rows[y]; markers where points are few. False: nothing drawn."""
    drawn = False
    for r in runs:
        pts = [(p[x], p[y] * scale) for p in getattr(r, rows) if p.get(x) is not None and p.get(y) is not None]
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, color=r.color, label=r.label + suffix, marker="o" if len(pts) <= 30 else None,
                    markersize=4)
            drawn = True
    if not drawn:
        ax.text(0.5, 0.5, "nothing logged yet", ha="center", va="center", transform=ax.transAxes, color="gray")
    ax.grid(alpha=0.3)
    return drawn


def _wall_unit(runs) -> tuple[float, str]:
    """Seconds, or minutes for longer runs: (divisor, axis label)."""
    longest = max([p["wall"] for r in runs for p in (*r.train, *r.evals) if p.get("wall") is not None] or [0])
    return (60.0, "wall time (min)") if longest > 180 else (1.0, "wall time (s)")


def _with_wall(runs, div: float):
    """Copies of the runs whose records hold wall time in the unit chosen."""
    from types import SimpleNamespace

    def conv(rows):
        return [dict(p, wall=p["wall"] / div) if p.get("wall") is not None else p for p in rows]
    return [SimpleNamespace(label=r.label, color=r.color, train=conv(r.train), evals=conv(r.evals),
                            resumes=conv(getattr(r, "resumes", []))) for r in runs]


def _mark_resumes(ax, runs, x: str) -> None:
    """A dotted line where a run was resumed from a checkpoint (after a preemption or a failure)."""
    for r in runs:
        for i, res in enumerate(getattr(r, "resumes", [])):
            if res.get(x) is not None:
                ax.axvline(res[x], color=r.color, linestyle=":", alpha=0.8,
                           label=f"{r.label}: resumed" if i == 0 else None)


def _legend(ax, runs) -> None:
    """A legend where it tells something: several runs, a run's state (`run (preempted)`), a resume."""
    if ax.get_legend_handles_labels()[0] and (len(runs) > 1 or any(r.label.endswith(")") for r in runs)
                                              or any(getattr(r, "resumes", []) for r in runs)):
        ax.legend(fontsize=8)


def plot_loss_accuracy(runs: Sequence, out: Path) -> Path:
    """Training loss and test accuracy (rows) against step and against wall time (columns)."""
    plt = pyplot()
    div, wall_label = _wall_unit(runs)
    timed = _with_wall(runs, div)
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    for col, (x, xlabel, rs) in enumerate((("step", "step", runs), ("wall", wall_label, timed))):
        _line(axes[0][col], rs, "train", x, "loss")
        for row in (0, 1):
            _mark_resumes(axes[row][col], rs, x)
        axes[0][col].set_ylabel("training loss")
        _line(axes[1][col], rs, "evals", x, "acc", scale=100.0)
        axes[1][col].set_ylabel("test accuracy (%)")
        for row in (0, 1):
            axes[row][col].set_xlabel(xlabel)
    _legend(axes[0][0], runs)
    fig.suptitle("training loss and test accuracy")
    return _save(fig, out)


def plot_against_step(runs: Sequence, out: Path, rows: str, key: str, ylabel: str, title: str) -> Path:
    """One value (the learning rate, the test loss) against step, one line per run."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    _line(ax, runs, rows, "step", key)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    _legend(ax, runs)
    return _save(fig, out)


def plot_throughput(runs: Sequence, out: Path) -> Path:
    """Images per second of the global batch: rank 0's between log records (lines), and where the logs hold
    them each rank's own measure over each epoch (markers, one shape per rank)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    _line(ax, runs, "train", "step", "img_s", suffix=": all ranks, between log records")
    shapes = "s^vD<>ph*x"
    for r in runs:
        for rank, pts in sorted(r.rank_img_s.items()):
            if pts:
                xs, ys = zip(*pts)
                label = f"{r.label}: rank {rank}, epoch mean" if len(runs) > 1 else f"rank {rank}, epoch mean"
                ax.plot(xs, ys, linestyle="none", marker=shapes[rank % len(shapes)], markersize=7,
                        markerfacecolor="none", color=r.color, label=label)
    ax.set_ylim(bottom=0)
    ax.set_xlabel("step")
    ax.set_ylabel("images / s (global batch)")
    ax.set_title("training throughput")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    return _save(fig, out)


def plot_profile(runs: Sequence, out: Path) -> Path:
    """One horizontal bar per profiled rank (of each run): milliseconds per step, split into the phases of
    `--log.profile`, in the loop's order."""
    plt = pyplot()
    bars = [(f"{r.label}: rank {k}" if len(runs) > 1 else f"rank {k}", split)
            for r in runs for k, split in sorted(r.profile.items())]
    fig, ax = plt.subplots(figsize=(8, 1.8 + 0.45 * len(bars)))
    colours = plt.get_cmap("tab10").colors
    lefts = [0.0] * len(bars)
    for j, phase in enumerate((*PHASES, "other")):
        widths = [split["phases"].get(phase, 0.0) for _, split in bars]
        ax.barh(range(len(bars)), widths, left=lefts, color=colours[j % len(colours)], label=phase)
        lefts = [left + w for left, w in zip(lefts, widths)]
    ax.set_yticks(range(len(bars)), [name for name, _ in bars])
    ax.invert_yaxis()
    ax.set_xlabel("milliseconds per optimizer step")
    ax.set_title("where a training step's time goes (--log.profile)")
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return _save(fig, out)


def plot_confusion(cm: np.ndarray, classes: list[str], out: Path, title: str) -> Path:
    """Rows: true class, columns: predicted; colour: the share of the row, numbers: counts."""
    plt = pyplot()
    n = len(classes)
    rows = cm.sum(axis=1, keepdims=True)
    share = np.divide(cm, rows, out=np.zeros(cm.shape, dtype=float), where=rows > 0)
    side = min(max(5.0, 0.55 * n + 2.5), 30.0)
    fig, ax = plt.subplots(figsize=(side + 1.2, side))
    im = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    if n <= 40:  # names and counts stay readable
        ax.set_xticks(range(n), classes, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(n), classes, fontsize=8)
    if n <= 20:
        for i in range(n):
            for j in range(n):
                if cm[i, j]:
                    ax.text(j, i, str(int(cm[i, j])), ha="center", va="center", fontsize=7,
                            color="white" if share[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title)
    return _save(fig, out)


def plot_per_class(runs: Sequence[tuple[str, str, np.ndarray]], classes: list[str], out: Path) -> Path:
    """Test accuracy of each class, one bar per run (label, colour, accuracies in 0..1)."""
    plt = pyplot()
    n, k = len(classes), len(runs)
    fig, ax = plt.subplots(figsize=(8, min(max(3.0, 0.3 * n * max(1.0, 0.7 * k) + 1.2), 40.0)))
    height = 0.8 / k
    y = np.arange(n)
    for i, (label, color, acc) in enumerate(runs):
        ax.barh(y - 0.4 + height * (i + 0.5), 100 * acc, height=height, color=color, label=label)
        if k == 1 and n <= 40:
            for yy, a in zip(y, acc):
                ax.text(100 * a + 0.5, yy, f"{100 * a:.1f}", va="center", fontsize=7)
    ax.set_yticks(y, classes, fontsize=8 if n <= 40 else 5)
    ax.invert_yaxis()  # the first class on top, as in the confusion matrix
    ax.set_xlim(0, 108)
    ax.set_xlabel("test accuracy (%)")
    ax.set_title("accuracy per class")
    ax.grid(axis="x", alpha=0.3)
    if k > 1:
        ax.legend(fontsize=8, loc="lower right")
    return _save(fig, out)

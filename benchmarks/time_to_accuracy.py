"""Time to accuracy on Fashion-MNIST: Phalanx's default recipe vs the pytorch/examples recipe written
plainly in PyTorch and in Lightning. Same data, same machine, each in a fresh process, round-robin.

    python benchmarks/time_to_accuracy.py [--runs 3] [--ref-runs N] [--ref-epochs 8] [--skip-lightning]
                                          [-- PHALANX ARGS]

Like with like: the references train until they plateau (8 epochs of StepLR 0.7: the last epochs change
the accuracy by hundredths), and every contender is timed to the *plain reference's final accuracy* (the
median over its runs), so the ratio says how much sooner a user gets what the plain loop would give them.
Times to 92/93/94% are reported too. Wall time counts from the start of each process to the end of the
evaluation that first reached the target (start-up, data preparation and evaluation included).

The JSON records the CPU model, its ISA (AVX2, AVX-512, AVX-512 BF16, AMX), whether bf16 kernels exist,
the core count and torch version: figures from a CPU with bf16 are not comparable with one without.
Prints a table and JSON, writes benchmarks/results/time_to_accuracy.{json,png}.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
TARGETS = (0.92, 0.93, 0.94)
DATA = Path("/usr/share/datasets/fashion-mnist")


def run_phalanx(extra: list[str]) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        t0 = time.time()
        r = subprocess.run([sys.executable, "-m", "phalanx", "train", "--progress", "false", "--run_dir",
                            str(run_dir), "--ckpt.at_epoch_end", "false", *extra], capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(r.stdout[-3000:] + r.stderr[-3000:])
        rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        return [{"epoch": x["epoch"], "acc": x["acc"], "wall_s": x["unix_time"] - t0, "img_s": x["train_img_s"]}
                for x in rows if x["event"] == "eval"]


def run_reference(script: str, epochs: int) -> list[dict]:
    t0 = time.time()
    r = subprocess.run([sys.executable, str(HERE / script), "--data", str(DATA), "--epochs", str(epochs)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(r.stdout[-3000:] + r.stderr[-3000:])
    rows = [json.loads(x) for x in r.stdout.splitlines() if x.startswith("{")]
    return [{"epoch": x["epoch"], "acc": x["acc"], "wall_s": x["unix_time"] - t0, "img_s": x["img_s"]} for x in rows]


def time_to(curve: list[dict], target: float) -> float | None:
    """Wall seconds to the first evaluation at or above `target`; None when never reached."""
    hit = next((c["wall_s"] for c in curve if c["acc"] >= target), None)
    return None if hit is None else round(hit, 1)


def summarize(curve: list[dict]) -> dict:
    out = {}
    for t in TARGETS:
        out[f"to_{round(t * 100)}"] = time_to(curve, t)
    out["final_acc"] = curve[-1]["acc"] if curve else None
    out["total_s"] = round(curve[-1]["wall_s"], 1) if curve else None
    out["img_s"] = round(statistics.mean(c["img_s"] for c in curve), 1) if curve else None
    return out


def median_of(results: list[dict]) -> dict:
    keys = results[0].keys()
    out = {}
    for k in keys:
        # A target a run never reached counts as an infinite time: the median of (60, 70, never) is 70.
        vals = [float("inf") if r[k] is None else r[k] for r in results]
        m = statistics.median_high(vals) if len(vals) % 2 == 0 else statistics.median(vals)
        out[k] = None if m == float("inf") else round(m, 4)
    return out


def plot(curves: dict[str, list[dict]], path: Path, ref_final: float | None = None) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, curve in curves.items():
        ax.plot([c["wall_s"] for c in curve], [100 * c["acc"] for c in curve], marker="o", label=name)
    for t in TARGETS:
        ax.axhline(100 * t, color="grey", lw=0.5, ls="--")
    if ref_final is not None:
        ax.axhline(100 * ref_final, color="black", lw=0.8, ls=":", label=f"plain's final {100 * ref_final:.2f}%")
    ax.set_xlabel("wall time from process start (s)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(85, 95.5)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("Fashion-MNIST time to accuracy")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def compare(summaries: dict[str, list[dict]], runs_of: dict[str, list[list[dict]]]):
    """Medians per contender, each run timed to the plain reference's final accuracy (the median of its
    runs), ratios to the plain reference; (results, the median run's curve per contender, that accuracy)."""
    plain_finals = [x["final_acc"] for x in summaries.get("plain_pytorch", []) if x["final_acc"] is not None]
    ref_final = statistics.median(plain_finals) if plain_finals else None
    if ref_final is not None:  # every run of every contender, timed to the plain reference's final accuracy
        for name in summaries:
            for s, curve in zip(summaries[name], runs_of[name]):
                s["to_ref_final"] = time_to(curve, ref_final)
    results, curves = {}, {}
    for name, s in summaries.items():
        results[name] = dict(median_of(s), runs=s)
        # Plot the run whose time to the first target is the median one (else the first run).
        key = next((k for k in ("to_ref_final", "to_92", "to_93", "to_94") if results[name].get(k) is not None),
                   None)
        pick = 0
        if key is not None:
            pick = min(range(len(s)), key=lambda j: abs((s[j][key] or 1e9) - results[name][key]))
        curves[name] = runs_of[name][pick]
    plain = results.get("plain_pytorch")
    for name, r in results.items():
        if plain:
            for k in ("to_ref_final", *(f"to_{round(t * 100)}" for t in TARGETS)):
                r[f"speedup_{k}"] = (round(plain[k] / r[k], 2) if plain.get(k) and r.get(k) else None)
    return results, curves, ref_final


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=3, help="runs of Phalanx (median reported)")
    p.add_argument("--ref-runs", type=int, default=None, help="runs of each reference (default: --runs)")
    p.add_argument("--ref-epochs", type=int, default=8,
                   help="epochs of the references (8: they plateau; the last epochs move hundredths)")
    p.add_argument("--skip-lightning", action="store_true")
    p.add_argument("--skip-references", action="store_true")
    p.add_argument("--out", type=Path, default=HERE / "results")
    p.add_argument("phalanx_args", nargs="*")
    a = p.parse_args()
    ref_runs = a.runs if a.ref_runs is None else a.ref_runs
    contenders = {"phalanx": (a.runs, lambda: run_phalanx(a.phalanx_args))}
    if not a.skip_references:
        contenders["plain_pytorch"] = (ref_runs, lambda: run_reference("reference_plain.py", a.ref_epochs))
        if not a.skip_lightning and importlib.util.find_spec("lightning"):
            contenders["lightning"] = (ref_runs, lambda: run_reference("reference_lightning.py", a.ref_epochs))
    summaries: dict[str, list[dict]] = {name: [] for name in contenders}
    runs_of: dict[str, list[list[dict]]] = {name: [] for name in contenders}
    # Round-robin over contenders, so a slow spell of a shared machine does not land on one of them.
    for i in range(max(n for n, _ in contenders.values())):
        for name, (n, fn) in contenders.items():
            if i < n:
                print(f"running {name} ({i + 1}/{n})...", file=sys.stderr, flush=True)
                curve = fn()
                summaries[name].append(summarize(curve))
                runs_of[name].append(curve)
    results, curves, ref_final = compare(summaries, runs_of)
    import torch

    from phalanx.runtime.cpu import cpu_has_bf16
    from phalanx.tools.doctor import cpu_info
    out = {"date": time.strftime("%Y-%m-%d"), "cpu": dict(cpu_info(), bf16_kernels=cpu_has_bf16()),
           "torch": torch.__version__, "runs": a.runs, "ref_runs": ref_runs, "ref_epochs": a.ref_epochs,
           "plain_final_acc": ref_final, "phalanx_args": a.phalanx_args, "results": results}

    def fmt(v, unit=""):
        return "-" if v is None else f"{v}{unit}"
    ref = "-" if ref_final is None else f"{100 * ref_final:.2f}%"
    print(f"{out['cpu']['model']}, {out['cpu']['cores_usable']} cores, bf16 kernels: {out['cpu']['bf16_kernels']}, "
          f"torch {out['torch']}; medians of {a.runs} (Phalanx) / {ref_runs} (references) runs")
    print(f"{'':14s} {'to ' + ref:>10s} {'x plain':>8s} {'to 92%':>8s} {'to 93%':>8s} {'to 94%':>8s} "
          f"{'final':>7s} {'img/s':>8s}")
    for name, r in results.items():
        print(f"{name:14s} {fmt(r.get('to_ref_final'), 's'):>10s} {fmt(r.get('speedup_to_ref_final'), 'x'):>8s} "
              f"{fmt(r['to_92'], 's'):>8s} {fmt(r['to_93'], 's'):>8s} {fmt(r['to_94'], 's'):>8s} "
              f"{100 * r['final_acc']:6.2f}% {r['img_s']:>8,.0f}")
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "time_to_accuracy.json").write_text(json.dumps(dict(out, curves=curves), indent=1))
    plot(curves, a.out / "time_to_accuracy.png", ref_final)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())

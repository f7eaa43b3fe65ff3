"""Run finish: the final weights as a plain state_dict, the summary and the curves (rank 0)."""
from __future__ import annotations

import json
from pathlib import Path

import torch.nn as nn
from safetensors.torch import save_file

from phalanx.observe.console import summary_table
from phalanx.observe.plots import plot_run


def export_weights(weights: nn.Module | dict, path: Path, meta: dict) -> None:
    """Plain state_dict (no wrapper prefixes; a module's or one given) as safetensors, metadata as JSON beside it."""
    sd = weights.state_dict() if isinstance(weights, nn.Module) else weights
    sd = {k: v.detach().cpu().contiguous() for k, v in sd.items()}
    save_file(sd, path, metadata={"phalanx": json.dumps(meta)})
    path.with_suffix(".json").write_text(json.dumps(meta, indent=1))


def export_meta(run) -> dict:
    """What `model.json` says: which model the weights fit, and how to preprocess its input."""
    cfg, store = run.cfg, run.store
    h, _, c = store.shape
    return {"model": cfg.model.name, "width": cfg.model.width, "norm": cfg.model.norm, "act": cfg.model.act,
            "small_input": cfg.model.small_input, "num_classes": len(store.classes), "in_channels": c,
            "image_size": h, "classes": store.classes, "mean": store.mean, "std": store.std,
            "ema": run.state.ema is not None, "crop_size": cfg.augment.crop_size, "eval_crop": cfg.augment.eval_crop}


def finish(run, result: dict, train_s: float, weights: dict) -> None:
    """model.safetensors (the full `weights`, loadable with load_state_dict into the model class),
    curves.png, and last summary.json (a run with one is finished; under a budget it holds the wall time
    up to here, the process's exit, ~1 s, aside)."""
    run_dir, state, log = run.run_dir, run.state, run.log
    export_weights(weights, run_dir / "model.safetensors", export_meta(run))
    try:
        plot_run(run_dir)
    except Exception as e:  # a plot is a nicety; never fail a finished run for it
        log.warning(f"could not draw curves.png: {e}")
    summary = dict(result, run_dir=str(run_dir), global_step=state.position.global_step, world=run.env.world,
                   precision=state.precision.name, train_s=round(train_s, 2), strategy=state.strategy.name,
                   memory_per_rank=run.memory)
    if getattr(run, "startup", None) is not None:  # the seconds before the first step, by phase (train/startup.py)
        summary["startup_s"] = run.startup.seconds()
    if run.budget is not None:  # the budget, the wall time predicted from the measured speed, and the real one
        summary.update(budget_s=run.budget.seconds, predicted_s=run.predicted_s,
                       actual_s=round(run.budget.spent(), 1))
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    log.info(f"final test accuracy {100 * result.get('acc', float('nan')):.2f}%  run directory {run_dir}")
    log.info(summary_table(summary, run_dir / "model.safetensors"))

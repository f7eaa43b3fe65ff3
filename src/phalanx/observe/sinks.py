"""Metric sinks beside metrics.jsonl: TensorBoard event files from rank 0 (`pip install tensorboard`).

`MetricsWriter` (console.py) writes metrics.jsonl, always, and hands each record to these sinks:

    at the start   the resolved config (config.toml) as text
    train record   train/loss, train/lr, train/img_s
    eval record    eval/loss, eval/acc (eval/top5 where computed), eval/train_img_s, memory/peak_mb,
                   and a histogram of every weight tensor of the evaluated model (weights/NAME)

Steps are optimizer steps, wall times those of metrics.jsonl. A sharded (FSDP) model's histograms
hold rank 0's shards: gathering the rest would need every rank, and only rank 0 writes.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path

import torch.nn as nn

from phalanx import config as C
from phalanx.errors import ConfigError, first_line

TENSORBOARD_DIR = "tensorboard"  # in the run directory: `tensorboard --logdir RUN_DIR` (or the runs' parent)

# record key -> TensorBoard tag, per event
SCALARS = {
    "train": {"loss": "train/loss", "lr": "train/lr", "img_s": "train/img_s"},
    "eval": {"loss": "eval/loss", "acc": "eval/acc", "top5": "eval/top5", "train_img_s": "eval/train_img_s",
             "peak_mem_mb": "memory/peak_mb"},
}


class TensorBoardSink:
    """Event files in `log_dir` through torch.utils.tensorboard.SummaryWriter; flushed after each record
    (records come a few times an epoch), so a stopped run leaves readable files."""

    name = "TensorBoard"

    def __init__(self, log_dir: Path, config_toml: str, model: nn.Module | None):
        from torch.utils.tensorboard import SummaryWriter  # ImportError when tensorboard is missing

        self.log_dir, self.model = Path(log_dir), model
        self.writer = SummaryWriter(log_dir=str(log_dir))
        # TensorBoard's text is Markdown: indented lines are shown as they are.
        self.writer.add_text("config", "\n".join("    " + line for line in config_toml.splitlines()), 0)
        self.writer.flush()

    def write(self, record: dict) -> None:
        step, tags = record.get("step"), SCALARS.get(record.get("event"), {})
        if not isinstance(step, int) or not tags:
            return
        wall = record.get("unix_time")
        for key, tag in tags.items():
            v = record.get(key)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                self.writer.add_scalar(tag, v, step, walltime=wall)
        if record.get("event") == "eval" and self.model is not None:
            self.weight_histograms(step, wall)
        self.writer.flush()

    def weight_histograms(self, step: int, wall: float | None) -> None:
        for name, p in self.model.named_parameters():
            t = p.detach()
            t = t.to_local() if hasattr(t, "to_local") else t  # a DTensor: this rank's shard
            if t.numel():
                self.writer.add_histogram(f"weights/{name}", t.float().cpu(), step, walltime=wall)

    def close(self) -> None:
        self.writer.close()


def tensorboard_installed() -> bool:
    """Whether `tensorboard` can be found, without importing it (seconds)."""
    import importlib.util
    try:
        return importlib.util.find_spec("tensorboard") is not None
    except (ImportError, ValueError):
        return False


def metric_sinks(cfg, run_dir: Path, model: nn.Module | None, log: logging.Logger | None = None) -> list:
    """The sinks rank 0 writes besides metrics.jsonl, as `cfg.log` asks: TensorBoard for `true`, and for
    `auto` when tensorboard is installed. `true` without it is refused by Config.validate before this."""

    mode = cfg.log.tensorboard
    if mode == "false" or (mode == "auto" and not tensorboard_installed()):
        return []
    try:
        sink = TensorBoardSink(run_dir / TENSORBOARD_DIR, C.to_toml(cfg), model)
    except ImportError as e:  # installed but broken (a version torch refuses, a missing dependency)
        if mode == "true":
            raise ConfigError(f"log.tensorboard='true': tensorboard cannot be imported ({first_line(e)}); "
                              f"pip install --upgrade tensorboard, or --log.tensorboard false") from None
        if log is not None:
            log.warning(f"no TensorBoard events: tensorboard cannot be imported ({first_line(e)})")
        return []
    if log is not None:
        log.debug(f"TensorBoard events in {sink.log_dir} (tensorboard --logdir {sink.log_dir})")
    return [sink]

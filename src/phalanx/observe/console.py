"""Rank 0 speaks; every rank writes run_dir/logs/rank-K.log."""
from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

from tqdm import tqdm


class _TqdmHandler(logging.StreamHandler):
    """Console lines that do not tear the progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stdout)
        except Exception:  # pragma: no cover
            self.handleError(record)


def setup_logging(run_dir: Path | None, rank: int, console: bool) -> logging.Logger:
    log = logging.getLogger("phalanx")
    log.setLevel(logging.DEBUG)  # DEBUG lines go to the rank's file only
    log.propagate = False
    for h in list(log.handlers):
        log.removeHandler(h)
        h.close()
    if run_dir is not None:
        (run_dir / "logs").mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(run_dir / "logs" / f"rank-{rank}.log")
        fh.setFormatter(logging.Formatter(f"%(asctime)s rank{rank} %(levelname)s %(message)s"))
        log.addHandler(fh)
    if console:
        ch = _TqdmHandler()
        ch.setLevel(logging.INFO)
        ch.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(ch)
    return log


class Progress:
    """One tqdm bar on rank 0: epoch, step, loss, img/s and ETA; a no-op elsewhere."""

    def __init__(self, total_steps: int, initial: int, enabled: bool):
        self.bar = tqdm(total=total_steps, initial=initial, dynamic_ncols=True, unit="step", file=sys.stdout,
                        smoothing=0.05, mininterval=0.5,
                        bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}{postfix}]",
                        disable=not enabled)

    def update(self, epoch: int, epochs: int, loss: float | None, img_s: float) -> None:
        if self.bar.disable:
            return
        self.bar.set_description(f"epoch {epoch + 1}/{epochs}", refresh=False)
        post = f"loss {loss:.4f}, " if loss is not None else ""
        self.bar.set_postfix_str(f"{post}{img_s:,.0f} img/s", refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


class MetricsWriter:
    """Appends one JSON object per event to run_dir/metrics.jsonl (rank 0 only)."""

    def __init__(self, path: Path | None):
        self.path = path
        self.t0 = time.time()

    def write(self, **record) -> None:
        if self.path is None:
            return
        record.setdefault("time", round(time.time() - self.t0, 3))
        record.setdefault("unix_time", round(time.time(), 3))  # lets benchmarks time from process start
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


class TrainMeter:
    """Training loss and img/s since the last log line; the loss stays on the device until `reduce`."""

    def __init__(self, device):
        import torch
        self.sums = torch.zeros(2, dtype=torch.float64, device=device)  # (loss sum, images) of this rank
        self.seen, self.t0 = 0, time.perf_counter()

    def add(self, loss_sum, images: int) -> None:
        self.sums[0] += loss_sum
        self.sums[1] += images

    def step(self, global_batch: int) -> None:
        self.seen += global_batch

    def rate(self) -> float:
        return self.seen / max(time.perf_counter() - self.t0, 1e-9)

    def reduce(self) -> tuple[float, float]:
        """(mean training loss over all ranks, img/s) since the last call, which starts a new window."""
        from phalanx.parallel.collectives import all_reduce_sum
        all_reduce_sum(self.sums)
        loss, rate = float(self.sums[0] / self.sums[1].clamp(min=1)), self.rate()
        self.sums.zero_()
        self.seen, self.t0 = 0, time.perf_counter()
        return loss, rate

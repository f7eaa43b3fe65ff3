"""Rank 0 speaks; every rank writes run_dir/logs/rank-K.log."""
from __future__ import annotations

import json
import logging
import math
import sys
import time
from pathlib import Path

from tqdm import tqdm

from phalanx.parallel.collectives import all_reduce_sum


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
    """Rank 0's progress: epoch, step, loss, img/s and ETA; a no-op elsewhere.

    On a terminal, one tqdm bar. Where the output is not a terminal (a file, a pipe, a CI or SLURM log), a bar's
    carriage returns pile up into one line of thousands of redraws, so a log line is written instead, at most
    every `line_every_s` seconds, at the steps where the loss is reduced anyway (also in logs/rank-0.log)."""

    LINE_EVERY_S = 30.0

    def __init__(self, total_steps: int, initial: int, enabled: bool, terminal: bool | None = None,
                 clock=time.monotonic, line_every_s: float = LINE_EVERY_S):
        terminal = _is_terminal(sys.stdout) if terminal is None else terminal
        self.lines = enabled and not terminal
        self.total, self.n, self.first = total_steps, initial, initial
        self.clock, self.line_every_s = clock, line_every_s
        self.t0 = self.last_line = clock()
        self.bar = tqdm(total=total_steps, initial=initial, dynamic_ncols=True, unit="step", file=sys.stdout,
                        smoothing=0.05, mininterval=0.5,
                        bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}{postfix}]",
                        disable=not enabled or self.lines)

    def update(self, epoch: int, epochs: int, loss: float | None, img_s: float) -> None:
        if self.lines:
            self._line(epoch, epochs, loss, img_s)
            return
        if self.bar.disable:
            return
        self.bar.set_description(f"epoch {epoch + 1}/{epochs}", refresh=False)
        post = f"loss {loss:.4f}, " if loss is not None else ""
        self.bar.set_postfix_str(f"{post}{img_s:,.0f} img/s", refresh=False)
        self.bar.update(1)

    def _line(self, epoch: int, epochs: int, loss: float | None, img_s: float) -> None:
        self.n += 1
        now = self.clock()
        if loss is None or now - self.last_line < self.line_every_s:
            return
        self.last_line = now
        left = max(0, self.total - self.n) * (now - self.t0) / max(1, self.n - self.first)
        logging.getLogger("phalanx").info(
            f"epoch {epoch + 1}/{epochs}  step {self.n:,}/{self.total:,} ({100 * self.n / max(1, self.total):.0f}%)  "
            f"loss {loss:.4f}  {img_s:,.0f} img/s  {_duration(now - self.t0)} elapsed, {_duration(left)} left")

    def set_total(self, total: int) -> None:
        """A new step count (a wall-clock budget's estimate)."""
        self.total = total
        if not self.bar.disable and self.bar.total != total:
            self.bar.total = total
            self.bar.refresh()

    def close(self) -> None:
        self.bar.close()


def _is_terminal(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # replaced or closed streams
        return False


def _duration(seconds: float) -> str:
    """`42s`, `7m05s`, `2h03m`."""
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def wall_time(seconds: float) -> str:
    """`1 min 20.6 s`, `42.0 s`: a run's wall time, as the run summary and `phalanx report` give it."""
    m, s = divmod(float(seconds), 60)
    return f"{int(m)} min {s:.1f} s" if m else f"{s:.1f} s"


class MetricsWriter:
    """Appends one JSON object per event to run_dir/metrics.jsonl (rank 0 only), and hands each record to
    the further sinks given (TensorBoard: phalanx.observe.sinks). metrics.jsonl is always written; a sink
    that fails is dropped with one warning, so that a nicety never stops a run."""

    def __init__(self, path: Path | None, sinks: list | tuple = ()):
        self.path = path
        self.sinks = list(sinks) if path is not None else []
        self.t0 = time.time()

    def write(self, **record) -> None:
        if self.path is None:
            return
        record.setdefault("time", round(time.time() - self.t0, 3))
        record.setdefault("unix_time", round(time.time(), 3))  # lets benchmarks time from process start
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        for sink in list(self.sinks):
            try:
                sink.write(record)
            except Exception as e:  # any failure of an optional sink
                logging.getLogger("phalanx").warning(f"{sink.name}: stopped writing ({type(e).__name__}: {e}); "
                                                     f"metrics.jsonl goes on")
                self.sinks.remove(sink)
                _close_quietly(sink)

    def close(self) -> None:
        """Flush and close the sinks (metrics.jsonl is closed after every record)."""
        for sink in self.sinks:
            _close_quietly(sink)
        self.sinks = []


def _close_quietly(sink) -> None:
    import contextlib
    with contextlib.suppress(Exception):  # closing a sink that may already have failed
        sink.close()


def is_number(v) -> bool:
    """A finite int or float, not a bool: a value a plot or a table can use."""
    try:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    except OverflowError:  # an integer beyond any float
        return False


def read_metrics(path: Path) -> tuple[list[dict], list[dict], int, float | None]:
    """(train records, evaluations, lines skipped, t0): the last record of each step wins (a resumed run
    logs again the steps after its checkpoint), sorted by step, with `wall`: seconds since t0, the unix
    time the run's first process started writing (so restarts and the time between them count)."""
    path = Path(path)
    if not path.is_file():
        return [], [], 0, None
    records, skipped = [], 0
    for line in path.read_text(errors="replace").splitlines():
        try:
            r = json.loads(line)
        except ValueError:  # a line being written right now, or a torn one
            skipped += line.strip() != ""
            continue
        if not isinstance(r, dict):
            skipped += 1
        elif isinstance(r.get("step"), int) and r.get("event") in ("train", "eval"):
            records.append(r)  # other events (written by other tools) are not plotted
    first = next((r for r in records if is_number(r.get("unix_time")) and is_number(r.get("time"))), None)
    t0 = first["unix_time"] - first["time"] if first else None
    by_step: dict[tuple[str, int], dict] = {}
    for r in records:
        r = dict(r)
        if t0 is not None and is_number(r.get("unix_time")):
            r["wall"] = r["unix_time"] - t0
        elif is_number(r.get("time")):
            r["wall"] = r["time"]
        by_step[(r["event"], r["step"])] = r
    train = sorted((r for (e, _), r in by_step.items() if e == "train"), key=lambda r: r["step"])
    evals = sorted((r for (e, _), r in by_step.items() if e == "eval"), key=lambda r: r["step"])
    return train, evals, skipped, t0


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
        all_reduce_sum(self.sums)
        loss, rate = float(self.sums[0] / self.sums[1].clamp(min=1)), self.rate()
        self.sums.zero_()
        self.seen, self.t0 = 0, time.perf_counter()
        return loss, rate


def summary_table(summary: dict, weights: Path) -> str:
    """The few lines rank 0 prints at the end of a run: results, speed, layout, and where the files are."""
    rows = []
    if "acc" in summary:
        counts = f" ({summary['correct']}/{summary['count']})" if "correct" in summary and "count" in summary else ""
        rows.append(("test accuracy", f"{100 * summary['acc']:.2f}%{counts}"))
    if "top5" in summary:  # only where the evaluation computes it
        counts = f" ({summary['correct_top5']}/{summary['count']})" if "correct_top5" in summary else ""
        rows.append(("top-5 accuracy", f"{100 * summary['top5']:.2f}%{counts}"))
    if "loss" in summary:
        rows.append(("test loss", f"{summary['loss']:.4f}"))
    if "train_s" in summary:
        rows.append(("wall time", wall_time(summary["train_s"])))
    if "train_img_s" in summary:
        rows.append(("throughput", f"{summary['train_img_s']:,.0f} img/s (last epoch)"))
    strategy = f" ({summary['strategy']})" if summary.get("strategy") else ""
    rows += [("world size", f"{summary.get('world', 1)} rank(s){strategy}"), ("precision", str(summary.get("precision", "?"))),
             ("steps", str(summary.get("global_step", "?"))), ("run directory", str(summary.get("run_dir", ""))),
             ("weights", f"{weights} (+ {weights.with_suffix('.json').name})")]
    width = max(len(k) for k, _ in rows)
    return "\n".join(["run summary"] + [f"  {k:<{width}}  {v}" for k, v in rows])


def _one_cell(text) -> str:
    """`text` for one cell of a table row: a control character (a newline or a tab in a folder's name) escaped
    as Python writes it (`\\n`, `\\t`, `\\x1b`), so that a row stays one line with its columns in place."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))


def prediction_writer(fmt: str, top: int, files: list, classes: list[str]):
    """A function printing one prediction row ({'file', 'top': [{'class', 'p'}]}) per call as a table,
    CSV (file,top1,p1,top2,p2,...) or JSON lines. The table's and the CSV's header comes with the first
    row, so a first image that cannot be decoded leaves only its error line. The table escapes control
    characters in file and class names (CSV quotes them, JSON escapes them)."""
    if fmt == "json":
        return lambda row: print(json.dumps(row), flush=True)
    if fmt == "csv":
        import csv
        emit = csv.writer(sys.stdout, lineterminator="\n").writerow
        header = ["file"] + [c for i in range(1, top + 1) for c in (f"top{i}", f"p{i}")]

        def line(row: dict) -> list:
            return [row["file"]] + [v for t in row["top"] for v in (t["class"], t["p"])]
    else:
        emit = print
        fw = max([len("file")] + [len(_one_cell(f)) for f in files])
        cw = max([len(f"top-{top}")] + [len(_one_cell(c)) for c in classes])
        header = f"{'file':<{fw}}" + "".join(f"  {f'top-{i}':<{cw}} {'p':>6}" for i in range(1, top + 1))

        def line(row: dict) -> str:
            return f"{_one_cell(row['file']):<{fw}}" + "".join(f"  {_one_cell(t['class']):<{cw}} {t['p']:6.4f}"
                                                               for t in row["top"])
    started = []

    def write(row: dict) -> None:
        if not started:
            emit(header)
            started.append(True)
        emit(line(row))
        sys.stdout.flush()
    return write

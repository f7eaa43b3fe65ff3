"""`phalanx report RUN_DIR [RUN_DIR ...] [--out DIR]`: what runs did, as PNG plots and one static HTML page.

    OUT/report.html    one page without scripts or outside resources (its plots are embedded); it links
                       to the run's own files (config.toml, metrics.jsonl, logs, ...) by relative paths
    OUT/report/*.png   the plots as files
OUT is the run directory for one run; for several runs --out (default ./report-<date>-<time>).

Read from each run directory, whatever state the run is in (finished, still training, preempted):
    metrics.jsonl        training records (loss, lr, img/s) and evaluations (accuracy, loss): the curves
    logs/rank-K.log      world size, precision, device, steps per epoch; each rank's epoch throughput;
                         restarts, resumes, preemptions, warnings
    config.toml          the resolved config (several runs: the keys whose values differ)
    summary.json         the final result of a finished run
    checkpoints/step-N/  the newest checkpoint's reason (state.json): "preempted by SIGTERM"
    model.safetensors    the final weights: confusion matrix and per-class accuracy on the test split of
                         the prepared store the run trained on (when it is on this machine)
"""
from __future__ import annotations

import base64
import html
import json
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from phalanx.data.augment import Normalize
from phalanx.data.loader import SplitOnDevice, to_nchw
from phalanx.errors import CheckpointError, ConfigError
from phalanx.observe import plots
from phalanx.observe.console import is_number as _number
from phalanx.observe.console import read_metrics, wall_time
from phalanx.tools.export import run_store
from phalanx.train.evaluate import eval_crop_of_meta, load_weights

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

PNG_DIR = "report"
COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
          "#17becf"]

FINISHED, PREEMPTED, IN_PROGRESS = "finished", "preempted", "not finished"
MAX_NOTABLE = 60  # log lines shown: the newest

# rank-K.log lines (train/setup.py, train/loop.py)
_LAYOUT = re.compile(r"\| world (\d+) x (\d+) threads on (\S+) \| precision (\S+) \| global batch (\d+) "
                     r"\((\d+) steps/epoch\)")
_MODEL = re.compile(r"\| model (\S+) \(([\d.]+) M params\) \| data (\S+) (\d+) train / (\d+) test, (\S+)")
_MEMORY = re.compile(r"memory per rank \(.*\): .* total ([\d.]+) MiB")
_RESUMED = re.compile(r"resumed from \S+ at epoch \d+, step \d+ \(global step (\d+)\)")
_EPOCH = re.compile(r"epoch (\d+)/\d+\s+test acc [\d.]+%(?:\s+top-5 [\d.]+%)?\s+loss [\d.]+\s+([\d,]+) img/s")
_NOTABLE = re.compile(r" (WARNING|ERROR) |resumed from|preempted at|restart [1-9]")
_LOG_LINE = re.compile(r"^(\S+ \S+) rank(\d+) (\w+) (.*)$")


@dataclass
class RunRecord:
    """What one run directory holds, read once."""
    path: Path
    label: str
    color: str
    train: list[dict] = field(default_factory=list)       # one per step: step, wall, loss, lr, img_s
    evals: list[dict] = field(default_factory=list)       # one per step: step, wall, acc, loss, ...
    skipped_lines: int = 0                                # metrics.jsonl lines that are not JSON records
    config: dict = field(default_factory=dict)            # flat: "optim.lr" -> 0.4
    config_text: str = ""
    summary: dict | None = None
    layout: dict = field(default_factory=dict)            # from rank-0.log
    rank_img_s: dict[int, list] = field(default_factory=dict)   # rank -> [(step, img/s)], epoch means
    notable: list[str] = field(default_factory=list)      # restarts, resumes, preemptions, warnings
    resumes: list[dict] = field(default_factory=list)     # step, wall of each resume from a checkpoint
    t0: float | None = None                               # unix time of wall = 0
    checkpoint: tuple[int, str] | None = None             # the newest complete checkpoint: (step, reason)
    last_write: float | None = None                       # unix time of the newest metrics/log write
    state: str = IN_PROGRESS
    state_note: str = ""
    total_steps: int | None = None
    cm: np.ndarray | None = None                          # confusion matrix of the final weights
    classes: list[str] = field(default_factory=list)
    cm_note: str = ""
    profile: dict[int, dict] = field(default_factory=dict)  # rank -> its `--log.profile` split (profile/rank-K.json)

    @property
    def steps_logged(self) -> int:
        return max([r["step"] for r in (*self.train, *self.evals)] or [0])

    @property
    def steps_done(self) -> int:
        """Logged or checkpointed: a preemption checkpoint can be later than the last log record."""
        return max(self.steps_logged, self.checkpoint[0] if self.checkpoint else 0)

    @property
    def wall_so_far(self) -> float | None:
        return max([r["wall"] for r in (*self.train, *self.evals) if _number(r.get("wall"))] or [None])


# ----------------------------------------------------------------------------- reading a run directory

def _flatten(table: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in table.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _read_json(path: Path) -> dict | None:
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return d if isinstance(d, dict) else None


def _read_profiles(run_dir: Path) -> dict[int, dict]:
    """rank -> the step split `--log.profile` wrote (profile/rank-K.json); unreadable files are left out."""
    out = {}
    for f in sorted((run_dir / "profile").glob("rank-*.json")):
        m = re.fullmatch(r"rank-(\d+)\.json", f.name)
        split = _read_json(f) if m else None
        if split and isinstance(split.get("phases"), dict) and _number(split.get("step_ms")):
            out[int(m.group(1))] = split
    return out


def _read_logs(rec: RunRecord) -> None:
    """Layout (from rank 0's log), each rank's epoch throughput, and the lines worth showing."""
    logs = sorted((rec.path / "logs").glob("rank-*.log"))
    epoch_step = {r.get("epoch"): r["step"] for r in rec.evals}
    for log in logs:
        m = re.fullmatch(r"rank-(\d+)\.log", log.name)
        if not m:
            continue
        rank, pts = int(m.group(1)), {}
        for line in log.read_text(errors="replace").splitlines():
            if rank == 0 and (lay := _LAYOUT.search(line)):
                rec.layout.update(zip(("world", "threads", "device", "precision", "global_batch", "steps_per_epoch"),
                                      lay.groups()))
            if rank == 0 and (mem := _MEMORY.search(line)):
                rec.layout["memory_mib"] = mem.group(1)
            if rank == 0 and (mod := _MODEL.search(line)):
                rec.layout.update(zip(("model", "params_m", "data", "train_images", "test_images", "image"),
                                      mod.groups()))
            if (ep := _EPOCH.search(line)) and int(ep.group(1)) in epoch_step:
                pts[epoch_step[int(ep.group(1))]] = float(ep.group(2).replace(",", ""))
            if rank == 0 and (res := _RESUMED.search(line)):
                rec.resumes.append({"step": int(res.group(1)), "wall": _wall_of_log_line(line, rec.t0)})
            if _NOTABLE.search(line):
                lm = _LOG_LINE.match(line)
                level = f" {lm.group(3)}" if lm and lm.group(3) in ("WARNING", "ERROR") else ""
                rec.notable.append(f"{lm.group(1)[:19]} rank {lm.group(2)}{level}: {lm.group(4)}" if lm else line)
        if pts:
            rec.rank_img_s[rank] = sorted(pts.items())
        rec.last_write = max(rec.last_write or 0, log.stat().st_mtime)
    rec.notable.sort()  # by time stamp, then rank
    if len(rec.notable) > MAX_NOTABLE:
        rec.notable = [f"({len(rec.notable) - MAX_NOTABLE} earlier lines left out)"] + rec.notable[-MAX_NOTABLE:]


def _wall_of_log_line(line: str, t0: float | None) -> float | None:
    """Seconds since t0 of a log line's local time stamp (None when either is unknown)."""
    try:
        return time.mktime(time.strptime(line[:19], "%Y-%m-%d %H:%M:%S")) - t0 if t0 is not None else None
    except ValueError:
        return None


def _newest_checkpoint(run_dir: Path) -> tuple[int, str] | None:
    """(step, reason) of the newest checkpoint with its COMPLETE marker (checksums are not verified here)."""
    done = sorted(p for p in (run_dir / "checkpoints").glob("step-*")
                  if p.name[5:].isdigit() and (p / "COMPLETE").is_file())
    for p in reversed(done):
        state = _read_json(p / "state.json")
        if state is not None:
            return int(p.name[5:]), str(state.get("reason", "?"))
    return None


def _ago(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min" if seconds < 7200 else \
        f"{seconds / 3600:.1f} h"


def _judge_state(rec: RunRecord) -> None:
    """Finished, preempted or not finished, in plain words."""
    of = f" of {rec.total_steps}" if rec.total_steps else ""
    done = rec.steps_done
    if rec.summary is not None and (rec.path / "model.safetensors").is_file():
        rec.state = FINISHED
        resumed = sum(" rank 0: resumed from " in n for n in rec.notable)
        again = f" It was resumed from a checkpoint {resumed} time(s) (see the log lines below)." if resumed else ""
        rec.state_note = (f"Finished: {rec.summary.get('global_step', done)} steps{of}; final weights in "
                          f"model.safetensors.{again}")
        return
    if rec.checkpoint and rec.checkpoint[1].startswith("preempted") and rec.checkpoint[0] >= rec.steps_logged:
        rec.state = PREEMPTED
        rec.state_note = (f"Stopped by preemption ({rec.checkpoint[1]}) at step {rec.checkpoint[0]}{of}, with a "
                          f"checkpoint of that step; the curves end at the last step logged before it "
                          f"({rec.steps_logged}). There are no final weights, so no confusion matrix. Resume with "
                          f"`phalanx train --resume {rec.path}`.")
        return
    rec.state = IN_PROGRESS
    ago = f", last written {_ago(time.time() - rec.last_write)} ago" if rec.last_write else ""
    errors = [n for n in rec.notable if " ERROR: " in n]
    why = f" The logs hold an error: {errors[-1]}" if errors else ""
    shown = f"what it has logged so far (step {done}{of}{ago})" if rec.steps_logged else f"nothing is logged yet{ago}"
    rec.state_note = (f"Not finished: no summary.json or final weights yet. The run is still training, or it "
                      f"stopped before its end. Shown: {shown}.{why}")


def read_run(run_dir: Path, label: str, color: str) -> RunRecord:
    """A RunRecord of what `run_dir` holds; ConfigError (one line) when it is not a run directory."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ConfigError(f"{run_dir}: no such run directory")
    if not any((run_dir / n).exists() for n in ("metrics.jsonl", "config.toml", "logs", "summary.json")):
        raise ConfigError(f"{run_dir}: not a run directory (it has no metrics.jsonl, config.toml or logs/); "
                          f"give the folder `phalanx train` wrote")
    rec = RunRecord(run_dir, label, color)
    rec.train, rec.evals, rec.skipped_lines, rec.t0 = read_metrics(run_dir / "metrics.jsonl")
    if (run_dir / "metrics.jsonl").is_file():
        rec.last_write = (run_dir / "metrics.jsonl").stat().st_mtime
    cfg_path = run_dir / "config.toml"
    if cfg_path.is_file():
        rec.config_text = cfg_path.read_text(errors="replace")
        try:
            rec.config = _flatten(tomllib.loads(rec.config_text))
        except ValueError as e:
            rec.config_text += f"\n# (phalanx report could not read this file: {e})"
    rec.summary = _read_json(run_dir / "summary.json")
    _read_logs(rec)
    rec.checkpoint = _newest_checkpoint(run_dir)
    rec.profile = _read_profiles(run_dir)
    spe, epochs, max_steps = rec.layout.get("steps_per_epoch"), rec.config.get("epochs"), rec.config.get("max_steps")
    if spe and isinstance(epochs, int):
        rec.total_steps = int(spe) * epochs
        if isinstance(max_steps, int) and max_steps > 0:
            rec.total_steps = min(rec.total_steps, max_steps)
    _judge_state(rec)
    return rec


# ----------------------------------------------------------------------------- the final weights on the test split

def confusion_of_final_weights(rec: RunRecord) -> None:
    """rec.cm and rec.classes from the final weights on the test split of the run's prepared store, or
    rec.cm_note saying why there are none. Evaluated in fp32 on the CPU, with the run's flip TTA."""
    import torch


    if not (rec.path / "model.safetensors").is_file():
        rec.cm_note = ("No final weights (model.safetensors) yet: the confusion matrix and per-class accuracy come "
                       "when the run finishes.")
        return
    try:
        model, meta = load_weights(rec.path)
    except CheckpointError as e:
        rec.cm_note = f"The final weights cannot be loaded: {e}"
        return
    rec.classes = list(meta["classes"])
    if rec.config.get("data.stream") is True:
        rec.cm_note = ("This run streamed its images (data.stream); the report evaluates prepared stores only, so "
                       "there is no confusion matrix (`phalanx eval` gives the accuracy).")
        return
    store = run_store(rec.path)
    name = None if store is None else "test" if "test" in store.splits else "val" if "val" in store.splits else None
    if name is None:
        data = rec.config.get("data.path", "?")
        rec.cm_note = (f"The test data is not available here: the prepared store of data.path={data!r} named by "
                       f"config.toml is not on this machine (`phalanx eval {rec.path}` prepares it), so there is "
                       f"no confusion matrix.")
        return
    h, w, c = store.shape
    if (h, c, len(store.classes)) != (meta["image_size"], meta["in_channels"], meta["num_classes"]):
        rec.cm_note = (f"The prepared store {store.path} ({h}x{w}x{c}, {len(store.classes)} classes) does not fit "
                       f"the final weights: no confusion matrix.")
        return
    split = store[name]
    data = SplitOnDevice(split, torch.device("cpu"), resident=False)
    channels_last = rec.config.get("model.channels_last", True) is True  # as the run evaluated (faster on CPU)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    normalize = Normalize(meta["mean"], meta["std"], torch.device("cpu"), channels_last, eval_crop_of_meta(meta))
    eval_batch = rec.config.get("eval_batch")
    chunk = int(eval_batch) if _number(eval_batch) and eval_batch >= 1 else 1000
    flip = rec.config.get("tta_flip", True) is True
    n, k = len(split), meta["num_classes"]
    cm = np.zeros((k, k), dtype=np.int64)
    with torch.inference_mode():
        for lo in range(0, n, chunk):
            x, y = data.gather(torch.arange(lo, min(n, lo + chunk)))
            x = normalize.for_eval(to_nchw(x))  # as the run evaluated: resize + centre crop for crop-trained weights
            logits = model(x).float()
            if flip:
                logits = (logits + model(x.flip(3)).float()) * 0.5
            np.add.at(cm, (y.numpy().astype(np.int64), logits.argmax(1).numpy()), 1)
    rec.cm = cm
    acc = np.trace(cm) / max(1, n)
    ran = f" (summary.json: {100 * rec.summary['acc']:.2f}%)" if rec.summary and _number(rec.summary.get("acc")) else ""
    rec.cm_note = (f"The final weights on the {name} split of {store.path.name}: {n} images, accuracy "
                   f"{100 * acc:.2f}%{ran}; evaluated here in fp32 on the CPU{' with flip TTA' if flip else ''}.")


# ----------------------------------------------------------------------------- the page

def _e(v) -> str:
    return html.escape(str(v))


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def _duration(s) -> str:
    if not _number(s):
        return ""
    return wall_time(s)


def _img(png: Path, out_dir: Path, alt: str, half: bool = False) -> str:
    """The PNG embedded (the page stands alone), linked to its file."""
    data = base64.b64encode(png.read_bytes()).decode()
    rel = os.path.relpath(png, out_dir)
    return (f'<figure{" class=half" if half else ""}><a href="{_e(rel)}">'
            f'<img src="data:image/png;base64,{data}" alt="{_e(alt)}"></a>'
            f"<figcaption>{_e(alt)}</figcaption></figure>")


def _table(header: list[str], rows: list[list], cls: str = "") -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_e(_fmt(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _overview_rows(runs: list[RunRecord]) -> list[list]:
    """Fields (rows) by run (columns): results, layout and timings."""
    def pct(v):
        return f"{100 * v:.2f}%" if _number(v) else ""

    def row(name, get):
        return [name] + [get(r) for r in runs]

    def last_eval(r):
        return r.summary if r.summary else (r.evals[-1] if r.evals else {})

    def steps(r):
        return f"{r.steps_done}" + (f" of {r.total_steps}" if r.total_steps else "")

    def mem(r):
        m = (r.summary or {}).get("memory_per_rank", {})
        if isinstance(m, dict) and _number(m.get("total_bytes")):
            return f"{m['total_bytes'] / 2**20:.1f} MiB"
        return f"{r.layout['memory_mib']} MiB" if "memory_mib" in r.layout else ""

    def wall(r):
        if _number((r.summary or {}).get("train_s")):
            return _duration(r.summary["train_s"])
        return f"{_duration(r.wall_so_far)} so far (to the last record)" if r.wall_so_far is not None else ""

    def per_step(r):
        s = r.summary or {}
        if _number(s.get("train_s")) and _number(s.get("global_step")) and s["global_step"]:
            return f"{s['train_s'] / s['global_step']:.3f} s"
        return ""

    def first_eval(r):
        return _duration(r.evals[0].get("wall")) if r.evals else ""

    return [
        row("state", lambda r: r.state),
        row("test accuracy" + (" (last evaluation)" if any(not r.summary for r in runs) else ""),
            lambda r: pct(last_eval(r).get("acc"))),
        *([row("top-5 accuracy", lambda r: pct(last_eval(r).get("top5")))]  # more than 5 classes only
          if any("top5" in last_eval(r) for r in runs) else []),
        row("test loss", lambda r: f"{last_eval(r)['loss']:.4f}" if _number(last_eval(r).get("loss")) else ""),
        row("evaluations", lambda r: len(r.evals)),
        row("steps", steps),
        row("model", lambda r: r.layout.get("model") or r.config.get("model.name", "")),
        row("data", lambda r: r.layout.get("data") or r.config.get("data.path", "")),
        row("world size (ranks)", lambda r: (r.summary or {}).get("world") or r.layout.get("world", "")),
        row("strategy", lambda r: (r.summary or {}).get("strategy") or r.config.get("parallel.strategy", "")),
        row("precision", lambda r: (r.summary or {}).get("precision") or r.layout.get("precision", "")),
        row("device", lambda r: r.layout.get("device", "")),
        row("threads per rank", lambda r: r.layout.get("threads", "")),
        row("global batch", lambda r: r.config.get("global_batch", r.layout.get("global_batch", ""))),
        row("training wall time", wall),
        row("wall time per step (evaluations included)", per_step),
        row("throughput (last epoch)",
            lambda r: f"{last_eval(r)['train_img_s']:,.0f} img/s" if _number(last_eval(r).get("train_img_s")) else ""),
        row("first evaluation recorded at", first_eval),
        row("memory per rank (params, grads, optimizer)", mem),
    ]


def _config_diff(runs: list[RunRecord]) -> list[list]:
    keys = sorted({k for r in runs for k in r.config} - {"run_dir"})
    missing = object()
    rows = []
    for k in keys:
        vals = [r.config.get(k, missing) for r in runs]
        if any(v != vals[0] for v in vals):
            rows.append([k] + ["(absent)" if v is missing else v for v in vals])
    return rows


def _links(rec: RunRecord, out_dir: Path) -> str:
    names = ["config.toml", "metrics.jsonl", "summary.json", "model.safetensors", "model.json", "curves.png",
             "logs", "checkpoints", "tensorboard"]
    items = []
    for n in names:
        p = rec.path / n
        if p.exists():
            items.append(f'<a href="{_e(os.path.relpath(p, out_dir))}">{_e(n)}{"/" if p.is_dir() else ""}</a>')
    tb = ""
    if (rec.path / "tensorboard").is_dir():
        tb = f" &middot; TensorBoard: <code>tensorboard --logdir {_e(rec.path / 'tensorboard')}</code>"
    return f"<p class=\"files\">Files: {' &middot; '.join(items) or 'none'}{tb}</p>"


CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:24px auto;max-width:1200px;
 padding:0 16px;color:#222;line-height:1.4}
h1{font-size:1.6em;margin-bottom:4px}h2{margin-top:32px;border-bottom:1px solid #ddd;padding-bottom:4px}
table{border-collapse:collapse;margin:8px 0;font-size:.92em}th,td{border:1px solid #ddd;padding:4px 8px;
 text-align:left;vertical-align:top}th{background:#f4f4f4}
.state{padding:10px 14px;border-radius:6px;margin:8px 0;border-left:6px solid}
.finished{background:#eef8ee;border-color:#2ca02c}.preempted{background:#fff6e6;border-color:#ff7f0e}
.notfinished{background:#fdeeee;border-color:#d62728}
figure{display:inline-block;margin:8px;vertical-align:top;max-width:100%}
figure img{max-width:100%;border:1px solid #eee}figure.half{width:calc(50% - 20px)}figure.half img{width:100%}
figcaption{font-size:.85em;color:#555}
pre{background:#f7f7f7;padding:10px;overflow:auto;font-size:.85em}.note{color:#444}
.muted{color:#777;font-size:.9em}code{background:#f2f2f2;padding:1px 4px}
"""


def _state_block(r: RunRecord, several: bool) -> str:
    cls = {FINISHED: "finished", PREEMPTED: "preempted"}.get(r.state, "notfinished")
    who = f"<b>{_e(r.label)}</b> ({_e(r.path)}): " if several else ""
    skipped = (f" {r.skipped_lines} line(s) of metrics.jsonl could not be read and were skipped."
               if r.skipped_lines else "")
    return f'<div class="state {cls}">{who}{_e(r.state_note)}{_e(skipped)}</div>'


def render_html(runs: list[RunRecord], out_dir: Path, pngs: dict[str, Path], notes: dict[str, str]) -> str:
    several = len(runs) > 1
    title = f"Phalanx report: {runs[0].label}" if not several else f"Phalanx report: {len(runs)} runs"
    parts = [f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{_e(title)}</title>"
             f"<style>{CSS}</style></head><body><h1>{_e(title)}</h1>",
             f'<p class="muted">Made by <code>phalanx report</code> on {_e(time.strftime("%Y-%m-%d %H:%M:%S"))} '
             f'from {", ".join(_e(r.path) for r in runs)}. It shows what the run directories held then.</p>']
    parts += [_state_block(r, several) for r in runs]

    parts.append("<h2>Results, layout and timings</h2>")
    parts.append(_table([""] + [r.label for r in runs], _overview_rows(runs), "overview"))
    if several:
        diff = _config_diff(runs)
        parts.append("<h2>Config differences</h2>")
        parts.append(_table(["key"] + [r.label for r in runs], diff) if diff else
                     "<p>The runs' resolved configs are the same (run_dir aside).</p>")

    parts.append("<h2>Curves</h2>")
    for key, alt in (("loss_acc", "training loss and test accuracy against step and wall time"),
                     ("eval_loss", "test loss at each evaluation"), ("lr", "learning rate"),
                     ("throughput", "training throughput")):
        if key in pngs:
            parts.append(_img(pngs[key], out_dir, alt, half=key != "loss_acc"))
    parts += [f'<p class="note">{_e(notes[k])}</p>' for k in ("loss", "throughput")]
    if "profile" in pngs:
        parts.append("<h2>Where a step's time goes</h2>")
        parts.append(_img(pngs["profile"], out_dir, "each rank's training step split into phases"))
        parts.append('<p class="note">From <code>--log.profile</code>: torch.profiler over the profiled steps '
                     'of each rank (host time; on CUDA see the timelines). The timelines and operator tables are '
                     'in each run\'s <code>profile/</code> folder.</p>')

    parts.append("<h2>Test predictions of the final weights</h2>")
    for r in runs:
        parts.append(f'<p class="note">{_e(r.label + ": ") if several else ""}{_e(r.cm_note)}</p>')
    for i, r in enumerate(runs):
        if f"confusion-{i}" in pngs:
            parts.append(_img(pngs[f"confusion-{i}"], out_dir, f"confusion matrix: {r.label}"))
    if "per_class" in pngs:
        parts.append(_img(pngs["per_class"], out_dir, "accuracy per class"))

    parts.append("<h2>Evaluations</h2>")
    for r in runs:
        parts.append(_evaluations(r, several))

    parts.append("<h2>Resolved config</h2>")
    for r in runs:
        text = r.config_text or "(no config.toml)"
        if several:
            parts.append(f"<details><summary>{_e(r.label)}: config.toml</summary><pre>{_e(text)}</pre></details>")
        else:
            parts.append(f"<pre>{_e(text)}</pre>")

    parts.append("<h2>Summary, checkpoints, logs and files</h2>")
    parts += [_from_the_logs(r, out_dir, several) for r in runs]
    parts.append("</body></html>\n")
    return "\n".join(parts)


def _evaluations(r: RunRecord, several: bool) -> str:
    top5 = any("top5" in e for e in r.evals)  # evaluations with more than 5 classes count top-5 as well

    def pct(v) -> str:
        return f"{100 * v:.2f}%" if _number(v) else ""
    rows = [[e.get("epoch", ""), e["step"], pct(e.get("acc")), *([pct(e.get("top5"))] if top5 else []),
             f"{e['loss']:.4f}" if _number(e.get("loss")) else "",
             f"{e['train_img_s']:,.0f}" if _number(e.get("train_img_s")) else "", _duration(e.get("wall"))]
            for e in r.evals]
    head = f"<h3>{_e(r.label)}</h3>" if several else ""
    header = ["epoch", "step", "test accuracy", *(["top-5 accuracy"] if top5 else []), "test loss", "img/s (epoch)",
              "recorded at (wall time)"]
    return head + (_table(header, rows) if rows else "<p>No evaluation yet.</p>")


def _from_the_logs(r: RunRecord, out_dir: Path, several: bool) -> str:
    parts = [f"<h3>{_e(r.label)}</h3>"] if several else []
    if r.summary:
        parts.append(f"<details><summary>summary.json</summary><pre>{_e(json.dumps(r.summary, indent=1))}"
                     f"</pre></details>")
    if r.checkpoint:
        parts.append(f"<p>Newest checkpoint: step {r.checkpoint[0]} ({_e(r.checkpoint[1])}).</p>")
    parts.append("<p>Restarts, resumes, preemptions, warnings and errors in logs/rank-K.log:</p><pre>"
                 + _e("\n".join(r.notable)) + "</pre>" if r.notable else
                 "<p>No restarts, resumes, preemptions, warnings or errors in the logs.</p>")
    parts.append(_links(r, out_dir))
    return "\n".join(parts)


# ----------------------------------------------------------------------------- the command

def _labels(paths: list[Path]) -> list[str]:
    """Folder names, with as many parent folders as it takes to tell them apart."""
    resolved = [p.resolve() for p in paths]
    for depth in range(1, 6):
        labels = ["/".join(p.parts[-depth:]) for p in resolved]
        if len(set(labels)) == len(labels):
            return labels
    return [str(p) for p in resolved]


def make_report(run_dirs: list[Path], out: Path | None = None, evaluate: bool = True) -> Path:
    """Write OUT/report.html and OUT/report/*.png for the runs; returns the page's path."""

    try:
        plots.pyplot()
    except ImportError:
        raise ConfigError("phalanx report draws its plots with matplotlib, which is not installed: "
                          "pip install matplotlib") from None
    run_dirs = [Path(p) for p in run_dirs]
    runs = [read_run(p, label, COLORS[i % len(COLORS)]) for i, (p, label) in enumerate(zip(run_dirs,
                                                                                            _labels(run_dirs)))]
    if out is None:
        out = run_dirs[0] if len(run_dirs) == 1 else Path(f"report-{time.strftime('%Y%m%d-%H%M%S')}")
    png_dir = out / PNG_DIR
    try:
        png_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"--out {out}: cannot write the report there ({e.strerror or e}); choose another "
                          f"folder with --out") from None
    for r in runs:
        if evaluate:
            confusion_of_final_weights(r)
        if r.state != FINISHED:  # the legends say it too
            r.label = f"{r.label} ({r.state})"
    pngs = {"loss_acc": plots.plot_loss_accuracy(runs, png_dir / "loss_acc.png"),
            "eval_loss": plots.plot_against_step(runs, png_dir / "eval_loss.png", "evals", "loss", "test loss",
                                                 "test loss at each evaluation"),
            "lr": plots.plot_against_step(runs, png_dir / "lr.png", "train", "lr", "learning rate",
                                          "learning rate (as logged)"),
            "throughput": plots.plot_throughput(runs, png_dir / "throughput.png")}
    if any(r.profile for r in runs):
        pngs["profile"] = plots.plot_profile(runs, png_dir / "profile.png")
    for i, r in enumerate(runs):
        if r.cm is not None:
            name = "confusion.png" if len(runs) == 1 else f"confusion-{i + 1}.png"
            pngs[f"confusion-{i}"] = plots.plot_confusion(r.cm, r.classes, png_dir / name,
                                                          f"confusion matrix: {r.label}")
    with_cm = [r for r in runs if r.cm is not None]
    if with_cm and all(r.classes == with_cm[0].classes for r in with_cm):
        accs = [(r.label, r.color, np.diag(r.cm) / np.maximum(r.cm.sum(axis=1), 1)) for r in with_cm]
        pngs["per_class"] = plots.plot_per_class(accs, with_cm[0].classes, png_dir / "per_class.png")
    notes = {"throughput": _throughput_note(runs),
             "loss": "The training loss is that of the augmented training batches with label smoothing "
                     "(optim.label_smoothing), so it can sit above the test loss."}
    page = out / "report.html"
    page.write_text(render_html(runs, out, pngs, notes), encoding="utf-8")
    return page


def _throughput_note(runs: list[RunRecord]) -> str:
    per_rank = [r for r in runs if r.rank_img_s]
    base = ("Lines: images per second of the global batch as rank 0 measured them between log records "
            "(metrics.jsonl).")
    if per_rank:
        return (base + " Markers: each rank's own measure of the same over each epoch, from logs/rank-K.log (every "
                "rank steps in lockstep with the others, so a rank whose markers sit lower is the slow one).")
    return base + (" Per-rank throughput: not in the logs yet (each rank logs it when an epoch is evaluated), so "
                   "only the overall img/s is shown.")

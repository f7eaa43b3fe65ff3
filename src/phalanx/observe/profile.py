"""Where a training step's time goes: torch.profiler over a few steps of the real run, on every rank.

`--log.profile N` profiles N optimizer steps after the first `--log.profile_start` of this process (they
build kernels and caches) and writes, per rank, into RUN_DIR/profile/:
- rank-K.trace.json.gz: the timeline (open it in https://ui.perfetto.dev or chrome://tracing), and
- rank-K.txt: the step split into Phalanx's phases, then torch's operator table (self time, top 30),
- rank-K.json: the split as numbers (milliseconds per step; on CUDA also `device_busy_ms`, the kernels' time
  per step summed over streams: far below `step_ms`, the GPU waits for the host).
Rank 0 logs the split in one line.

The phases are `torch.profiler.record_function` ranges entered only while profiling (`region`), so an
ordinary run pays nothing for them. They nest as the step does:
    phalanx/augment    translation, flip, crops and normalisation of this rank's part (data/loader.py)
    phalanx/forward    the model under autocast, and the loss
    phalanx/backward   autograd, with DDP's or FSDP's gradient reduction (the wait for peers included)
    phalanx/optimizer  clipping, the update, the LR schedule
    phalanx/sync       the ranks' agreement on the norm statistics (one all-reduce)
    phalanx/ema        the weight average
What no phase covers (waiting for the prefetched batch, logging, the loop) is "other".
Torch's own profiler does the measuring: this module only picks the steps, names the phases and sums them.
"""
from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path

import torch

from phalanx import runtime

PHASES = ("augment", "forward", "backward", "optimizer", "sync", "ema")
_active = False  # a profiler is recording on this process: `region` names ranges


def region(name: str):
    """A named range of the step in the profile (a no-op context unless a profile is being recorded)."""
    return torch.profiler.record_function(f"phalanx/{name}") if _active else contextlib.nullcontext()


class StepProfiler:
    """Profiles `steps` optimizer steps after the first `start` of this process; `step()` after each one."""

    def __init__(self, steps: int, start: int, out_dir: Path, rank: int, device: torch.device,
                 is_main: bool):
        self.steps, self.start, self.out_dir, self.rank, self.is_main = steps, start, Path(out_dir), rank, is_main
        self.device = device
        self.device_activity = runtime.of(device).profiler_activity  # "CUDA" on a GPU: its kernels are recorded
        self.seen = 0
        self.prof: torch.profiler.profile | None = None
        self._t0 = 0.0
        if steps > 0 and start == 0:
            self._begin()

    def _begin(self) -> None:
        global _active
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.device_activity:
            activities.append(getattr(torch.profiler.ProfilerActivity, self.device_activity))
        self.prof = torch.profiler.profile(activities=activities, record_shapes=True)
        with _without_kineto_chatter():
            self.prof.__enter__()
        _active = True
        self._t0 = _now(self.device)

    def step(self) -> None:
        """After an optimizer step: start or stop recording when due."""
        if self.steps <= 0:
            return
        self.seen += 1
        if self.prof is None and self.seen == self.start:  # `seen` passes `start` once
            self._begin()
        elif self.prof is not None and self.seen == self.start + self.steps:
            self._end(self.steps)

    def close(self) -> None:
        """At the end of training: a profile the run ended in the middle of is written with the steps it holds;
        a run that ended before the first profiled step says so (rank 0)."""
        if self.prof is not None:
            self._end(self.seen - self.start)
        if self.steps > 0 and self.seen <= self.start and self.is_main:
            logging.getLogger("phalanx").warning(
                f"log.profile: nothing profiled: this process trained {self.seen} optimizer step(s), and profiling "
                f"starts after {self.start} of them; lower --log.profile_start")

    def _end(self, steps: int) -> None:
        global _active
        wall_s = _now(self.device) - self._t0
        prof, self.prof = self.prof, None
        with _without_kineto_chatter():
            prof.__exit__(None, None, None)
        _active = False
        if steps <= 0:
            return
        try:
            self._write(prof, steps, wall_s)
        except Exception as e:  # a profile that cannot be written must not end the training run
            logging.getLogger("phalanx").warning(f"profile of rank {self.rank} not written to {self.out_dir}: "
                                                 f"{type(e).__name__}: {e}")

    def _write(self, prof: torch.profiler.profile, steps: int, wall_s: float) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        trace = self.out_dir / f"rank-{self.rank}.trace.json.gz"
        prof.export_chrome_trace(str(trace))
        averages = prof.key_averages()
        summary = phase_split(cpu_totals(averages), wall_s, steps)
        if self.device_activity:  # how busy the device was: kernel time (summed over streams) per step
            summary["device_busy_ms"] = sum(e.self_device_time_total for e in averages) / 1e3 / steps
        sort = "self_device_time_total" if self.device_activity else "self_cpu_time_total"
        table = averages.table(sort_by=sort, row_limit=30)
        text = (f"rank {self.rank}: {steps} optimizer steps after the first {self.start} of this process\n"
                f"{format_split(summary)}\n\n"
                f"(phases are host time; on a GPU, kernels run later than they are launched: read the device "
                f"columns below and the trace)\n\n{table}\n")
        (self.out_dir / f"rank-{self.rank}.txt").write_text(text)
        (self.out_dir / f"rank-{self.rank}.json").write_text(json.dumps(summary, indent=1) + "\n")
        if self.is_main:
            logging.getLogger("phalanx").info(f"profile of rank 0: {format_split(summary)}; the timeline: "
                                              f"{trace}, tables: {self.out_dir}/rank-K.txt")


def cpu_totals(averages) -> dict[str, float]:
    """Inclusive CPU time (microseconds) by event name. With CUDA recorded, a `record_function` range is also
    a GPU annotation of the same name whose CPU time is 0 (seen on an H100, torch 2.11: every phase read 0):
    each name keeps its largest CPU time."""
    out: dict[str, float] = {}
    for e in averages:
        out[e.key] = max(out.get(e.key, 0.0), float(e.cpu_time_total))
    return out


def phase_split(totals_us: dict[str, float], wall_s: float, steps: int) -> dict:
    """{'step_ms', 'phases': {name: ms per step}} from the profiler's inclusive CPU time (microseconds) of each
    `phalanx/<phase>` range, over `steps` steps that took `wall_s`; "other" is the step time no phase covers."""
    per_step = {p: totals_us.get(f"phalanx/{p}", 0.0) / 1e3 / steps for p in PHASES}
    step_ms = wall_s * 1e3 / steps
    per_step["other"] = max(0.0, step_ms - sum(per_step.values()))
    return {"step_ms": step_ms, "steps": steps, "phases": per_step}


def format_split(summary: dict) -> str:
    """'126.0 ms per step: forward 40.1 (32%), backward ...' (phases over 0.05 ms, largest first)."""
    step = summary["step_ms"]
    parts = [f"{name} {ms:.1f} ({100 * ms / step:.0f}%)" for name, ms in
             sorted(summary["phases"].items(), key=lambda kv: -kv[1]) if ms >= 0.05]
    return f"{step:.1f} ms per step over {summary['steps']} steps: " + ", ".join(parts)


@contextlib.contextmanager
def _without_kineto_chatter():
    """Kineto (torch's profiler library) writes "USDT: ... profiler_start" lines to the process's stderr
    from C++ on every rank, and with a CUDA build of torch on a machine without a GPU "ERROR: ...
    gpuGetDeviceCount failed" (there is none to count); the console is rank 0's. The process's stderr is
    held in a file meanwhile, and every other line is passed on."""
    import os
    import sys
    import tempfile
    sys.stderr.flush()
    try:
        held = tempfile.TemporaryFile()  # noqa: SIM115 (closed by the with below)
    except OSError:  # nowhere to hold it: the chatter stays, the profile goes on
        yield
        return
    try:
        saved = os.dup(2)
    except OSError:  # no stderr to hold
        held.close()
        yield
        return
    with held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            no_gpu = not runtime.KINDS["cuda"].is_available()  # the profiler looks for GPUs and says so
            rest = [ln for ln in held.read().decode(errors="replace").splitlines(keepends=True)
                    if not ln.startswith("USDT:") and not (no_gpu and "gpuGetDeviceCount failed" in ln)]
            if rest:
                sys.stderr.write("".join(rest))
                sys.stderr.flush()


def _now(device: torch.device) -> float:
    """The time once the device has finished what was queued (the accelerator's synchronize)."""
    import time

    runtime.of(device).synchronize(device)
    return time.perf_counter()

"""The step profiler: the phase split's arithmetic, the files a profile leaves, and nothing when off."""
import contextlib
import gzip
import json

import pytest
import torch
import torch.nn as nn

from phalanx import config as C
from phalanx.errors import ConfigError
from phalanx.observe import profile
from phalanx.observe.profile import StepProfiler, format_split, phase_split, region


def test_phase_split_gives_milliseconds_per_step_and_the_uncovered_rest():
    totals_us = {"phalanx/forward": 40_000.0, "phalanx/backward": 90_000.0, "phalanx/sync": 5_000.0,
                 "aten::convolution": 1e9}  # torch's own ops are not phases
    s = phase_split(totals_us, wall_s=0.15, steps=1)
    assert s["step_ms"] == pytest.approx(150.0)
    assert s["phases"]["forward"] == pytest.approx(40.0) and s["phases"]["backward"] == pytest.approx(90.0)
    assert s["phases"]["augment"] == 0.0
    assert s["phases"]["other"] == pytest.approx(15.0)
    assert phase_split(totals_us, wall_s=0.3, steps=2)["phases"]["forward"] == pytest.approx(20.0)
    line = format_split(s)
    assert line.startswith("150.0 ms per step over 1 steps: backward 90.0 (60%), forward 40.0 (27%), other 15.0")
    assert "augment" not in line  # phases that took nothing are left out


def test_regions_cost_nothing_unless_a_profile_is_recording():
    assert isinstance(region("forward"), contextlib.nullcontext)


def _train(profiler: StepProfiler, steps: int) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 3, (8,))
    for _ in range(steps):
        with region("forward"):
            loss = nn.functional.cross_entropy(model(x), y)
        with region("backward"):
            loss.backward()
        with region("optimizer"):
            opt.step()
            opt.zero_grad()
        profiler.step()
    profiler.close()


def test_a_profile_writes_the_split_the_timeline_and_the_table_of_the_steps_asked(tmp_path):
    p = StepProfiler(steps=3, start=2, out_dir=tmp_path / "profile", rank=1, device=torch.device("cpu"),
                     is_main=False)
    _train(p, steps=8)
    assert not profile._active  # recording stopped after step 2 + 3
    split = json.loads((tmp_path / "profile" / "rank-1.json").read_text())
    assert split["steps"] == 3
    assert split["phases"]["forward"] > 0 and split["phases"]["backward"] > 0 and split["phases"]["optimizer"] > 0
    assert split["phases"]["sync"] == 0.0
    assert sum(split["phases"].values()) == pytest.approx(split["step_ms"], rel=1e-6)
    text = (tmp_path / "profile" / "rank-1.txt").read_text()
    assert text.startswith("rank 1: 3 optimizer steps after the first 2 of this process\n")
    assert "aten::convolution_backward" in text  # torch's operator table
    with gzip.open(tmp_path / "profile" / "rank-1.trace.json.gz", "rt") as f:
        events = json.load(f)["traceEvents"]
    forwards = [e for e in events if e.get("name") == "phalanx/forward"]
    assert len(forwards) == 3  # the steps asked, not the warm-up ones before them


def test_a_run_that_ends_inside_the_profiled_steps_writes_the_ones_it_took(tmp_path):
    p = StepProfiler(steps=10, start=0, out_dir=tmp_path, rank=0, device=torch.device("cpu"), is_main=True)
    _train(p, steps=4)
    assert json.loads((tmp_path / "rank-0.json").read_text())["steps"] == 4
    assert not profile._active


def test_off_by_default_and_profiles_nothing(tmp_path):
    assert C.Config().log.profile == 0
    p = StepProfiler(steps=0, start=0, out_dir=tmp_path / "profile", rank=0, device=torch.device("cpu"),
                     is_main=True)
    _train(p, steps=2)
    assert not (tmp_path / "profile").exists()


@pytest.mark.parametrize("field,value,words", [("profile", -1, "must be >= 0"), ("profile_start", -2, ">= 0")])
def test_bad_profile_settings_are_refused_by_name(field, value, words):
    cfg = C.Config()
    setattr(cfg.log, field, value)
    with pytest.raises(ConfigError, match=f"log.{field}={value}: .*{words}"):
        cfg.validate()


def test_profiling_on_xla_points_to_torch_xla_profiler():
    cfg = C.Config(device="xla")
    cfg.log.profile = 5
    with pytest.raises(ConfigError, match="log.profile=5: .*torch_xla.debug.profiler"):
        cfg.validate()


def test_kineto_chatter_is_held_back_and_other_lines_pass(capfd):
    import os

    from phalanx.observe.profile import _without_kineto_chatter
    with _without_kineto_chatter():
        os.write(2, b"USDT:2026-11-27 18:01:36 1:1 SyncActivityProfilerHandler.cpp:39] profiler_start\n")
        os.write(2, b"a real problem\n")
    err = capfd.readouterr().err
    assert err == "a real problem\n"


def test_a_run_too_short_for_the_profile_says_so(tmp_path):
    import logging

    class Lines(logging.Handler):
        def __init__(self):
            super().__init__(logging.WARNING)
            self.lines = []

        def emit(self, record):
            self.lines.append(record.getMessage())

    got = Lines()
    log = logging.getLogger("phalanx")  # its own handler: a run in this session may have stopped propagation
    log.addHandler(got)
    try:
        p = StepProfiler(steps=3, start=5, out_dir=tmp_path, rank=0, device=torch.device("cpu"), is_main=True)
        _train(p, steps=5)  # profiling would begin at step 5 and record none
    finally:
        log.removeHandler(got)
    assert not list(tmp_path.iterdir())
    assert got.lines == ["log.profile: nothing profiled: this process trained 5 optimizer step(s), and profiling "
                         "starts after 5 of them; lower --log.profile_start"]


def test_a_phase_recorded_on_the_cpu_and_as_a_gpu_annotation_keeps_its_cpu_time():
    from types import SimpleNamespace

    from phalanx.observe.profile import cpu_totals
    averages = [SimpleNamespace(key="phalanx/forward", cpu_time_total=36_000.0),
                SimpleNamespace(key="phalanx/forward", cpu_time_total=0.0),  # the GPU annotation, listed last
                SimpleNamespace(key="aten::mm", cpu_time_total=5.0)]
    assert cpu_totals(averages) == {"phalanx/forward": 36_000.0, "aten::mm": 5.0}


def test_a_device_that_names_a_profiler_activity_gets_its_kernels_recorded(tmp_path, monkeypatch):
    """The accelerator says which profiler activity records its kernels (CUDA on a GPU): then the profile also
    holds `device_busy_ms` and sorts its table by device time. Here a CPU stand-in names CUDA, and the profiler
    is asked for it (what it records is the CPU's: this machine has no GPU)."""
    from phalanx import runtime
    from phalanx.runtime.cpu import CPUAccelerator
    recorded = []
    real = torch.profiler.profile

    def recording(*a, activities=(), **k):
        recorded.append(list(activities))
        return real(*a, activities=[torch.profiler.ProfilerActivity.CPU], **k)

    monkeypatch.setitem(runtime.KINDS, "cpu", type("Kernels", (CPUAccelerator,), {"profiler_activity": "CUDA"}))
    monkeypatch.setattr(torch.profiler, "profile", recording)
    p = StepProfiler(steps=2, start=0, out_dir=tmp_path, rank=0, device=torch.device("cpu"), is_main=False)
    _train(p, 2)
    assert recorded == [[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]]
    summary = json.loads((tmp_path / "rank-0.json").read_text())
    assert "device_busy_ms" in summary and summary["steps"] == 2
    monkeypatch.setitem(runtime.KINDS, "cpu", CPUAccelerator)
    p = StepProfiler(steps=2, start=0, out_dir=tmp_path / "plain", rank=0, device=torch.device("cpu"), is_main=False)
    _train(p, 2)
    assert recorded[-1] == [torch.profiler.ProfilerActivity.CPU]
    assert "device_busy_ms" not in json.loads((tmp_path / "plain" / "rank-0.json").read_text())

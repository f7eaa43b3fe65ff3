"""The tuner's search, cache and questions with fake timings; one real (tiny) measurement."""
import json

import pytest

from phalanx.config import Config
from phalanx.tools import tune
from phalanx.tools.tune import Choice, Question


def _q(**kw):
    base = dict(kind="cpu", cores=4, layouts=((1, 4), (2, 2), (4, 1)), precisions=("bf16", "fp32"),
                memory_formats=(True, False), model=("phalanx_cnn", 8, "batch", "relu"), shape=(28, 28, 1),
                num_classes=10, global_batch=256)
    base.update(kw)
    return Question(**base)


def fake_rates(table):
    calls = []

    def measure(c: Choice) -> float:
        calls.append(c)
        speed = {(1, 4): 100.0, (2, 2): 150.0, (4, 1): 120.0}[(c.nproc, c.threads)]
        speed *= 1.3 if c.precision == "bf16" and table.get("bf16_fast") else 0.9 if c.precision == "bf16" else 1.0
        speed *= 1.1 if c.channels_last == table.get("cl_best", True) else 1.0
        return speed

    return measure, calls


def test_search_picks_the_fastest_one_field_at_a_time():
    measure, calls = fake_rates({"bf16_fast": False, "cl_best": False})
    best, rates = tune.search(_q(), measure)
    assert best == Choice(2, 2, "fp32", False)
    # layouts, then the other precision, then the other format; each in 3 interleaved rounds
    assert len(set(calls)) == 3 + 1 + 1 and len(calls) == 3 * len(set(calls))
    assert calls[:9] == [Choice(n, t, "bf16", True) for n, t in ((1, 4), (2, 2), (4, 1), (2, 2), (4, 1), (1, 4),
                                                                  (4, 1), (1, 4), (2, 2))]  # rotated each round
    assert rates[0] == (best, [max(tune.median(xs) for _, xs in rates)] * 3)


def test_closed_question_measures_nothing():
    q = _q(layouts=((2, 1),), precisions=("fp32",), memory_formats=(True,))
    assert not q.open
    measure, calls = fake_rates({})
    assert tune.search(q, measure) == (Choice(2, 1, "fp32", True), []) and not calls


def test_layouts_use_every_core_and_keep_32_images_per_rank():
    assert tune.layouts_for(4, 512) == ((1, 4), (2, 2), (4, 1))
    assert tune.layouts_for(6, 64) == ((1, 6), (2, 3))
    assert tune.layouts_for(2, 16) == ((1, 2),)


def test_decision_is_cached_per_question_and_refreshed_on_demand(tmp_path, monkeypatch):
    monkeypatch.setattr(tune, "host_load", lambda: (0.0, 4))  # a quiet machine
    cache = tmp_path / "tune.json"
    measure, calls = fake_rates({"bf16_fast": True})
    first, rec = tune.decide(_q(), cache, measure)
    assert not rec["cached"] and first == Choice(2, 2, "bf16", True) and len(calls) == 15
    again, rec = tune.decide(_q(), cache, measure)
    assert again == first and rec["cached"] and len(calls) == 15  # no new measurement
    other, _ = tune.decide(_q(global_batch=512), cache, measure)  # another question: measured
    assert len(calls) == 30 and len(json.loads(cache.read_text())) == 2
    tune.decide(_q(), cache, measure, refresh=True)
    assert len(calls) == 45
    assert "cached" in tune.summary_line(again, dict(json.loads(cache.read_text())[tune.cache_key(_q())],
                                                      cached=True))


def test_a_damaged_cache_is_measured_again(tmp_path, monkeypatch):
    monkeypatch.setattr(tune, "host_load", lambda: (0.0, 4))
    cache = tmp_path / "tune.json"
    measure, calls = fake_rates({})
    cache.write_text("{not json")
    tune.decide(_q(), cache, measure)
    assert len(calls) == 15
    data = json.loads(cache.read_text())
    data[tune.cache_key(_q())]["choice"] = {"nproc": "x", "bogus": 1}
    cache.write_text(json.dumps(data))
    tune.decide(_q(), cache, measure)
    assert len(calls) == 30


def test_question_follows_what_the_user_fixed(monkeypatch):
    monkeypatch.setattr("phalanx.runtime.cpu.usable_cores", lambda: 4)
    monkeypatch.setattr("phalanx.runtime.dist.usable_cores", lambda: 4)
    monkeypatch.setattr("phalanx.runtime.cpu.cpu_has_bf16", lambda: True)
    cfg = Config()
    cfg.device = "cpu"
    q = tune.question_for(cfg, set(), (28, 28, 1), 10)
    assert q.layouts == ((1, 4), (2, 2), (4, 1)) and q.precisions == ("bf16", "fp32") and q.memory_formats == (
        True, False)
    cfg.parallel.nproc, cfg.precision = "2", "fp32"
    q = tune.question_for(cfg, {"model.channels_last"}, (28, 28, 1), 10)
    assert q.layouts == ((2, 2),) and q.precisions == ("fp32",) and q.memory_formats == (True,) and not q.open


def test_with_mixup_only_layouts_that_keep_its_pairs_whole_are_timed(monkeypatch):
    monkeypatch.setattr("phalanx.runtime.cpu.usable_cores", lambda: 6)
    monkeypatch.setattr("phalanx.runtime.dist.usable_cores", lambda: 6)
    cfg = Config()
    cfg.device, cfg.global_batch = "cpu", 256
    assert tune.question_for(cfg, set(), (28, 28, 1), 10).layouts == ((1, 6), (2, 3), (3, 2), (6, 1))
    cfg.augment.cutmix = 1.0  # 3 ranks get 86/85/85 images and 6 ranks 43 or 42: pairs cut in two
    assert tune.question_for(cfg, set(), (28, 28, 1), 10).layouts == ((1, 6), (2, 3))


def test_tune_run_applies_the_choice_to_the_config_and_the_ranks(monkeypatch, tmp_path):
    from phalanx.train.budget import TUNED_RATE_ENV
    monkeypatch.setenv(TUNED_RATE_ENV, "")  # restored afterwards: tune_run sets it for the ranks it precedes
    monkeypatch.setattr("phalanx.runtime.cpu.usable_cores", lambda: 2)
    monkeypatch.setattr("phalanx.runtime.cpu.cpu_has_bf16", lambda: False)
    monkeypatch.setattr(tune, "measure_choice", lambda c, q, device=None: 100.0 + c.nproc + (not c.channels_last))
    cfg = Config()
    cfg.device = "cpu"
    said = []
    argv = tune.tune_run(cfg, set(), (28, 28, 1), 10, tmp_path / "tune.json", said.append)
    assert argv == ["--parallel.threads_per_rank", "1", "--model.channels_last", "false"]
    assert cfg.parallel.nproc == "2" and cfg.model.channels_last is False
    assert len(said) == 1 and "2 ranks x 1 thread, fp32, contiguous" in said[0]
    import os
    assert float(os.environ[TUNED_RATE_ENV]) == 103.0


@pytest.mark.parametrize("nproc", [1, 2])
def test_a_real_measurement_of_a_tiny_model(nproc):
    q = _q(cores=2, layouts=((nproc, 1),), model=("phalanx_cnn", 8, "batch", "relu"), global_batch=64)
    rate = tune.measure_choice(Choice(nproc, 1, "fp32", True), q, min_seconds=0.05, max_steps=2)
    assert rate > 0


def test_on_a_gpu_the_choice_is_timed_with_the_settings_training_uses(monkeypatch, tmp_path):
    from phalanx import runtime
    from phalanx.train.budget import TUNED_RATE_ENV
    from tests.unit.runtime.test_cuda_path import OneGPU
    monkeypatch.setenv(TUNED_RATE_ENV, "")
    settings = []

    class RecordingGPU(OneGPU):
        def configure_training(self, deterministic: bool, tf32: bool) -> None:
            settings.append((deterministic, tf32))

    def measure(c, q, device=None):
        assert settings == [(False, False)], "measured before cuDNN autotuning / TF32 were set as training sets them"
        assert device.type == "cuda" and q.layouts == ((1, 1),)
        return 100.0 + c.channels_last

    monkeypatch.setitem(runtime.KINDS, "cuda", RecordingGPU)
    monkeypatch.setattr(tune, "measure_choice", measure)
    cfg = Config()
    cfg.tf32 = False
    argv = tune.tune_run(cfg, set(), (32, 32, 3), 10, tmp_path / "tune.json", lambda line: None)
    assert argv == ["--model.channels_last", "true"] and settings == [(False, False)]


def test_a_compiling_run_on_a_gpu_is_timed_compiled_and_cached_apart(monkeypatch):
    from phalanx import runtime
    from tests.unit.runtime.test_cuda_path import OneGPU
    cfg = Config()
    cfg.model.compile, cfg.model.compile_mode = True, "max-autotune"
    cfg.device = "cpu"
    assert tune.question_for(cfg, set(), (28, 28, 1), 10).compile_mode == ""  # CPU: timed eager
    monkeypatch.setitem(runtime.KINDS, "cuda", OneGPU)
    cfg.device = "auto"
    q = tune.question_for(cfg, set(), (32, 32, 3), 10)
    assert q.kind == "cuda" and q.compile_mode == "max-autotune"
    cfg.model.compile = False
    eager = tune.question_for(cfg, set(), (32, 32, 3), 10)
    assert eager.compile_mode == "" and tune.cache_key(eager) != tune.cache_key(q)
    compiled = []
    monkeypatch.setattr("torch.compile", lambda net, mode=None: compiled.append(mode) or net)
    q = _q(cores=2, layouts=((1, 1),), model=("phalanx_cnn", 8, "batch", "relu"), global_batch=16,
           compile_mode="max-autotune")  # the measurement itself, on this CPU
    assert tune.measure_choice(Choice(1, 1, "fp32", True), q, min_seconds=0.01, max_steps=2) > 0
    assert compiled == ["max-autotune"]


def test_one_rank_is_measured_in_the_calling_thread(monkeypatch):
    """A model compiled with mode="reduce-overhead" (CUDA graphs) and run in a thread of its own failed on an
    H100 (torch 2.11: cudagraph trees' per-thread state, an AssertionError), so one rank, every GPU candidate,
    runs in the caller's thread; several ranks still run one thread each."""
    import threading
    real = tune._synthetic_rank
    seen = []

    def recording(*a, **k):
        seen.append(threading.get_ident())
        return real(*a, **k)

    monkeypatch.setattr(tune, "_synthetic_rank", recording)
    for nproc in (1, 2):
        q = _q(cores=2, layouts=((nproc, 1),), model=("phalanx_cnn", 8, "batch", "relu"), global_batch=16)
        assert tune.measure_choice(Choice(nproc, 1, "fp32", True), q, min_seconds=0.01, max_steps=2) > 0
    assert seen[0] == threading.get_ident() and threading.get_ident() not in seen[1:] and len(set(seen[1:])) == 2


def test_with_invariant_training_only_world_sizes_sharing_the_micro_batches_are_timed_each_with_one_thread(
        monkeypatch):
    from phalanx.data.mix import world_error
    monkeypatch.setattr("phalanx.runtime.cpu.usable_cores", lambda: 4)
    monkeypatch.setattr("phalanx.runtime.dist.usable_cores", lambda: 4)
    cfg = Config()
    cfg.device, cfg.global_batch = "cpu", 256
    cfg.parallel.invariant, cfg.parallel.micro_batch = True, 32  # 8 micro-batches: 1, 2 or 4 ranks
    assert tune.question_for(cfg, set(), (28, 28, 1), 10).layouts == ((1, 1), (2, 1), (4, 1))
    cfg.global_batch = 96  # 3 micro-batches: only one rank of these cores shares them equally
    assert tune.question_for(cfg, set(), (28, 28, 1), 10).layouts == ((1, 1),)
    assert "which 2 ranks cannot share equally" in world_error(cfg, 2) and world_error(cfg, 1) is None

"""A tuner that is never stale: interleaved rounds with their spread, no caching on a busy machine, a runner-up
within the noise measured again, every run's first minute checked against the decision's expectation (fake
clocks and fake measurements), and one real short run that finds its decision stale and says so in one line."""
import json
import os

import pytest

from phalanx.tools import tune
from phalanx.tools.tune import Choice, Question
from phalanx.train import rate_check
from phalanx.train.rate_check import RateCheck

QUIET, BUSY = (lambda: (0.1, 4)), (lambda: (5.5, 4))


def _q(**kw):
    base = dict(kind="cpu", cores=2, layouts=((1, 2), (2, 1)), precisions=("fp32",), memory_formats=(True,),
                model=("phalanx_cnn", 8, "batch", "relu"), shape=(28, 28, 1), num_classes=10, global_batch=256)
    base.update(kw)
    return Question(**base)


def layout_rates(rates: dict):
    """A fake measurement: each layout's successive rounds return the next of its listed rates."""
    calls: list[Choice] = []

    def measure(c: Choice) -> float:
        calls.append(c)
        xs = rates[(c.nproc, c.threads)]
        return xs[(sum(1 for d in calls if d == c) - 1) % len(xs)]

    return measure, calls


CLEAR = {(1, 2): [100.0, 101.0, 99.0], (2, 1): [130.0, 131.0, 129.0]}  # 2 x 1 is 30% faster, 2% spread


def test_a_decision_records_its_rounds_spread_and_expected_rate(tmp_path):
    measure, calls = layout_rates(CLEAR)
    best, rec = tune.decide(_q(), tmp_path / "tune.json", measure, load=QUIET)
    assert best == Choice(2, 1, "fp32", True) and len(calls) == 6
    assert calls[:2] == [Choice(1, 2, "fp32", True), Choice(2, 1, "fp32", True)]
    assert calls[2:4] == [Choice(2, 1, "fp32", True), Choice(1, 2, "fp32", True)]  # round 2 in the other order
    entry = json.loads((tmp_path / "tune.json").read_text())[tune.cache_key(_q())]
    assert entry["rates"] == [["2 ranks x 1 thread, fp32, channels-last", 130.0],
                              ["1 rank x 2 threads, fp32, channels-last", 100.0]]
    assert entry["rounds"] == [[130.0, 131.0, 129.0], [100.0, 101.0, 99.0]]
    assert entry["expect_img_s"] == 130.0 and entry["load"] == [0.1, 4] and "recheck" not in entry
    assert "+-1% over 3 rounds" in tune.summary_line(best, rec)
    assert "  1.5%       3     1.00" in tune.table(rec)  # spread (131-129)/130 and the rounds, in the table


@pytest.mark.parametrize("load,rates,why", [
    (BUSY, CLEAR, "load average 5.50 on 4 CPUs"),
    (QUIET, {(1, 2): [100.0, 101.0, 99.0], (2, 1): [130.0, 95.0, 160.0]}, "its measurements spread by 50%"),
])
def test_a_decision_measured_on_a_busy_machine_is_not_cached(tmp_path, load, rates, why):
    cache = tmp_path / "tune.json"
    measure, calls = layout_rates(rates)
    best, rec = tune.decide(_q(), cache, measure, load=load)
    assert rec["busy"] == why and not cache.exists()
    assert f"not cached: the machine was busy ({why}), measured again at the next start" in tune.summary_line(best,
                                                                                                              rec)
    tune.decide(_q(), cache, measure, load=QUIET)  # the next start measures again, and keeps a quiet decision
    assert len(calls) == 12 and cache.exists() == (load is BUSY)  # (the noisy rounds stay noisy here)


def test_a_busy_measurement_leaves_a_good_decision_in_place(tmp_path):
    cache = tmp_path / "tune.json"
    measure, _ = layout_rates(CLEAR)
    tune.decide(_q(), cache, measure, load=QUIET)
    before = cache.read_text()
    tune.decide(_q(), cache, measure, refresh=True, load=BUSY)
    assert cache.read_text() == before


def test_a_runner_up_within_the_noise_is_measured_again_then_taken_as_a_tie(tmp_path):
    cache = tmp_path / "tune.json"
    close = {(1, 2): [100.0, 104.0, 98.0], (2, 1): [101.0, 97.0, 103.0]}  # medians 100 and 101, 6% ranges
    measure, calls = layout_rates(close)
    best, rec = tune.decide(_q(), cache, measure, load=QUIET)
    assert best == Choice(2, 1, "fp32", True) and rec["runner_up"] == "1 rank x 2 threads, fp32, channels-last"
    assert "1 rank x 2 threads, fp32, channels-last was within the noise: measured again at the next start" in \
        tune.summary_line(best, rec)
    for start in range(1, tune.RECHECKS + 1):  # cached, yet measured again at each next start...
        _, rec = tune.decide(_q(), cache, measure, load=QUIET)
        assert len(calls) == 6 * (start + 1) and not rec["cached"]
        assert rec["again"].endswith("was within the noise")
    assert rec["tie"] == "1 rank x 2 threads, fp32, channels-last" and "is as fast within the noise" in \
        tune.summary_line(best, rec)
    _, rec = tune.decide(_q(), cache, measure, load=QUIET)  # ... RECHECKS times: then it is a tie, cached
    assert rec["cached"] and len(calls) == 6 * (tune.RECHECKS + 1)


def test_a_clear_gap_is_not_within_the_noise():
    assert tune.runner_up_within_noise([(Choice(2, 1), [130.0, 131.0, 129.0]), (Choice(1, 2), [100.0] * 3)]) is None
    assert tune.runner_up_within_noise([(Choice(2, 1), [110.0, 130.0, 120.0]),
                                        (Choice(1, 2), [112.0, 114.0, 113.0])]) == Choice(1, 2)


def clocked(times):
    """A clock returning the given instants one after the other."""
    it = iter(times)
    return lambda: next(it)


def test_the_rate_check_times_steps_after_the_warm_up_and_leaves_gaps_out():
    expected = {"img_s": 1000.0, "label": "2 ranks x 1 thread", "key": "k", "at": 1.0}
    # 5 warm-up steps (not timed), then steps 0.1 s apart: 100 images each -> 1,000 img/s ...
    t = [0.0, 5.0, 9.0, 9.5, 9.6, 9.7] + [9.7 + 0.1 * k for k in range(1, 700)]
    check = RateCheck(expected, 100, clocked(t))
    verdicts = [check.step(False) for _ in range(6)]
    check.gap()  # ... an evaluation: the next step's interval is not counted
    verdicts += [check.step(False) for _ in range(640)]
    got = [v for v in verdicts if v is not None]
    assert len(got) == 1 and got[0]["steps"] == 600 and got[0]["seconds"] == pytest.approx(60.0)
    assert got[0]["measured_img_s"] == pytest.approx(1000.0) and not got[0]["stale"]
    assert check.step(False) is None  # once only


@pytest.mark.parametrize("steps,verdict", [(5 + rate_check.MIN_STEPS, True), (4 + rate_check.MIN_STEPS, False)])
def test_a_short_run_is_judged_at_its_last_step_when_it_has_enough_steps(steps, verdict):
    check = RateCheck({"img_s": 1000.0, "label": "x"}, 100, clocked([0.2 * k for k in range(steps)]))
    out = [check.step(k == steps - 1) for k in range(steps)]
    assert (out[-1] is not None) == verdict and all(v is None for v in out[:-1])
    if verdict:  # 500 img/s against 1,000: 50% short
        assert out[-1]["stale"] and out[-1]["short"] == pytest.approx(0.5)
        line = rate_check.verdict_line(out[-1])
        assert "\n" not in line and "1,000 img/s" in line and "50% short" in line and "--tune true" in line


def test_without_an_expectation_nothing_is_checked(monkeypatch):
    monkeypatch.delenv(rate_check.TUNED_ENV, raising=False)
    assert rate_check.expectation() is None
    assert RateCheck(None, 64, clocked([])).step(True) is None  # never reads the clock
    monkeypatch.setenv(rate_check.TUNED_ENV, "{not json")
    assert rate_check.expectation() is None


def _verdict(entry, key, measured, expected):
    short = 1 - measured / expected
    return {"measured_img_s": measured, "expected_img_s": expected, "short": short,
            "stale": short > rate_check.SHORT_BY, "key": key, "at": entry["at"], "steps": 50, "label": "x"}


def test_a_run_short_of_the_expectation_makes_the_next_start_measure_again(tmp_path):
    cache, key = tmp_path / "tune.json", tune.cache_key(_q())
    measure, calls = layout_rates(CLEAR)
    tune.decide(_q(), cache, measure, load=QUIET)
    entry = json.loads(cache.read_text())[key]
    assert not tune.mark_checked(cache, key, dict(_verdict(entry, key, 100.0, 130.0), at=0.5))  # another decision
    assert tune.mark_checked(cache, key, _verdict(entry, key, 100.0, 130.0))  # 23% short
    assert "recheck" in json.loads(cache.read_text())[key]
    best, rec = tune.decide(_q(), cache, measure, load=QUIET)
    assert len(calls) == 12 and not rec["cached"]
    line = tune.summary_line(best, rec)
    assert line.startswith("measured again (a run trained at 100 img/s, 23% short of the 130 expected)")
    # the same choice again: it now expects what the run trained at (the loader, augmentation and EMA included)
    assert rec["expect_img_s"] == pytest.approx(100.0) and "recheck" not in json.loads(cache.read_text())[key]


def test_the_first_run_of_a_decision_that_holds_sets_the_expectation(tmp_path):
    cache, key = tmp_path / "tune.json", tune.cache_key(_q())
    measure, calls = layout_rates(CLEAR)
    tune.decide(_q(), cache, measure, load=QUIET)
    entry = json.loads(cache.read_text())[key]
    assert tune.mark_checked(cache, key, _verdict(entry, key, 120.0, 130.0))  # 8% short: within the 10%
    entry = json.loads(cache.read_text())[key]
    assert entry["expect_img_s"] == 120.0 and "recheck" not in entry
    assert tune.mark_checked(cache, key, _verdict(entry, key, 119.0, 120.0))  # later runs do not move it
    assert json.loads(cache.read_text())[key]["expect_img_s"] == 120.0
    _, rec = tune.decide(_q(), cache, measure, load=QUIET)
    assert rec["cached"] and len(calls) == 6


def test_follow_up_reads_the_runs_last_check(tmp_path):
    cache, key = tmp_path / "tune.json", tune.cache_key(_q())
    tune.decide(_q(), cache, layout_rates(CLEAR)[0], load=QUIET)
    entry = json.loads(cache.read_text())[key]
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"event": "train", "step": 1}) + "\n" + json.dumps(
        dict(_verdict(entry, key, 90.0, 130.0), event="tune_check")) + "\n")
    assert tune.follow_up(cache, run) and "recheck" in json.loads(cache.read_text())[key]
    assert not tune.follow_up(cache, tmp_path / "no-run")


def test_tune_run_tells_the_ranks_what_to_expect_and_refresh_measures_now(monkeypatch, tmp_path):
    from phalanx.config import Config
    from phalanx.train.budget import TUNED_RATE_ENV
    monkeypatch.setenv(TUNED_RATE_ENV, "")
    monkeypatch.setenv(rate_check.TUNED_ENV, "")
    monkeypatch.setattr("phalanx.runtime.cpu.usable_cores", lambda: 2)
    monkeypatch.setattr("phalanx.runtime.cpu.cpu_has_bf16", lambda: False)
    monkeypatch.setattr(tune, "host_load", QUIET)
    calls = []
    monkeypatch.setattr(tune, "measure_choice", lambda c, q, device=None: calls.append(c) or 100.0 + 10 * c.nproc)
    cache = tmp_path / "tune.json"

    def run(refresh=False):
        cfg = Config()  # each time: tune_run applies its choice to the config
        cfg.device = "cpu"
        assert tune.tune_run(cfg, {"model.channels_last"}, (28, 28, 1), 10, cache, lambda line: None,
                             refresh=refresh) == ["--parallel.threads_per_rank", "1"]
        assert cfg.parallel.nproc == "2"

    run()
    told = json.loads(os.environ[rate_check.TUNED_ENV])
    assert told["img_s"] == 120.0 and told["label"] == "2 ranks x 1 thread, fp32, channels-last"
    assert told["key"] in json.loads(cache.read_text()) and rate_check.expectation() == told
    assert float(os.environ[TUNED_RATE_ENV]) == 120.0
    run()
    assert len(calls) == 6  # cached
    run(refresh=True)
    assert len(calls) == 12  # --tune true: now


@pytest.mark.slow  # a real launch: ~15 s alone, over a minute on a loaded 2-core machine
def test_a_real_run_finds_its_decision_stale_and_says_so_in_one_line(tmp_path, small_idx):
    """A cached decision that expects far more than this machine trains at: the run says so in one line, and the
    cache marks it to be measured again at the next start."""
    from phalanx.commands.args import parse
    from phalanx.commands.train import COMMANDS, model_input_shape
    from phalanx.data.sources import open_on_node
    from phalanx.tools.checks import checked_config
    from tests.conftest import run_phalanx
    cache = tmp_path / "cache"
    args = ["--data", str(small_idx), "--nproc", "auto", "--precision", "fp32", "--model.channels_last", "true",
            "--model.width", "8", "--global_batch", "64", "--max_steps", "40", "--progress", "false",
            "--log.tensorboard", "false", "--ckpt.at_epoch_end", "false", "--tta_flip", "false"]
    p = parse("train", COMMANDS["train"].spec, args)
    cfg = checked_config(p.recipe, p.pairs)
    store = open_on_node(cfg.data.path, str(cache), False, 0, cfg.data.size, cfg.data.channels)
    q = tune.question_for(cfg, p.explicit_keys(), model_input_shape(cfg, store.shape), len(store.classes))
    assert q.layouts == ((1, 2), (2, 1))
    key = tune.cache_key(q)
    (cache / "tune.json").write_text(json.dumps({key: {
        "choice": {"nproc": 1, "threads": 2, "precision": "fp32", "channels_last": True}, "at": 12.5,
        "rates": [["1 rank x 2 threads, fp32, channels-last", 5e6]], "expect_img_s": 5e6, "date": "2026-01-01"}}))
    r = run_phalanx(["train", *args, "--out_dir", tmp_path / "runs"], cache, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout + r.stderr
    assert "tuned: 1 rank x 2 threads, fp32, channels-last (measured on 2026-01-01, cached" in out
    lines = [ln for ln in out.splitlines() if "was expected to train at 5,000,000 img/s" in ln]
    assert len(lines) == 1 and "% short over" in lines[0] and "measured again at the next start" in lines[0], out
    entry = json.loads((cache / "tune.json").read_text())[key]
    assert entry["recheck"].startswith("a run trained at") and 0 < entry["observed_img_s"] < 5e6
    # the same run's start-up, by phase, in its summary (train/startup.py)
    (summary,) = (tmp_path / "runs").glob("*/summary.json")
    phases = json.loads(summary.read_text())["startup_s"]
    assert list(phases) == ["imports", "config", "data", "tune", "launch", "run_dir", "rank_data", "model", "resume",
                            "sinks", "first_step", "total"]
    assert phases["total"] >= sum(v for k, v in phases.items() if k != "total") - 0.01 > 0
    assert "start-up: " in out


def test_a_decision_due_again_waits_for_a_quiet_start(tmp_path):
    """Measuring on a busy machine would give a decision that is not cached: a cached one due to be measured again
    is kept while the machine is busy (said in the line), and measured at the first quiet start."""
    cache, key = tmp_path / "tune.json", tune.cache_key(_q())
    measure, calls = layout_rates(CLEAR)
    tune.decide(_q(), cache, measure, load=QUIET)
    entry = json.loads(cache.read_text())[key]
    tune.mark_checked(cache, key, _verdict(entry, key, 90.0, 130.0))
    best, rec = tune.decide(_q(), cache, measure, load=BUSY)
    assert len(calls) == 6 and rec["cached"] and best == Choice(2, 1, "fp32", True)
    assert "to be measured again (a run trained at 90 img/s" in tune.summary_line(best, rec)
    assert "not now: the machine is busy (load average 5.50 on 4 CPUs)" in tune.summary_line(best, rec)
    _, rec = tune.decide(_q(), cache, measure, load=QUIET)
    assert len(calls) == 12 and not rec["cached"]

"""`--budget`: a real run whose step count and LR schedule follow the wall-clock budget."""
import json
import time

import pytest

from tests.conftest import run_phalanx

pytestmark = [pytest.mark.e2e, pytest.mark.slow]  # a 20 s budget is 20 s of the suite


def test_budget_sets_the_steps_and_lays_the_schedule_over_them(cache_dir, small_idx, tmp_path):
    run_dir = tmp_path / "run"
    t0 = time.time()
    r = run_phalanx(["train", "--data", small_idx, "--nproc", "1", "--budget", "20s", "--global_batch", "32",
                     "--model.width", "8", "--progress", "false", "--run_dir", run_dir, "--tune", "false",
                     "--optim.lr", "0.2"], cache_dir)
    assert r.returncode == 0, r.stdout + r.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["budget_s"] == 20.0 and summary["predicted_s"] > 0
    # counted from the process's start (`import torch` included): the wall time when summary.json was written
    written = (run_dir / "summary.json").stat().st_mtime - t0
    assert summary["actual_s"] == pytest.approx(written, abs=0.5), (summary, written)
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [x for x in rows if x["event"] == "train"]
    evals = [x for x in rows if x["event"] == "eval"]
    # many epochs of 18 steps fit in 20 s, and only the last is evaluated
    assert summary["global_step"] > 18 and len(evals) == 1, r.stdout and evals[0]["step"] == summary["global_step"]
    # the one-cycle schedule ends where the training does: the last logged LR is near its final value
    assert train[-1]["step"] == summary["global_step"]
    assert train[-1]["lr"] <= 0.1 * 0.2, train[-1]
    assert max(x["lr"] for x in train) > 0.5 * 0.2

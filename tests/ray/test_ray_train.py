"""`phalanx ray train` on a local Ray cluster (conftest.py) with 2 CPU workers: the ranks are Ray Train workers,
and the run ends with the weights of `phalanx train --nproc 2`, bit for bit, whether it ran through or a worker was
killed mid-run and Ray's FailureConfig restarted the group (which resumed from the run directory)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.conftest import run_phalanx
from tests.dist.conftest import BASE, EXACT, assert_same_weights, trained_once

pytestmark = pytest.mark.ray

RUN_TIMEOUT_S = 540


def train_args(data: Path, run_dir: Path) -> list:
    return ["--data", data, "--run_dir", run_dir, *BASE, *EXACT]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache_dir, small_idx):
    """The same training by `phalanx train --nproc 2` (the elastic agent), once."""
    return trained_once(tmp_path_factory.mktemp("direct"), cache_dir, lambda run_dir, nproc, *extra: [
        "train", "--nproc", nproc, *train_args(small_idx, run_dir), *extra])


def ray_train(address: str, data: Path, run_dir: Path, cache_dir: Path, *ray_args: str, env: dict | None = None):
    return run_phalanx(["ray", "train", "--workers", "2", "--address", address, *ray_args, "--",
                        *train_args(data, run_dir)], cache_dir, timeout=RUN_TIMEOUT_S, env_extra=env)


def test_ray_workers_train_the_weights_of_a_two_rank_phalanx_train(ray_cluster, reference, small_idx, cache_dir,
                                                                   tmp_path):
    run_dir = tmp_path / "ray-run"
    r = ray_train(ray_cluster, small_idx, run_dir, cache_dir)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert "rank 1/2" in (run_dir / "logs" / "rank-1.log").read_text()  # two ranks, each a Ray worker
    assert (run_dir / "ray").is_dir()  # Ray's own files stay in the run directory
    assert_same_weights(reference(2), run_dir)


def test_a_killed_worker_is_recovered_by_ray_with_the_same_final_weights(ray_cluster, reference, small_idx,
                                                                         cache_dir, tmp_path):
    run_dir = tmp_path / "ray-killed"
    # rank 1 SIGKILLs itself at step 15 of 20, on the first attempt only: the checkpoint of step 10 is the last
    r = ray_train(ray_cluster, small_idx, run_dir, cache_dir, "--max_failures", "2",
                  env={"PHALANX_FAULT": "step:1:15:kill"})
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    assert "fault injection: kill at step, rank 1, step 15" in out
    log0 = (run_dir / "logs" / "rank-0.log").read_text()
    assert "restart 1" in log0 and "resumed from" in log0 and "step 10" in log0, log0[-3000:]
    assert_same_weights(reference(2), run_dir)


def test_a_worker_failing_more_often_than_max_failures_fails_the_run_in_one_line(ray_cluster, small_idx, cache_dir,
                                                                                 tmp_path):
    run_dir = tmp_path / "ray-fails"
    # the fault fires on attempt 0 only; --max_failures 0 leaves Ray no restart
    r = ray_train(ray_cluster, small_idx, run_dir, cache_dir, "--max_failures", "0",
                  env={"PHALANX_FAULT": "step:1:3:exit"})
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-3000:]
    line = next(ln for ln in r.stderr.splitlines() if ln.startswith("phalanx: the run on Ray failed"))
    # the killed rank, or its peer that lost it, whichever Ray reports first
    assert re.search(r"rank [01]\b", line) and f"{run_dir}/logs" in line, line
    assert not (run_dir / "model.safetensors").exists()

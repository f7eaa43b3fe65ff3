"""Real jobs through a real SLURM (tests/slurm/conftest.py starts its daemons): each ends with the weights of
the same training run directly, whether it ran through, as tasks that are ranks, or was stopped by SLURM's
USR1 (checkpoint, requeue, resume) or requeued from outside."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.dist.conftest import BASE, EXACT, assert_same_weights, trained_once
from tests.slurm.conftest import job_state, restart_count, wait_for

pytestmark = pytest.mark.slurm

JOB_TIMEOUT_S = 600.0
LONGER = ["--epochs", "6", "--ckpt.every_steps", "4"]  # 60 steps: long enough to be stopped mid-run


def train_args(data: Path, *extra: str) -> list[str]:
    return ["--data", str(data), *BASE, *EXACT, *extra]


@pytest.fixture(scope="module")
def references(tmp_path_factory, cache_dir, small_idx):
    """The same trainings run directly (no SLURM), once each."""
    return trained_once(tmp_path_factory.mktemp("direct"), cache_dir, lambda run_dir, nproc, *extra: [
        "train", "--run_dir", run_dir, "--nproc", nproc, *train_args(small_idx, *extra)])


def job_env(cluster: dict, cache_dir: Path) -> dict:
    env = dict(cluster["env"], PHALANX_CACHE=str(cache_dir), PYTHONUNBUFFERED="1")
    env.pop("PHALANX_FAULT", None)
    return env


def submit(cluster, cache_dir, run_dir: Path, nproc: int, args: list[str], *slurm_args: str) -> str:
    r = subprocess.run([sys.executable, "-m", "phalanx", "slurm", "submit", "--run_dir", str(run_dir), "--nproc",
                        str(nproc), *slurm_args, "--", *args], capture_output=True, text=True, timeout=120,
                       env=job_env(cluster, cache_dir))
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout.split()[2].rstrip(";")


def start_now(env: dict, job: str) -> None:
    """A requeued job waits for a begin time (120 s by default): once it is pending again, start it now."""
    wait_for(lambda: job_state(env, job) == "PENDING", 120, f"job {job} to be pending again")
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], env=env, check=True, timeout=30)


def wait_done(cluster, job: str, run_dir: Path) -> str:
    env = cluster["env"]
    state = wait_for(lambda: (s := job_state(env, job)) in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT",
                                                            "NODE_FAIL", "OUT_OF_MEMORY") and s,
                     JOB_TIMEOUT_S, f"job {job} to end")
    return state


def slurm_output(run_dir: Path, job: str) -> str:
    f = run_dir / "logs" / f"slurm-{job}.out"
    return f.read_text() if f.exists() else "(no SLURM output)"


def wait_for_steps(run_dir: Path, step: int, timeout: float = JOB_TIMEOUT_S) -> None:
    def reached() -> bool:
        m = run_dir / "metrics.jsonl"
        return m.exists() and any(f'"step": {s},' in m.read_text() for s in range(step, step + 40))
    wait_for(reached, timeout, f"training in {run_dir} to reach step {step}")


def test_a_job_of_two_tasks_runs_each_task_as_one_rank(slurm_cluster, cache_dir, small_idx, references, tmp_path):
    run_dir = tmp_path / "tasks"
    out = tmp_path / "job-%j.out"
    script = tmp_path / "two-tasks.sh"
    train = [sys.executable, "-m", "phalanx", "train", "--run_dir", str(run_dir), *train_args(small_idx)]
    script.write_text("#!/bin/bash\n#SBATCH --nodes=1 --ntasks=2 --cpus-per-task=1\n"
                      f"#SBATCH --output={out}\nsrun " + " ".join(map(str, train)) + "\n")
    r = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True, timeout=60,
                       env=job_env(slurm_cluster, cache_dir))
    assert r.returncode == 0, r.stderr
    job = r.stdout.strip().split(";")[0]
    state = wait_done(slurm_cluster, job, run_dir)
    text = Path(str(out).replace("%j", job)).read_text()
    assert state == "COMPLETED", text
    log0 = (run_dir / "logs" / "rank-0.log").read_text()
    assert "world 2" in log0 or "2 rank" in log0, log0[:2000]
    assert_same_weights(references(2), run_dir)


def test_usr1_before_the_time_limit_checkpoints_requeues_and_resumes_to_the_same_weights(
        slurm_cluster, cache_dir, small_idx, references, tmp_path):
    env = slurm_cluster["env"]
    run_dir = tmp_path / "usr1"
    job = submit(slurm_cluster, cache_dir, run_dir, 2, train_args(small_idx, *LONGER))
    wait_for_steps(run_dir, 6)
    t_signal = time.monotonic()
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True, env=env, timeout=30)
    wait_for(lambda: restart_count(env, job) >= 1, 180, f"job {job} to be requeued")
    requeued_s = time.monotonic() - t_signal
    # A requeued job waits for a begin time (120 s by default): start it now.
    start_now(env, job)
    state = wait_done(slurm_cluster, job, run_dir)
    text = slurm_output(run_dir, job)
    assert state == "COMPLETED" and restart_count(env, job) == 1, text
    assert f"job {job} requeued" in text and "resumed from" in text and "Traceback" not in text, text
    assert_same_weights(references(2, *LONGER), run_dir)
    print(f"USR1 to requeued: {requeued_s:.1f} s")


def test_a_job_requeued_from_outside_resumes_to_the_same_weights(slurm_cluster, cache_dir, small_idx, references,
                                                                  tmp_path):
    env = slurm_cluster["env"]
    run_dir = tmp_path / "requeue"
    job = submit(slurm_cluster, cache_dir, run_dir, 1, train_args(small_idx, *LONGER))
    wait_for_steps(run_dir, 9)  # a checkpoint at step 8 exists
    subprocess.run(["scontrol", "requeue", job], check=True, env=env, timeout=30)
    wait_for(lambda: restart_count(env, job) >= 1, 120, f"job {job} to be requeued")
    start_now(env, job)
    state = wait_done(slurm_cluster, job, run_dir)
    text = slurm_output(run_dir, job)
    assert state == "COMPLETED", text
    assert "resumed from" in text, text
    assert_same_weights(references(1, *LONGER), run_dir)
    assert os.path.exists(run_dir / "model.safetensors")

"""Real jobs through a real SLURM (tests/slurm/conftest.py starts its daemons): each ends with the weights of
the same training run directly, whether it ran through, as tasks that are ranks, or was stopped by SLURM's
USR1 (checkpoint, requeue, resume) or requeued from outside."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
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


def submit(cluster, cache_dir, run_dir: Path, nproc: int, args: list[str], *slurm_args: str,
           extra_env: dict | None = None) -> str:
    """Submit through `phalanx slurm submit`; sbatch hands the job this environment (with `extra_env`)."""
    r = subprocess.run([sys.executable, "-m", "phalanx", "slurm", "submit", "--run_dir", str(run_dir), "--nproc",
                        str(nproc), *slurm_args, "--", *args], capture_output=True, text=True, timeout=120,
                       env=dict(job_env(cluster, cache_dir), **(extra_env or {})))
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout.split()[2].rstrip(";")


def start_now(env: dict, job: str) -> None:
    """A requeued job waits for a begin time (120 s by default): once it is pending again, start it now."""
    wait_for(lambda: job_state(env, job) == "PENDING", 120, f"job {job} to be pending again")
    # Started again before slurmd has finished with the attempt that was requeued (its node still COMPLETING),
    # the job is killed at once: "Killing non-startable batch JobId=J: Job credential revoked" (a run here).
    wait_for(lambda: "comp" not in node_states(env), 60, "the node to finish with the requeued attempt")
    time.sleep(1.0)
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], env=env, check=True, timeout=30)


def node_states(env: dict) -> str:
    return subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, env=env, timeout=30).stdout


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


LIMITED = ["--epochs", "50"]
"""500 steps: ~35 s of 2 ranks on 2 idle cores (AMD EPYC), ~70 s while the reference trains beside it."""
PACE = {"PHALANX_FAULT_STEP_SLEEP": "0.15"}
"""And 0.15 s after each step (train/faults.py; the maths is unchanged): at least 75 s in all on any machine,
longer than SLURM lets the first attempt run (below). Without it, an idle CI machine finished the run before the
warning came."""
MOST_ATTEMPTS = 12
"""Each attempt spends ~10 s starting on an idle machine (of its ~60 s); on a machine shared with much other work,
start-up alone took 50 s of them, and the run needs more attempts."""


def slurmctld_times(cluster: dict, job: str, pattern: str) -> list[float]:
    """Wall-clock times of slurmctld's log lines about `job` matching `pattern` (its [YYYY-MM-DDTHH:MM:SS.mmm])."""
    import datetime
    import re
    log = (cluster["dir"] / "log" / "slurmctld.log").read_text()
    out = []
    for line in log.splitlines():
        m = re.match(r"\[(\S+)\] (.*)", line)
        if m and re.search(rf"JobId={job}\b", line) and re.search(pattern, m.group(2)):
            out.append(datetime.datetime.fromisoformat(m.group(1)).timestamp())
    return out


def test_a_job_that_reaches_its_time_limit_is_warned_by_slurm_requeued_and_ends_with_the_same_weights(
        slurm_cluster, cache_dir, small_idx, references, tmp_path):
    """`--time 1` (SLURM's least) and `--signal=B:USR1@1`: slurmctld checks time limits every 30 s and sends the
    warning at the first check that is less than 30 s before the signal's time (as its manual says: up to a
    minute early), so USR1 reaches an attempt 29-59 s after it starts, and the limit's kill would come at least
    one check (30 s) later. The run
    checkpoints, requeues itself and the next attempt resumes, as often as the run needs; nothing outside SLURM
    signals the job. The uninterrupted reference trains meanwhile, on the same cores: the job's first attempt runs
    at about half speed, so the run is longer than that attempt without the lane paying for it twice."""
    env = slurm_cluster["env"]
    run_dir = tmp_path / "limit"
    job = submit(slurm_cluster, cache_dir, run_dir, 2, train_args(small_idx, *LIMITED), "--time", "1",
                 "--signal_s", "1", extra_env=PACE)
    reference = threading.Thread(target=references, args=(2, *LIMITED), daemon=True)
    reference.start()
    seen, started_at = 0, []
    while True:
        state = wait_for(lambda: (s := job_state(env, job)) in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT",
                                                                 "NODE_FAIL") and s
                         or (restart_count(env, job) > seen and "requeued"), JOB_TIMEOUT_S,
                         f"job {job} to end or be requeued (attempt {seen + 1})", every=0.2)
        if state != "requeued":
            break
        seen += 1
        assert seen < MOST_ATTEMPTS, f"{seen} attempts and not done: {slurm_output(run_dir, job)[-3000:]}"
        start_now(env, job)
        started_at.append(time.time())
    text = slurm_output(run_dir, job)
    assert state == "COMPLETED", text
    assert seen >= 1, f"the run ended before SLURM's warning (make LIMITED longer): {text}"
    assert text.count(f"job {job} requeued") == seen, text
    assert "DUE TO TIME LIMIT" not in text and "Traceback" not in text, text  # warned, never killed at the limit
    assert "resumed from" in text, text
    reference.join(JOB_TIMEOUT_S)
    assert_same_weights(references(2, *LIMITED), run_dir)
    # The figures of docs/clusters.md, printed (`pytest -s`): from SLURM's warning to the job's end (both as
    # slurmctld logs them), and from `StartTime=now` to the first step the resumed attempt logged.
    warned = slurmctld_times(slurm_cluster, job, r"warning signal")
    requeued = slurmctld_times(slurm_cluster, job, r"^Requeuing")
    steps = [json.loads(line)["unix_time"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
             if '"event": "train"' in line]
    # Every requeue follows a warning; the last attempt may be warned too, as it ends (it finishes, no requeue).
    assert len(requeued) == seen and seen <= len(warned) <= seen + 1, (warned, requeued)
    for k in range(seen):
        sent = max(t for t in warned if t < requeued[k])
        first = next(t for t in steps if t > started_at[k])
        print(f"attempt {k + 1}: SLURM's warning to the job's end {requeued[k] - sent:.1f} s; StartTime=now "
              f"to the first step after it {first - started_at[k]:.1f} s")

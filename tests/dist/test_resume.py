"""Checkpoints under real failures: preemption, SIGKILL under the elastic agent, kills mid-write, world-size changes."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import run_phalanx

pytestmark = pytest.mark.dist

from tests.dist.conftest import BASE, EXACT, assert_same_weights, cmd  # noqa: F401  (shared with other files)


@pytest.fixture(scope="module")
def reference(reference_runs):
    """Uninterrupted runs, trained on first use: 1 rank and 2 ranks (BatchNorm), 1 rank with GroupNorm."""
    return {"1": lambda: reference_runs(1), "2": lambda: reference_runs(2),
            "1g": lambda: reference_runs(1, "--model.norm", "group", "--model.act", "gelu")}


def test_stop_mid_epoch_and_resume_is_bit_identical(reference, cache_dir, small_idx, tmp_path):
    run_dir = tmp_path / "run"
    r = run_phalanx(cmd(small_idx, run_dir, 1), cache_dir, env_extra={"PHALANX_FAULT": "step:0:7:term"})
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"resume with `phalanx train --resume {run_dir}`" in r.stdout
    assert not (run_dir / "model.safetensors").exists()
    state = json.loads((run_dir / "checkpoints" / "step-00000007" / "state.json").read_text())
    assert state["position"] == {"epoch": 0, "step": 7, "global_step": 7}
    # the same command again resumes by itself
    r = run_phalanx(cmd(small_idx, run_dir, 1), cache_dir)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "resumed from" in r.stdout and "step 7" in r.stdout
    assert_same_weights(reference["1"](), run_dir)


def test_starting_a_finished_run_again_trains_nothing(reference, cache_dir, small_idx, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(reference["1"](), run_dir)
    before_metrics = (run_dir / "metrics.jsonl").read_text()
    weights = (run_dir / "model.safetensors").read_bytes()
    summary = json.loads((run_dir / "summary.json").read_text())
    r = run_phalanx(cmd(small_idx, run_dir, 1), cache_dir)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "nothing left to train" in r.stdout and "step-00000020" in r.stdout, r.stdout
    new_rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text()[len(before_metrics):].splitlines()]
    assert not [x for x in new_rows if x["event"] in ("train", "eval")], new_rows
    assert (run_dir / "model.safetensors").read_bytes() == weights
    again = json.loads((run_dir / "summary.json").read_text())
    assert again["acc"] == summary["acc"] and again["global_step"] == summary["global_step"] == 20


def test_sigkill_of_a_rank_under_elastic_restarts_matches_uninterrupted(reference, cache_dir, small_idx, tmp_path):
    run_dir = tmp_path / "run"
    r = run_phalanx(cmd(small_idx, run_dir, 2, "--max-restarts", "3", "--ckpt.every_steps", "3",
                        "--parallel.timeout_s", "20", "--parallel.init_timeout_s", "60"), cache_dir,
                    env_extra={"PHALANX_FAULT": "step:1:8:kill"})
    assert r.returncode == 0, r.stdout + r.stderr
    log0 = (run_dir / "logs" / "rank-0.log").read_text()
    assert "restart 1\n" in log0, r.stdout  # the agent restarted the group once, and that attempt ran
    assert "resumed from" in log0 and "step-00000006" in log0
    assert_same_weights(reference["2"](), run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    ref = json.loads((reference["2"]() / "summary.json").read_text())
    # The ranks hold one model (norm statistics averaged each step), so the restarted group evaluates
    # exactly what the uninterrupted one did: same count, same loss to the last bit.
    assert summary["correct"] == ref["correct"]
    assert summary["loss"] == ref["loss"]


@pytest.mark.slow
def test_a_rank_killed_in_the_final_evaluation_is_evaluated_by_the_restarted_group(reference_runs, cache_dir,
                                                                                   small_idx, tmp_path):
    # The last step (15, mid-epoch) gets a periodic checkpoint before its evaluation: the restarted group
    # resumes at the end of the run, has nothing left to train, and must still evaluate those weights.
    extra = ("--max_steps", "15", "--ckpt.every_steps", "5")
    run_dir = tmp_path / "run"
    r = run_phalanx(cmd(small_idx, run_dir, 2, *extra, "--max-restarts", "1", "--parallel.timeout_s", "20"),
                    cache_dir, env_extra={"PHALANX_FAULT": "eval:1:15:kill"})
    assert r.returncode == 0, r.stdout + r.stderr
    assert "fault injection: kill at eval" in r.stdout + r.stderr
    assert "nothing left to train" in r.stdout and "have no evaluation yet" in r.stdout, r.stdout
    assert "final test accuracy nan%" not in r.stdout
    summary = json.loads((run_dir / "summary.json").read_text())
    ref = json.loads((reference_runs(2, *extra) / "summary.json").read_text())
    assert summary["step"] == summary["global_step"] == 15
    assert summary["correct"] == ref["correct"] and summary["loss"] == ref["loss"]


@pytest.mark.slow
def test_checkpoint_of_2_ranks_resumes_on_1_and_3_ranks(reference, cache_dir, small_idx, tmp_path):
    src = tmp_path / "two"
    r = run_phalanx(cmd(small_idx, src, 2, "--model.norm", "group", "--model.act", "gelu"), cache_dir,
                    env_extra={"PHALANX_FAULT": "step:0:7:term"})
    assert r.returncode == 0, r.stdout + r.stderr
    assert (src / "checkpoints" / "step-00000007").is_dir()
    for n in (1, 3):
        dst = tmp_path / f"to{n}"
        shutil.copytree(src, dst)
        r = run_phalanx(cmd(small_idx, dst, n, "--model.norm", "group", "--model.act", "gelu"), cache_dir)
        assert r.returncode == 0, r.stdout + r.stderr
        assert f"written by 2 ranks, now {n}" in (dst / "logs" / "rank-0.log").read_text()
        # Same global batch, same data order, same augmentation: the maths of the 1-rank run.
        assert_same_weights(reference["1g"](), dst, exact=False)


def test_kill_during_a_checkpoint_write_leaves_the_previous_one(reference, cache_dir, small_idx, tmp_path):
    run_dir = tmp_path / "run"
    r = run_phalanx(cmd(small_idx, run_dir, 1, "--ckpt.every_steps", "3"), cache_dir,
                    env_extra={"PHALANX_FAULT": "ckpt_write:0:6:kill"})
    assert r.returncode == -signal.SIGKILL
    root = run_dir / "checkpoints"
    assert list(root.glob(".step-00000006.tmp-*")), "the killed write left its partial directory"
    assert not (root / "step-00000006").exists()
    from phalanx.train.checkpoint import find_latest
    assert find_latest(run_dir) == root / "step-00000003"
    r = run_phalanx(cmd(small_idx, run_dir, 1, "--ckpt.every_steps", "3"), cache_dir)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "step-00000003" in r.stdout
    assert not list(root.glob(".step-*.tmp-*")), "stale partial writes are cleaned up"
    assert_same_weights(reference["1"](), run_dir)


def _wait_for_step(run_dir: Path, proc, timeout=120):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        m = run_dir / "metrics.jsonl"
        if m.exists() and '"event": "train"' in m.read_text():
            return
        if proc.poll() is not None:
            raise AssertionError(proc.communicate()[0])
        time.sleep(0.2)
    raise AssertionError("training did not start")


@pytest.mark.parametrize("launcher,sig", [("single", signal.SIGTERM),
                                          pytest.param("single", signal.SIGUSR1, marks=pytest.mark.slow),
                                          # phalanx's launcher forks its ranks (torch's worker wrapper then
                                          # waits for an agent that is shutting down); torchrun spawns them
                                          ("phalanx", signal.SIGTERM),
                                          pytest.param("torchrun", signal.SIGTERM, marks=pytest.mark.slow)])
def test_preemption_signal_checkpoints_and_exits_cleanly(cache_dir, small_idx, tmp_path, launcher, sig):
    run_dir = tmp_path / "run"
    args = cmd(small_idx, run_dir, 1 if launcher == "single" else 2, "--epochs", "40")
    if launcher == "torchrun":  # torchrun's own parser claims --nproc: workers take the rest as given
        i = args.index("--nproc")
        args = args[:i] + args[i + 2:]
        argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                "-m", "phalanx", *map(str, args)]
    else:
        argv = [sys.executable, "-m", "phalanx", *map(str, args)]
    env = dict(os.environ, PHALANX_CACHE=str(cache_dir), PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    _wait_for_step(run_dir, p)
    p.send_signal(sig)
    out = p.communicate(timeout=120)[0]
    exited = time.time()
    if launcher != "torchrun":  # torchrun itself reports the signal as an error; its ranks exit 0
        assert p.returncode == 0, out
    from phalanx.train.checkpoint import MARKER, find_latest, load
    found = find_latest(run_dir)
    assert found is not None, out
    assert load(found)["state"]["reason"].startswith("preempted")
    # Every rank (and the launcher) is gone within seconds of the checkpoint, well inside SLURM's 30 s
    # grace; the elastic agent's SIGKILL (30 s after its SIGTERM) would be a failure here.
    after_checkpoint = exited - (found / MARKER).stat().st_mtime
    assert after_checkpoint < 10, f"exited {after_checkpoint:.1f} s after the checkpoint\n{out}"
    assert "forcefully exiting" not in out, out
    assert f"--resume {run_dir}" in out
    logs = [(run_dir / "logs" / f"rank-{k}.log").read_text() for k in range(1 if launcher == "single" else 2)]
    assert all("Traceback" not in log for log in logs)


def test_resume_from_a_tampered_checkpoint_is_refused(reference, cache_dir, small_idx, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(reference["1"](), run_dir)
    for c in (run_dir / "checkpoints").glob("step-*"):
        f = c / "optim.safetensors"
        b = bytearray(f.read_bytes())
        b[-5] ^= 0x10
        f.write_bytes(bytes(b))
    r = run_phalanx(["train", "--resume", run_dir, "--data", small_idx, *BASE, *EXACT], cache_dir)
    assert r.returncode == 1
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and "optim.safetensors: checksum mismatch" in err[0], r.stderr


def test_resume_with_another_model_is_refused(reference, cache_dir, small_idx, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(reference["1"](), run_dir)
    r = run_phalanx(["train", "--resume", run_dir, "--data", small_idx, *BASE, *EXACT, "--model.width", "24"],
                    cache_dir)
    assert r.returncode == 1
    err = r.stderr.strip().splitlines()
    # the run's config.toml says which model wrote the checkpoint: refused before the model is built
    assert len(err) == 1 and "written by a run of --model.width 16, this run's 24" in err[0], r.stderr

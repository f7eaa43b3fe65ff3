"""In-memory snapshots under real failures: a rank SIGKILLed between two disk checkpoints, the group restarted by
the elastic agent, resumed from the snapshot in shared memory, and trained to the same weights bit for bit."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import run_phalanx
from tests.dist.conftest import assert_same_weights, cmd

pytestmark = pytest.mark.dist

FSDP = ("--parallel.strategy", "fsdp")
# 10 steps per epoch: disk checkpoints at steps 10 and 20 (epoch ends); snapshots every 3 steps (3, 6, 9, 12,
# 15, 18); rank 1 killed at step 14, after the snapshot of step 12 and long after the checkpoint of step 10.
RESTART = ("--max-restarts", "2", "--parallel.timeout_s", "20", "--parallel.init_timeout_s", "60")


def snapshot_files(shm: Path) -> list[Path]:
    return sorted(shm.glob("phalanx-snap-*"))


def assert_resumed_from_snapshot(run_dir: Path, out: str, where: str = "this node's memory") -> None:
    log0 = (run_dir / "logs" / "rank-0.log").read_text()
    # The agents restarted the group once (the agent of a node whose rank did not fail may restart its ranks
    # without counting a restart: TORCHELASTIC_RESTART_COUNT stays 0 there).
    assert log0.count("rank 0/2 pid") == 2, out
    assert "resumed from the in-memory snapshot of step 12" in log0, log0
    assert "the newest checkpoint on disk is of step 10" in log0, log0
    log1 = (run_dir / "logs" / "rank-1.log").read_text()
    assert f"resumed from the in-memory snapshot of step 12 ({where}" in log1, log1
    assert not list((run_dir / "checkpoints").glob("*snap*")), "snapshots are never written as checkpoints"
    assert (run_dir / "checkpoints" / "step-00000020").is_dir()


def test_ddp_rank_killed_between_checkpoints_resumes_from_the_snapshot_bit_identical(reference_runs, cache_dir,
                                                                                      small_idx, tmp_path):
    shm = tmp_path / "shm"
    shm.mkdir()
    run_dir = tmp_path / "run"
    r = run_phalanx(cmd(small_idx, run_dir, 2, *RESTART, "--ckpt.snapshot_every", "3", "--ckpt.snapshot_dir", shm),
                    cache_dir, env_extra={"PHALANX_FAULT": "step:1:14:kill"})
    assert r.returncode == 0, r.stdout + r.stderr
    assert "fault injection: kill at step, rank 1, step 14" in r.stdout + r.stderr
    assert_resumed_from_snapshot(run_dir, r.stdout + r.stderr)
    # The uninterrupted run (no snapshots at all) and this one hold the same weights, bit for bit, and report
    # the same evaluation.
    assert_same_weights(reference_runs(2), run_dir, exact=True)
    summary = json.loads((run_dir / "summary.json").read_text())
    ref = json.loads((reference_runs(2) / "summary.json").read_text())
    assert summary["correct"] == ref["correct"] and summary["loss"] == ref["loss"]
    assert snapshot_files(shm) == [], "the run ended: its snapshots are removed"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # two elastic agents, a restart and the FSDP reference run: over make test's 30 s per test
def test_fsdp_on_two_nodes_resumes_a_lost_nodes_shards_from_its_peer_bit_identical(reference_runs, cache_dir,
                                                                                     small_idx, tmp_path):
    """Two elastic agents (`--nnodes 2`, one rank each) on loopback, each node with its own shared-memory folder
    as separate machines would have. Rank 1 is killed and its node's memory lost with it (the fault removes
    node 1's folder first): its shards come back from the copy node 0 keeps, over the network."""
    port = _free_port()
    run_dir = tmp_path / "run"
    shms = [tmp_path / "shm0", tmp_path / "shm1"]
    for d in shms:
        d.mkdir()
    env = dict(os.environ, PHALANX_CACHE=str(cache_dir), PYTHONUNBUFFERED="1", PHALANX_SLURM="0",
               PHALANX_FAULT="step:1:14:lose")
    procs = []
    for k in (0, 1):
        argv = [sys.executable, "-m", "phalanx", *map(str, cmd(small_idx, run_dir, 1, *FSDP, *RESTART)),
                "--nnodes", "2", "--node-rank", str(k), "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv_id",
                "snap2n", "--ckpt.snapshot_every", "3", "--ckpt.snapshot_dir", str(shms[k])]
        procs.append(subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                      env=dict(env, PHALANX_FAULT_LOST_DIR=str(shms[k]))))
    try:
        outs = [p.communicate(timeout=400)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)
    assert all(p.returncode == 0 for p in procs), "\n---\n".join(outs)
    assert_resumed_from_snapshot(run_dir, "\n---\n".join(outs), where="rank 0's node")
    # The uninterrupted FSDP run on 2 ranks (one node, no snapshots) holds the same weights, bit for bit.
    assert_same_weights(reference_runs(2, *FSDP), run_dir, exact=True)
    assert snapshot_files(shms[0]) == [] and snapshot_files(shms[1]) == []

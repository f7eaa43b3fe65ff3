"""The launcher's arguments for the elastic agent, and how many ranks `--nproc` means."""
import json
import subprocess
import sys

from phalanx.config import ParallelConfig
from phalanx.runtime.launch import failure_line, launcher_argv, resolve_nproc, start_method


def test_one_node_is_standalone():
    argv = launcher_argv(ParallelConfig(max_restarts=2), 3)
    assert argv[:2] == ["--nproc-per-node", "3"] and "--standalone" in argv
    assert argv[argv.index("--max-restarts") + 1] == "2"
    assert argv[-2:] == ["-m", "phalanx.commands.rank"] and "--rdzv-backend" not in argv


def test_several_nodes_meet_at_a_c10d_rendezvous():
    argv = launcher_argv(ParallelConfig(nnodes=2, rdzv_endpoint="node0:29400", rdzv_id="job7", node_rank=1), 8)
    assert "--standalone" not in argv
    pairs = dict(zip(argv[::2], argv[1::2]))
    assert pairs["--nnodes"] == "2" and pairs["--rdzv-backend"] == "c10d"
    assert pairs["--rdzv-endpoint"] == "node0:29400" and pairs["--rdzv-id"] == "job7" and pairs["--node-rank"] == "1"


def test_nproc_as_asked_or_chosen_by_the_accelerator():
    assert resolve_nproc(ParallelConfig(nproc="3"), "cpu") == (3, "as asked")
    n, why = resolve_nproc(ParallelConfig(nproc="auto"), "cpu", global_batch=64)
    assert 1 <= n <= 2 and "core" in why  # >= 32 images per rank


def test_auto_on_cpu_takes_the_most_ranks_that_keep_mixup_pairs_whole(monkeypatch):
    from phalanx.data.mix import mix_layout_error
    monkeypatch.setattr("phalanx.runtime.cpu.usable_cores", lambda: 6)
    pcfg = ParallelConfig(nproc="auto")
    assert resolve_nproc(pcfg, "cpu", global_batch=256)[0] == 6  # 43/43/43/43/42/42 images: fine without mixup
    n, why = resolve_nproc(pcfg, "cpu", 256, lambda world: mix_layout_error(256, 1, world) is None)
    assert n == 4 and "mixup" in why  # 6 and 5 ranks would cut pairs in two; 4 ranks get 64 images each
    assert resolve_nproc(ParallelConfig(nproc="6"), "cpu", 256, lambda world: False) == (6, "as asked")


def test_start_method_is_the_accelerators_unless_asked():
    assert start_method(ParallelConfig(), "cpu") == "fork"
    assert start_method(ParallelConfig(start_method="spawn"), "cpu") == "spawn"


def test_the_failure_line_is_a_ranks_own_diagnosis_or_names_the_first_rank_that_failed(tmp_path):
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure
    diagnosis = "phalanx: rank 1 stalled (stopped, hung or starved): rank 0 timed out waiting for it"
    error_file = tmp_path / "error.json"  # what a rank that waited on a stalled peer leaves for the agent
    error_file.write_text(json.dumps({"message": diagnosis, "timestamp": 1}))
    e = ChildFailedError("train", {0: ProcessFailure(local_rank=0, pid=11, exitcode=1, error_file=str(error_file))})
    assert failure_line(e, "RUN") == diagnosis
    assert diagnosis in str(e)  # the agent's own table shows it too
    e = ChildFailedError("train", {1: ProcessFailure(local_rank=1, pid=12, exitcode=-9, error_file="")})
    assert failure_line(e, "RUN") == "phalanx: rank 1 was killed by SIGKILL; its log: RUN/logs/rank-1.log"
    e = ChildFailedError("train", {1: ProcessFailure(local_rank=1, pid=12, exitcode=3, error_file="")})
    assert failure_line(e) == "phalanx: rank 1 exited with code 3; its log: RUN_DIR/logs/rank-1.log"


def test_a_finished_forked_rank_leaves_by_itself_when_the_agent_never_releases_it():
    # torch's worker wrapper waits for the agent's event after the entrypoint returns; an agent that is
    # shutting down (a preemption) never sets it, and would SIGKILL the rank 30 s later.
    code = ("import threading; from phalanx.runtime.launch import leave_after_return; "
            "leave_after_return(0.2); threading.Event().wait()")
    r = subprocess.run([sys.executable, "-c", code], timeout=60)
    assert r.returncode == 0

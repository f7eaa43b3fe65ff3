"""The launcher's arguments for the elastic agent, and how many ranks `--nproc` means."""
import json
import os
import subprocess
import sys

import pytest

from phalanx.config import ParallelConfig
from phalanx.runtime.launch import (
    LAUNCHER_ENV,
    failure_report,
    launcher_argv,
    resolve_nproc,
    start_method,
    tell_from_rank,
)


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


def _failure(tmp_path, rank, exitcode, message=None, timestamp=1):
    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure
    error_file = ""
    if message is not None:  # what a rank leaves for the agent (runtime/launch.tell_from_rank, or torch's `record`)
        error_file = tmp_path / f"error-{rank}.json"
        error_file.write_text(json.dumps({"message": message, "timestamp": timestamp}))
    return ProcessFailure(local_rank=rank, pid=10 + rank, exitcode=exitcode, error_file=str(error_file))


def test_the_failure_line_is_a_ranks_own_diagnosis_or_names_the_first_rank_that_failed(tmp_path):
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    diagnosis = "phalanx: rank 1 stalled (stopped, hung or starved): rank 0 timed out waiting for it"
    e = ChildFailedError("train", {0: _failure(tmp_path, 0, 1, diagnosis)})
    assert failure_report(e, "RUN") == (diagnosis, 1)
    e = ChildFailedError("train", {1: _failure(tmp_path, 1, -9)})
    assert failure_report(e, tmp_path) == ("phalanx: rank 1 was killed by SIGKILL", 128 + 9)
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "rank-1.log").write_text("...")
    e = ChildFailedError("train", {1: _failure(tmp_path, 1, 3)})
    assert failure_report(e, tmp_path) == (f"phalanx: rank 1 exited with code 3; its log: {tmp_path}/logs/rank-1.log",
                                           3)


def test_a_rank_log_is_named_only_where_it_exists_and_was_written_by_this_run(tmp_path):
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    e = ChildFailedError("train", {1: _failure(tmp_path, 1, 3)})
    assert failure_report(e) == ("phalanx: rank 1 exited with code 3", 3)  # no run directory: no made-up path
    assert failure_report(e, tmp_path) == ("phalanx: rank 1 exited with code 3", 3)  # no such log
    log = tmp_path / "logs" / "rank-1.log"
    log.parent.mkdir()
    log.write_text("a copied run folder's log")
    os.utime(log, (1e9, 1e9))
    assert failure_report(e, tmp_path, since=2e9)[0] == "phalanx: rank 1 exited with code 3"
    assert failure_report(e, tmp_path, since=0)[0].endswith(f"its log: {log}")


def test_a_ranks_error_is_its_one_line_and_exit_code_the_first_by_time_then_rank(tmp_path):
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    mistake = "phalanx: error: precision=fp16: not supported with --parallel.strategy fsdp"
    # Every rank refused the same way (a spawned group): the lowest rank's line, with its exit code, not 1.
    e = ChildFailedError("train", {1: _failure(tmp_path, 1, 2, mistake), 0: _failure(tmp_path, 0, 2, mistake)})
    assert failure_report(e, tmp_path) == (mistake, 2)
    # A rank's line beats an exit without one (rank 0 here: a peer that lost its connection to the failing rank),
    # and the earlier of two lines beats the lower rank.
    e = ChildFailedError("train", {0: _failure(tmp_path, 0, 1),
                                   1: _failure(tmp_path, 1, 1, "phalanx: error: checkpoint refused", timestamp=5),
                                   2: _failure(tmp_path, 2, 2, "phalanx: error: later", timestamp=9)})
    assert failure_report(e, tmp_path) == ("phalanx: error: checkpoint refused", 1)
    # An exception that torch's `record` left: its type and message, in one line.
    crash = {"message": "RuntimeError: boom\nsecond line", "extraInfo": {"py_callstack": "Traceback ...",
                                                                          "timestamp": "3"}}
    e = ChildFailedError("train", {1: _failure(tmp_path, 1, 1, crash)})
    assert failure_report(e, tmp_path) == ("phalanx: rank 1 exited with code 1 after RuntimeError: boom", 1)


@pytest.mark.parametrize("launched", [True, False])
def test_a_rank_leaves_its_line_for_the_agent_and_prints_it_only_without_phalanxs_launcher(
        tmp_path, monkeypatch, capsys, launched):
    import logging
    error_file = tmp_path / "error.json"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(error_file))
    if launched:
        monkeypatch.setenv(LAUNCHER_ENV, "1")
    else:
        monkeypatch.delenv(LAUNCHER_ENV, raising=False)
    log = logging.getLogger("phalanx")
    handler = logging.FileHandler(tmp_path / "rank-1.log")
    log.addHandler(handler)
    try:
        tell_from_rank("phalanx: error: something the user can fix")
    finally:
        log.removeHandler(handler)
        handler.close()
    err = capsys.readouterr().err
    assert err == ("" if launched else "phalanx: error: something the user can fix\n")
    assert json.loads(error_file.read_text())["message"] == "phalanx: error: something the user can fix"
    assert "something the user can fix" in (tmp_path / "rank-1.log").read_text()


def test_the_rendezvous_waits_for_other_nodes_as_long_as_init_timeout_s():
    argv = launcher_argv(ParallelConfig(nnodes=2, rdzv_endpoint="node0:29400", init_timeout_s=7.5), 1)
    assert argv[argv.index("--rdzv-conf") + 1] == "join_timeout=8"


def test_a_finished_forked_rank_leaves_by_itself_when_the_agent_never_releases_it():
    # torch's worker wrapper waits for the agent's event after the entrypoint returns; an agent that is
    # shutting down (a preemption) never sets it, and would SIGKILL the rank 30 s later.
    code = ("import threading; from phalanx.runtime.launch import leave_after_return; "
            "leave_after_return(0.2); threading.Event().wait()")
    r = subprocess.run([sys.executable, "-c", code], timeout=60)
    assert r.returncode == 0

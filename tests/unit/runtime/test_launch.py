"""The launcher's arguments for the elastic agent, and how many ranks `--nproc` means."""
from phalanx.config import ParallelConfig
from phalanx.runtime.launch import launcher_argv, resolve_nproc, start_method


def test_one_node_is_standalone():
    argv = launcher_argv(ParallelConfig(max_restarts=2), 3)
    assert argv[:2] == ["--nproc-per-node", "3"] and "--standalone" in argv
    assert argv[argv.index("--max-restarts") + 1] == "2"
    assert argv[-2:] == ["-m", "phalanx"] and "--rdzv-backend" not in argv


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


def test_start_method_is_the_accelerators_unless_asked():
    assert start_method(ParallelConfig(), "cpu") == "fork"
    assert start_method(ParallelConfig(start_method="spawn"), "cpu") == "spawn"

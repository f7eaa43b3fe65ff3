"""runtime/ray.py and `phalanx ray train` without a cluster (and without Ray where it is missing): what the
workers are asked for and inherit, how a failure reads, and what the command refuses before anything starts."""
from __future__ import annotations

import sys

import pytest

from phalanx.commands import main
from phalanx.errors import ConfigError
from phalanx.runtime import ray as on_ray


def test_one_worker_per_rank_with_its_cpus_and_one_gpu():
    assert on_ray.scaling(on_ray.RayLayout(workers=4, gpus_per_worker=1, cpus_per_worker=8)) == {
        "num_workers": 4, "use_gpu": True, "resources_per_worker": {"CPU": 8.0, "GPU": 1.0}}
    assert on_ray.scaling(on_ray.RayLayout(workers=2)) == {
        "num_workers": 2, "use_gpu": False, "resources_per_worker": {"CPU": 1.0}}


def test_the_workers_inherit_phalanx_variables_only():
    env = {"PHALANX_RUN_LOCK": "/r", "PHALANX_START_TIME": "1.5", "HOME": "/root", "RANK": "3"}
    assert on_ray.worker_env(env) == {"PHALANX_RUN_LOCK": "/r", "PHALANX_START_TIME": "1.5"}


def test_a_local_cluster_has_no_dashboard_and_a_named_one_is_joined():
    local = on_ray.init_kwargs(on_ray.RayLayout(workers=2), {"PHALANX_X": "1"})
    assert local == {"runtime_env": {"env_vars": {"PHALANX_X": "1"}}, "log_to_driver": True,
                     "include_dashboard": False}
    named = on_ray.init_kwargs(on_ray.RayLayout(workers=2, address="ray://head:10001"), {})
    assert named["address"] == "ray://head:10001" and "include_dashboard" not in named
    from_env = on_ray.init_kwargs(on_ray.RayLayout(workers=2), {"RAY_ADDRESS": "10.0.0.1:6379"})
    assert "address" not in from_env and "include_dashboard" not in from_env  # ray.init reads RAY_ADDRESS


def test_what_a_cluster_lacks_is_said_per_resource():
    need = on_ray.scaling(on_ray.RayLayout(workers=4, gpus_per_worker=1))
    assert on_ray.shortfall(need, 4, {"CPU": 16.0, "GPU": 4.0}) == ""
    assert on_ray.shortfall(need, 4, {"CPU": 2.0}) == ("4 x 1 CPU asked for, the cluster has 2; "
                                                       "4 x 1 GPU asked for, the cluster has 0")


def test_a_failure_reads_as_the_ranks_own_line_where_ray_reports_one():
    e = RuntimeError("Training failed due to worker errors:\n[Rank 1 Error Snippet]:\nTraceback...\n"
                     "RankFailed: phalanx: rank 1 (Ray attempt 0) exited with code 2\n")
    assert on_ray.failure_line(e) == "rank 1 (Ray attempt 0) exited with code 2"
    died = RuntimeError("Training failed due to worker errors:\n[Rank 1 Error Snippet]:\nA worker health check "
                        "failed.\nWorker info: ...")
    assert on_ray.failure_line(died) == "rank 1: A worker health check failed."
    assert on_ray.failure_line(RuntimeError("\nSomething else.\nmore")) == "Something else."


def test_without_ray_the_command_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    with pytest.raises(ConfigError, match=r"pip install 'phalanx\[ray\]'"):
        on_ray.import_ray()


@pytest.mark.parametrize("argv, says", [
    (["--", "--nproc", "2"], "--parallel.nproc after `--`: Ray starts the ranks here; give --workers"),
    (["--", "--rdzv-endpoint", "h:1"], "give --address to `phalanx ray train`"),
    (["--", "--max-restarts", "2"], "give --max_failures"),
    (["--workers", "0"], "--workers 0: must be a whole number >= 1"),
    (["--gpus_per_worker", "2"], "--gpus_per_worker 2: choose one of 0, 1"),
    (["--", "stray"], "unexpected argument 'stray'"),
])
def test_what_ray_decides_is_refused_after_the_double_dash_in_one_line(capsys, argv, says):
    assert main(["ray", "train", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert says in err and len(err.splitlines()) == 1, err

"""runtime/slurm.py: a job's environment read as SLURM documents it, the two layouts, and the requeue."""
import os
import stat

import pytest

from phalanx.errors import ConfigError
from phalanx.runtime import slurm


def job(**extra):
    env = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "n[01-02]", "SLURM_JOB_NUM_NODES": "2", "SLURM_NTASKS": "2",
           "SLURM_TASKS_PER_NODE": "1(x2)", "SLURM_NODEID": "1", "SLURM_PROCID": "1", "SLURM_LOCALID": "0",
           "SLURM_STEP_ID": "0"}
    env.update(extra)
    return env


def test_outside_slurm_there_is_no_allocation():
    assert slurm.detect({}) is None
    assert slurm.detect(job(PHALANX_SLURM="0")) is None


def test_node_lists_expand_like_scontrol_show_hostnames():
    assert slurm.expand_nodelist("gpu[01-03,7],login,a[8-10]b") == ["gpu01", "gpu02", "gpu03", "gpu7", "login",
                                                                  "a8b", "a9b", "a10b"]
    assert slurm.tasks_per_node("2(x3),1") == (2, 2, 2, 1)


def test_one_task_per_node_takes_nodes_node_rank_and_endpoint_from_slurm(monkeypatch):
    monkeypatch.setattr(slurm.shutil, "which", lambda name: None)  # no scontrol: the node list expanded here
    a = slurm.detect(job())
    assert a.nodes == ("n01", "n02") and a.node_id == 1 and slurm.check_layout(a, "auto") == "node"
    assert a.endpoint == f"n01:{slurm.PORT_BASE + 4242}" and a.rdzv_id == "slurm-4242"
    assert slurm.detect(job(SLURM_JOB_ID="1_7")).endpoint == f"n01:{slurm.PORT_BASE + 17}"  # an array task


def test_one_task_per_device_makes_each_task_one_rank(monkeypatch):
    monkeypatch.setattr(slurm.shutil, "which", lambda name: None)
    a = slurm.detect(job(SLURM_NTASKS="8", SLURM_TASKS_PER_NODE="4(x2)", SLURM_NODEID="1", SLURM_PROCID="6",
                         SLURM_LOCALID="2"))
    assert slurm.check_layout(a, "auto") == "rank"
    assert slurm.rank_environment(a) == {"RANK": "6", "WORLD_SIZE": "8", "LOCAL_RANK": "2", "LOCAL_WORLD_SIZE": "4",
                                         "GROUP_RANK": "1", "MASTER_ADDR": "n01", "MASTER_PORT": str(20000 + 4242)}
    with pytest.raises(ConfigError, match=r"8 tasks, so each task is one rank; --nproc 4 would start"):
        slurm.check_layout(a, "4")


@pytest.mark.parametrize("extra, says", [
    ({"SLURM_NTASKS": "3", "SLURM_TASKS_PER_NODE": "2,1"}, r"3 tasks over 2 nodes, unevenly \(2, 1 per node\)"),
    ({"SLURM_STEP_ID": None}, r"has 2 nodes but this is its batch script.*srun --ntasks-per-node=1"),
    ({"SLURM_JOB_NUM_NODES": "3"}, r"3 node\(s\) but the node list 'n\[01-02\]' names 2"),
    ({"SLURM_NODEID": "x"}, r"an unreadable SLURM_\* variable"),
])
def test_an_allocation_that_fits_neither_layout_is_one_line(monkeypatch, extra, says):
    monkeypatch.setattr(slurm.shutil, "which", lambda name: None)
    env = {k: v for k, v in job(**{k: v for k, v in extra.items() if v is not None}).items()
           if not (k in extra and extra[k] is None)}
    with pytest.raises(ConfigError, match=says) as e:
        slurm.check_layout(slurm.detect(env), "auto")
    assert "\n" not in str(e.value)


def _fake_scontrol(tmp_path, code=0, out=""):
    exe = tmp_path / "scontrol"
    exe.write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path}/calls\necho '{out}'\nexit {code}\n")
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    return exe


def test_requeue_asks_scontrol_and_says_what_happened(tmp_path, monkeypatch):
    _fake_scontrol(tmp_path)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    a = slurm.Allocation("77", ("n1",), 0, 1, (1,), 0, 0, True)
    assert "job 77 requeued" in slurm.requeue(a)
    assert (tmp_path / "calls").read_text().split() == ["requeue", "77"]
    _fake_scontrol(tmp_path, code=1, out="slurm_requeue error: Requested operation is presently disabled")
    line = slurm.requeue(a)
    assert "presently disabled" in line and "submit the same script again" in line


def test_without_scontrol_the_requeue_is_one_line_saying_so(monkeypatch):
    monkeypatch.setattr(slurm.shutil, "which", lambda name: None)
    line = slurm.requeue(slurm.Allocation("77", ("n1",), 0, 1, (1,), 0, 0, True))
    assert "scontrol is not on PATH" in line and "\n" not in line

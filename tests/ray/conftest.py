"""A local Ray cluster on this machine (2 CPUs, no dashboard, usage statistics off), started once for the lane by
`ray.init` in the test process and stopped at the end: `ray.shutdown()`, then whatever of its processes is left,
by process id. `phalanx ray train` runs in its own process and joins it by its address."""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
import time
from pathlib import Path

import pytest


def _descendants(pid: int) -> set[int]:
    """Every process below `pid` now (from /proc)."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(d.name))
    out, todo = set(), [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            if c not in out:
                out.add(c)
                todo.append(c)
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with contextlib.suppress(OSError):  # a zombie is dead
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    return False


@pytest.fixture(scope="session")
def ray_cluster():
    """The address of a local Ray cluster of 2 CPUs; stopped (by pid where ray.shutdown leaves any) at the end."""
    pytest.importorskip("ray.train.torch", reason="Ray is not installed: `make test-ray` installs the `ray` "
                              "extra (pip install 'phalanx[ray]')")
    import ray

    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"  # inherited by the cluster and by the phalanx processes
    temp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    info = ray.init(num_cpus=2, include_dashboard=False, _temp_dir=temp, log_to_driver=False)
    started: set[int] = set()
    try:
        yield info.address_info["gcs_address"]
    finally:
        started = _descendants(os.getpid())
        ray.shutdown()
        deadline = time.monotonic() + 20
        while any(_alive(p) for p in started) and time.monotonic() < deadline:
            time.sleep(0.2)
        for pid in started:
            if _alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        shutil.rmtree(temp, ignore_errors=True)

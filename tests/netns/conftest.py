"""Two "nodes" on separate networks on this machine: each in its own network namespace, joined by a veth pair
on a test-only subnet (10.231.N.0/24), made here and removed at the end however the tests end. Each node runs
`phalanx train` with `ip netns exec`; every process a test starts is stopped by its process id (group). Needs
root and iproute2 (`ip`, `ss`); without them every test here skips with one line saying why."""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import wait_for  # noqa: F401 (the lane's tests import it from here)


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=check)


def _why_not() -> str | None:
    if os.geteuid() != 0:
        return "the network-namespace tests need root (ip netns, veth)"
    missing = [t for t in ("ip", "ss") if not shutil.which(t)]
    if missing:
        return f"iproute2 is not installed ({', '.join(missing)} missing): apt-get install iproute2"
    return None


@pytest.fixture(scope="session")
def two_nodes():
    """{'ns': (ns0, ns1), 'addr': (addr0, addr1), 'dev': (dev0, dev1)}: the namespaces, each node's address and
    its end of the veth pair (dev k lives in ns k)."""
    why = _why_not()
    if why:
        pytest.skip(why)
    tag = f"{os.getpid() % 100000}"
    subnet = 10 + os.getpid() % 240
    ns = (f"phx{tag}n0", f"phx{tag}n1")
    dev = (f"phx{tag}v0", f"phx{tag}v1")
    addr = (f"10.231.{subnet}.1", f"10.231.{subnet}.2")
    made: list[str] = []
    try:
        for n in ns:
            r = _ip("netns", "add", n, check=False)
            if r.returncode != 0:
                pytest.skip(f"network namespaces cannot be made here ({r.stderr.strip()})")
            made.append(n)
        _ip("link", "add", dev[0], "type", "veth", "peer", "name", dev[1])
        for k in (0, 1):
            _ip("link", "set", dev[k], "netns", ns[k])
            _ip("-n", ns[k], "addr", "add", f"{addr[k]}/24", "dev", dev[k])
            _ip("-n", ns[k], "link", "set", dev[k], "up")
            _ip("-n", ns[k], "link", "set", "lo", "up")
        yield {"ns": ns, "addr": addr, "dev": dev}
    finally:
        for n in made:  # deleting a namespace deletes its end of the veth pair, and with it the pair
            _ip("netns", "del", n, check=False)
        with contextlib.suppress(subprocess.SubprocessError):
            _ip("link", "del", dev[0], check=False)  # made but never moved into its namespace


def link(nodes: dict, k: int, state: str) -> None:
    _ip("-n", nodes["ns"][k], "link", "set", nodes["dev"][k], state)


class Node:
    """One `phalanx train` in node k's namespace, its output in a file; stopped by its process group."""

    def __init__(self, nodes: dict, k: int, args: list[str], cache: Path, out: Path):
        self.out = out
        self.started = time.monotonic()
        env = dict(os.environ, PHALANX_CACHE=str(cache), PYTHONUNBUFFERED="1", PHALANX_SLURM="0")
        env.pop("PHALANX_FAULT", None)
        with open(out, "w") as f:
            self.proc = subprocess.Popen(["ip", "netns", "exec", nodes["ns"][k], sys.executable, "-m", "phalanx",
                                          *map(str, args)], stdout=f, stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True)

    def text(self) -> str:
        return self.out.read_text() if self.out.exists() else ""

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"node did not end within {timeout:.0f} s:\n{self.text()[-3000:]}") from None

    def kill(self) -> None:
        """SIGKILL to every process of this node (the launcher, its agent, its ranks: one process group)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(30)


@pytest.fixture
def start_nodes():
    """start(nodes, k, args, cache, out) -> Node; every node started is killed at the end of the test."""
    started: list[Node] = []

    def start(*a) -> Node:
        node = Node(*a)
        started.append(node)
        return node

    yield start
    for node in started:
        node.kill()



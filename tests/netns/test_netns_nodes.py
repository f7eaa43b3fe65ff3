"""A 2-node run whose nodes are on separate networks (tests/netns/conftest.py): each node one process of
`phalanx train --nnodes 2 --node_rank K --parallel.rdzv_endpoint NODE0:PORT --nproc 1`, run in its own network
namespace. The stores listen on the node's own address only; the run ends with the weights of the same training
on one machine; a link cut mid-run is one line naming the node that became unreachable, and the run resumes."""
from __future__ import annotations

import re
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.dist.conftest import BASE, EXACT, assert_same_weights, trained_once
from tests.netns.conftest import link, wait_for

pytestmark = pytest.mark.netns

LONGER = ["--epochs", "6", "--ckpt.every_steps", "4"]  # 60 steps: long enough to cut the link mid-run
RUN_TIMEOUT_S = 300.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def references(tmp_path_factory, cache_dir, small_idx):
    """The same trainings with 2 ranks on one machine (loopback), once each."""
    return trained_once(tmp_path_factory.mktemp("one-machine"), cache_dir, lambda run_dir, nproc, *extra: [
        "train", "--data", small_idx, "--run_dir", run_dir, "--nproc", nproc, *BASE, *EXACT, *extra])


def node_args(nodes: dict, k: int, port: int, data: Path, run_dir: Path, *extra: str) -> list[str]:
    return ["train", "--data", data, "--run_dir", run_dir, "--nproc", "1", "--nnodes", "2", "--node_rank", str(k),
            "--parallel.rdzv_endpoint", f"{nodes['addr'][0]}:{port}", "--parallel.init_timeout_s", "120",
            *BASE, *EXACT, *extra]


def listeners(nodes: dict, k: int) -> set[str]:
    """LOCAL-ADDRESS:PORT of every TCP socket listening in node k's namespace (`ss -ltn`)."""
    out = subprocess.run(["ip", "netns", "exec", nodes["ns"][k], "ss", "-Hltn"], capture_output=True, text=True,
                         timeout=30).stdout
    return {line.split()[3] for line in out.splitlines() if len(line.split()) >= 4}


def steps_in(run_dir: Path) -> int:
    m = run_dir / "metrics.jsonl"
    found = re.findall(r'"event": "train", "epoch": \d+, "step": (\d+)', m.read_text()) if m.exists() else []
    return max(map(int, found), default=0)


def test_two_nodes_on_separate_networks_listen_on_their_own_address_and_train_as_on_one_machine(
        two_nodes, start_nodes, cache_dir, small_idx, references, tmp_path):
    run_dir, port = tmp_path / "run", free_port()
    nodes = [start_nodes(two_nodes, k, node_args(two_nodes, k, port, small_idx, run_dir, *LONGER), cache_dir,
                         tmp_path / f"node{k}.out") for k in (0, 1)]
    seen: list[set[str]] = [set(), set()]
    while any(n.proc.poll() is None for n in nodes):  # every listening socket while the run lives
        for k in (0, 1):
            seen[k] |= listeners(two_nodes, k)
        time.sleep(0.2)
        assert time.monotonic() - nodes[0].started < RUN_TIMEOUT_S, nodes[0].text()[-3000:]
    codes = [n.wait(30) for n in nodes]
    assert codes == [0, 0], "\n".join(n.text()[-3000:] for n in nodes)
    # The rendezvous store (node 0's agent), rank 0's process-group store and each rank's gloo listen on the
    # node's address: none on every interface (0.0.0.0, [::], *) or on loopback, which the other node cannot reach.
    assert f"{two_nodes['addr'][0]}:{port}" in seen[0], seen
    for k in (0, 1):
        assert seen[k], f"nothing listened on node {k}"
        assert {a.rsplit(":", 1)[0] for a in seen[k]} == {two_nodes["addr"][k]}, (k, seen[k])
    assert_same_weights(references(2, *LONGER), run_dir)


def test_a_cut_link_is_one_line_naming_the_unreachable_node_and_a_later_run_resumes(
        two_nodes, start_nodes, cache_dir, small_idx, references, tmp_path):
    run_dir, port = tmp_path / "run", free_port()
    timeout_s = 10
    args = [node_args(two_nodes, k, port, small_idx, run_dir, *LONGER, "--parallel.timeout_s", str(timeout_s))
            for k in (0, 1)]
    nodes = [start_nodes(two_nodes, k, args[k], cache_dir, tmp_path / f"cut{k}.out") for k in (0, 1)]
    wait_for(lambda: steps_in(run_dir) >= 10, RUN_TIMEOUT_S, "the run to pass step 10 (a checkpoint at 8)")
    cut = time.monotonic()
    link(two_nodes, 1, "down")
    named: dict[int, float] = {}
    addr = two_nodes["addr"]

    def lines_name_the_other_node() -> bool:
        for k in (0, 1):
            if k not in named and re.search(rf"rank {1 - k} \(node {re.escape(addr[1 - k])}\) stalled", nodes[k].text()):
                named[k] = time.monotonic() - cut
        return len(named) == 2

    wait_for(lines_name_the_other_node, RUN_TIMEOUT_S, "both nodes to name the other one",
             every=0.1)
    assert nodes[0].wait(120) != 0, nodes[0].text()[-3000:]
    # Node 1's elastic agent keeps asking the rendezvous store on node 0, which it cannot reach, for minutes
    # (torch's own timeouts): it is stopped here once its rank has said what happened (docs/clusters.md).
    try:
        left_s: float | None = None
        nodes[1].proc.wait(60)
        left_s = time.monotonic() - cut
    except subprocess.TimeoutExpired:
        nodes[1].kill()
    print(f"cut link to the line naming the other node: node 0 {named[0]:.1f} s, node 1 {named[1]:.1f} s "
          f"(--parallel.timeout_s {timeout_s}); node 1's launcher "
          + (f"ended {left_s:.0f} s after the cut" if left_s else "was still waiting 60 s later (killed)"))
    link(two_nodes, 1, "up")
    again = [start_nodes(two_nodes, k, args[k], cache_dir, tmp_path / f"again{k}.out") for k in (0, 1)]
    codes = [n.wait(RUN_TIMEOUT_S) for n in again]
    assert codes == [0, 0], "\n".join(n.text()[-3000:] for n in again)
    assert "resumed from" in (run_dir / "logs" / "rank-0.log").read_text()
    assert_same_weights(references(2, *LONGER), run_dir)

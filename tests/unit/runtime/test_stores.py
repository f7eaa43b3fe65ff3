"""Where the run's stores listen, and a rendezvous port held by a program that is not a store."""
import datetime
import os
import socket
import threading
import time

import pytest
import torch.distributed as dist

from phalanx.config import ParallelConfig
from phalanx.errors import ConfigError
from phalanx.runtime import stores
from phalanx.runtime.dist import serve_process_group_store
from phalanx.runtime.launch import bind_rendezvous, launcher_argv
from tests.conftest import make_idx_dataset, run_phalanx
from tests.sockets import listening_addresses


def _listening_here(port: int) -> list[str]:
    return [a for a, p in listening_addresses([os.getpid()]) if p == port]


class SilentProgram:
    """A program holding a port that accepts connections and never answers (not a c10d store)."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.held: list = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                self.held.append(self.sock.accept()[0])
            except OSError:
                return

    def close(self):
        for c in self.held:
            c.close()
        self.sock.close()


@pytest.fixture
def silent_program():
    p = SilentProgram()
    yield p
    p.close()


def _torchrun_args(pcfg: ParallelConfig):
    from torch.distributed.run import get_args_parser
    args = get_args_parser().parse_args(launcher_argv(pcfg, 2) + ["--"])
    if args.standalone:
        args.rdzv_backend, args.rdzv_endpoint = "c10d", "127.0.0.1:0"
    return args


def test_a_store_served_here_listens_on_its_address_only_and_is_the_one_torch_uses():
    server = stores.serve("127.0.0.1", 0)
    assert _listening_here(server.port) == ["127.0.0.1"]
    # What torch's rendezvous backend and env:// initialisation create on that port: the same server.
    again = dist.TCPStore("127.0.0.1", server.port, is_master=True, multi_tenant=True,
                          timeout=datetime.timedelta(seconds=5))
    again.set("k", "v")
    assert server.get("k") == b"v"
    assert _listening_here(server.port) == ["127.0.0.1"]


def test_one_node_rendezvous_and_process_group_stores_listen_on_loopback(monkeypatch):
    monkeypatch.delenv("GLOO_SOCKET_IFNAME", raising=False)
    args = _torchrun_args(ParallelConfig())
    server = bind_rendezvous(args, ParallelConfig())
    host, port = args.rdzv_endpoint.rsplit(":", 1)
    assert server is not None and host == "127.0.0.1" and int(port) == server.port
    assert args.local_addr == "127.0.0.1"  # the ranks' MASTER_ADDR: rank 0's store binds it
    assert os.environ["GLOO_SOCKET_IFNAME"] == stores.loopback_interface()
    pg = serve_process_group_store(args.local_addr, "0")
    assert pg is not None
    for p in (server.port, pg.port):
        assert _listening_here(p) == ["127.0.0.1"]


def test_answers_as_store_tells_a_store_from_another_program_and_from_nothing(silent_program):
    server = stores.serve("127.0.0.1", 0)
    assert stores.answers_as_store("127.0.0.1", server.port) is True
    t0 = time.monotonic()
    assert stores.answers_as_store("127.0.0.1", silent_program.port, within_s=3) is False
    assert time.monotonic() - t0 < 10
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    assert stores.answers_as_store("127.0.0.1", free) is None


def test_a_rendezvous_port_held_by_another_program_is_one_line_within_seconds(silent_program):
    pcfg = ParallelConfig(rdzv_endpoint=f"127.0.0.1:{silent_program.port}")
    with pytest.raises(ConfigError, match=rf"--parallel.rdzv_endpoint 127.0.0.1:{silent_program.port}: the port is "
                                          r"held by a program that does not answer as a PyTorch c10d store"):
        bind_rendezvous(_torchrun_args(pcfg), pcfg)


@pytest.mark.slow  # a whole `phalanx train` start; the probe itself is tested above in seconds
def test_phalanx_train_with_a_held_rendezvous_port_exits_2_with_one_line(silent_program, tmp_path):
    data = make_idx_dataset(tmp_path / "idx", 64, 40)
    t0 = time.monotonic()
    r = run_phalanx(["train", "--data", data, "--global_batch", "32", "--nproc", "2", "--parallel.rdzv_endpoint",
                     f"127.0.0.1:{silent_program.port}", "--run_dir", tmp_path / "run"], tmp_path / "cache",
                    timeout=120)
    elapsed = time.monotonic() - t0
    err = r.stderr.strip().splitlines()
    assert r.returncode == 2, r.stdout + r.stderr
    assert len(err) == 1 and f"127.0.0.1:{silent_program.port}: the port is held by a program" in err[0], r.stderr
    assert elapsed < 60, f"took {elapsed:.0f} s"

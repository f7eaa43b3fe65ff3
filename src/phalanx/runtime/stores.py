"""Where the run's key-value stores listen, and whether an address answers as one.

A run has up to two c10d TCPStores: the rendezvous store (hosted by the elastic agent of the node
that owns the rendezvous endpoint) and the process-group store (hosted by rank 0). torch 2.11-2.14
give a TCPStore server no bind address: it listens on every interface (`*:PORT`, IPv6 with IPv4
mapped). What they do give is `master_listen_fd` (a socket already bound and listening, taken
over by the server) and `multi_tenant` (one server per port and process, shared by every TCPStore
created there). So a server bound here to one address, before torch creates its own on that port,
is the one torch uses. Neither store authenticates its clients: see docs/reliability.md.
"""
from __future__ import annotations

import contextlib
import datetime
import ipaddress
import os
import socket
import sys
import threading
from typing import Any, Callable

STORE_TIMEOUT_S = 60.0
"""A store server's own timeout for its clients' operations (torch's rendezvous uses 60 s)."""


def resolve(host: str) -> str:
    """The address `host` names (IPv4 first, as TCPStore's clients try it); OSError when it names none."""
    infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    infos.sort(key=lambda info: info[0] != socket.AF_INET)
    return infos[0][4][0]


def is_loopback(addr: str) -> bool:
    try:
        return ipaddress.ip_address(addr).is_loopback
    except ValueError:
        return False


def route_addr(addr: str) -> str | None:
    """This machine's address on the route to `addr` (no packet is sent), or None."""
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.connect((addr, 9))
            return s.getsockname()[0]
    except OSError:
        return None


def loopback_interface() -> str | None:
    """The name of the loopback network interface (`lo` on Linux, `lo0` on macOS), or None."""
    try:
        names = {name for _, name in socket.if_nameindex()}
    except OSError:
        return None
    return next((n for n in ("lo", "lo0") if n in names), None)


def interface_of(addr: str) -> str | None:
    """The name of this machine's network interface that holds `addr` (e.g. `eth0` for 10.0.0.5), or None.

    What gloo is told (GLOO_SOCKET_IFNAME): left to itself it takes the address this machine's host name
    resolves to, which on many machines (Debian's /etc/hosts) is a loopback address the other nodes cannot
    reach, and listens there. Linux's interfaces (elsewhere: None)."""
    try:
        want = ipaddress.ip_address(addr)
    except ValueError:
        return None
    if want.version == 6:
        try:  # /proc/net/if_inet6: ADDRESS(32 hex) INDEX PREFIX SCOPE FLAGS NAME
            with open("/proc/net/if_inet6") as f:
                for line in f:
                    fields = line.split()
                    if len(fields) >= 6 and ipaddress.IPv6Address(int(fields[0], 16)) == want:
                        return fields[5]
        except (OSError, ValueError):
            return None
        return None
    import fcntl
    import struct
    siocgifaddr = 0x8915
    try:
        names = [name for _, name in socket.if_nameindex()]
    except OSError:
        return None
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for name in names:
            try:
                raw = fcntl.ioctl(s.fileno(), siocgifaddr, struct.pack("256s", name.encode()[:15]))
            except OSError:  # no IPv4 address on this interface
                continue
            if socket.inet_ntoa(raw[20:24]) == str(want):
                return name
    return None


def listen_on(addr: str, port: int) -> socket.socket:
    """A TCP socket bound to `addr:port` (port 0: a free one) and listening; OSError when it cannot be."""
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((addr, port))
        s.listen(1024)
    except OSError:
        s.close()
        raise
    return s


def serve(addr: str, port: int):
    """A TCPStore server listening on `addr:port` only (port 0: a free one; `.port` says which).

    Multi-tenant, so that the TCPStores torch creates later in this process on that port use it.
    Raises OSError when the address is not this machine's (EADDRNOTAVAIL) or the port is taken (EADDRINUSE).
    """
    import torch.distributed as dist

    sock = listen_on(addr, port)
    port = sock.getsockname()[1]
    # The server takes the descriptor over (libuv's since torch 2.8; the classic one always has).
    return dist.TCPStore(addr, port, is_master=True, multi_tenant=True, master_listen_fd=sock.detach(),
                         wait_for_workers=False, use_libuv=True,
                         timeout=datetime.timedelta(seconds=STORE_TIMEOUT_S))


def call_within(fn: Callable[[], Any], seconds: float) -> tuple[bool, Any]:
    """(done, result or exception) of `fn()` run on a daemon thread for at most `seconds`.

    A TCPStore client blocks without limit when the other end accepts the connection and never
    answers (a stopped process, a program that is not a store): no call into one on the main thread
    may wait for it. A call still blocked when time is up is left behind on its thread.
    """
    out: list = []

    def run() -> None:
        try:
            out.append((True, fn()))
        except Exception as e:  # noqa: BLE001 (any failure is an answer here)
            out.append((False, e))

    t = threading.Thread(target=run, daemon=True, name="phalanx-store-call")
    t.start()
    t.join(seconds)
    if not out:
        return False, TimeoutError(f"no answer within {seconds:g} s")
    ok, value = out[0]
    return ok, value


@contextlib.contextmanager
def quiet_stderr():
    """Descriptor 2 to /dev/null meanwhile: a failing TCPStore client logs each retry with a C++ stack."""
    sys.stderr.flush()
    saved = os.dup(2)
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 2)
    os.close(null)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def answers_as_store(host: str, port: int, within_s: float = 5.0) -> bool | None:
    """Whether `host:port` answers as a c10d store: None when nothing accepts connections there (yet),
    False when something does but does not answer as a store within `within_s` seconds."""
    import torch.distributed as dist

    try:
        with socket.create_connection((host, port), timeout=min(2.0, within_s)):
            pass
    except OSError:
        return None

    def ask() -> bool:
        client = dist.TCPStore(host, port, is_master=False, wait_for_workers=False,
                               timeout=datetime.timedelta(seconds=max(1.0, within_s - 1)))
        client.check(["phalanx/probe"])
        return True

    with quiet_stderr():
        ok, _ = call_within(ask, within_s)
    return ok

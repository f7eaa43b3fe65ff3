"""Which network interface holds an address (runtime/stores.interface_of): what gloo is told to listen on when the
rendezvous endpoint is not on loopback (no namespaces needed: runs in `make test`)."""
from __future__ import annotations

import socket
import sys

import pytest

from phalanx.runtime import stores


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="interface_of reads Linux's interfaces")
def test_the_interface_of_an_address_of_this_machine_and_of_none():
    lo = stores.loopback_interface()
    assert stores.interface_of("127.0.0.1") == lo
    assert stores.interface_of("192.0.2.123") is None or "192.0.2.123" in socket.gethostbyname_ex(
        socket.gethostname())[2]  # TEST-NET-1: no machine's address, unless this one's
    assert stores.interface_of("not an address") is None

"""Shards from Python's HTTP server on loopback: read through fsspec's HTTP filesystem; a server that stops
mid-epoch is retried with backoff (and read again when it comes back), then one line."""
import threading
import time

import numpy as np
import pytest
import torch

from phalanx import config as C
from phalanx.data import prepare as P
from phalanx.data.augment import Normalize
from phalanx.data.shard_write import write_shards
from phalanx.data.shards import ShardTrainLoader, open_shards
from phalanx.data.store import open_store
from phalanx.errors import DataError
from tests.streaming.conftest import http_server
from tests.unit.data.test_stream_training import make_jpeg_folder

pytestmark = [pytest.mark.streaming, pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")]
SIZE = 16


@pytest.fixture(scope="module")
def data(deps, tmp_path_factory):
    root = tmp_path_factory.mktemp("httpdata")
    folder = make_jpeg_folder(root / "imgs")
    index = write_shards(folder, root / "shards", shard_size=20_000, progress=False)
    return root, folder, index


def test_http_shards_give_the_prepared_stores_pixels(data, tmp_path):
    root, folder, _ = data
    server = http_server(root / "shards", tmp_path)
    try:
        src = open_shards(server.url + "/", SIZE, 3, tmp_path / "cache", "1MB", is_main=True)
        store = open_store(P.prepare(folder, tmp_path / "store", size=SIZE, channels=3, workers=1, progress=False))
        x, _ = src["train"].__getitems__(list(range(len(store["train"]))))
        assert torch.equal(x.permute(0, 2, 3, 1), torch.from_numpy(np.array(store["train"].images)))
    finally:
        server.stop()


def test_a_server_that_stops_mid_epoch_is_retried_then_one_line(data, tmp_path):
    root, _, index = data
    server = http_server(root / "shards", tmp_path)
    restarted, timer = {}, None
    try:
        largest = max(s["bytes"] for s in index["splits"]["train"]["shards"])
        # three shards of room: the epoch has to fetch while it trains; 4 tries 0.2, 0.4, 0.8 s apart
        src = open_shards(server.url, SIZE, 3, tmp_path / "cache", str(3 * largest), is_main=True, retries=4,
                          backoff=0.2)
        # a fetch while the server is down for ~0.5 s: retried, and it succeeds when the server is back
        shard = index["splits"]["train"]["shards"][-1]
        for p in src.cache.root.glob("*.tar"):
            p.unlink()
        port = server.port
        server.stop()
        timer = threading.Timer(0.5, lambda: restarted.setdefault("s", http_server(root / "shards", tmp_path, port)))
        timer.start()
        t0 = time.monotonic()
        path = src.cache.local(src.url_of(shard["name"]), shard)
        assert time.monotonic() - t0 >= 0.2 and path.read_bytes() == (root / "shards" / shard["name"]).read_bytes()
        server = restarted["s"]
        # now the server stops for good after two steps of the epoch
        sampler = src.sampler(3, seed=0, world=1, rank=0, accum=1)
        norm = Normalize([0.5] * 3, [0.25] * 3, torch.device("cpu"), channels_last=True)
        loader = ShardTrainLoader(src["train"], sampler, C.AugmentConfig(), norm, torch.device("cpu"), 0, workers=1)
        steps = 0
        with pytest.raises(DataError) as e:
            for batch in loader.epoch(0):
                steps += 1
                assert src.cache.used() <= src.cache.budget  # workers and the prefetch thread fetch side by side
                if batch.step == 1:
                    server.stop()
        assert 2 <= steps < sampler.steps
        msg = str(e.value)
        assert len(msg.splitlines()) == 1 and "cannot fetch it after 4 tries" in msg and server.url in msg
        assert "check that the server is up" in msg and "--resume" in msg
    finally:
        if timer is not None:
            timer.join(40)  # the restart, when it is under way, ends (bounded by its 30 s start wait)
        server.stop()
        if "s" in restarted:
            restarted["s"].stop()

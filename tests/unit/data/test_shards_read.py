"""Reading shards: the global order from (seed, epoch), rank slices, resume, the node's cache and its faults."""
import json
import shutil

import numpy as np
import pytest
import torch

from phalanx import config as C
from phalanx.data import prepare as P
from phalanx.data.augment import Normalize
from phalanx.data.loader import TrainLoader
from phalanx.data.shard_write import write_shards
from phalanx.data.shards import (
    ShardCache,
    ShardSampler,
    ShardTrainLoader,
    expand_braces,
    open_shards,
    shard_epoch_order,
)
from phalanx.data.store import open_store
from phalanx.errors import DataError
from tests.unit.data.test_stream_training import make_jpeg_folder

pytestmark = pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")
SIZE = 16


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_jpeg_folder(tmp_path_factory.mktemp("shard-read") / "imgs")


@pytest.fixture(scope="module")
def shard_dir(folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("shards") / "set"
    write_shards(folder, out, shard_size=20_000, progress=False)
    return out


@pytest.fixture(scope="module")
def store(folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("store") / "store"
    return open_store(P.prepare(folder, out, size=SIZE, channels=3, workers=1, progress=False))


def test_brace_patterns():
    assert expand_braces("s3://b/train-{000..002}.tar") == [f"s3://b/train-00{i}.tar" for i in range(3)]
    assert expand_braces("x{a,b}-{1..2}") == ["xa-1", "xa-2", "xb-1", "xb-2"]


def test_epoch_order_is_a_function_of_seed_and_epoch_and_shuffles_within_windows():
    keys = [np.arange(k * 10, k * 10 + 10) for k in range(7)]
    a = shard_epoch_order(keys, 3, 1, 10)
    assert torch.equal(a, shard_epoch_order(keys, 3, 1, 10))
    assert sorted(a.tolist()) == list(range(70))
    assert not torch.equal(a, shard_epoch_order(keys, 3, 2, 10)) and not torch.equal(a, shard_epoch_order(keys, 4, 1, 10))
    for w in range(7):  # window w holds exactly one shard's samples here (buffer = shard size)
        assert len({int(i) // 10 for i in a[w * 10:(w + 1) * 10]}) == 1
    assert [int(a[w * 10]) // 10 for w in range(7)] != list(range(7))  # the shards are permuted


@pytest.mark.parametrize("accum", [1, 2])
def test_ranks_slice_the_same_global_batches_and_a_resume_continues_them(accum):
    keys = [np.arange(k * 9, k * 9 + 9) for k in range(5)]
    one = [idx for _, _, idx in ShardSampler(keys, 9, 12, seed=1, accum=accum).epoch(2)]
    for world in (2, 3):
        parts = [[idx for _, _, idx in ShardSampler(keys, 9, 12, 1, world, r, accum).epoch(2)] for r in range(world)]
        assert [torch.cat(p).tolist() for p in zip(*parts)] == [x.tolist() for x in one]
    resumed = [idx for _, _, idx in ShardSampler(keys, 9, 12, seed=1, accum=accum).epoch(2, start_step=2)]
    assert [x.tolist() for x in resumed] == [x.tolist() for x in one[2 * accum:]]


def test_shard_batches_equal_the_prepared_stores_for_1_2_3_ranks_and_a_resume(shard_dir, store, tmp_path):
    src = open_shards(shard_dir.as_uri(), SIZE, 3, tmp_path / "cache", "1MB", is_main=True)
    assert src.classes == store.classes and src.shape == store.shape and len(src["train"]) == len(store["train"])
    train = src["train"]
    ids = list(range(len(train)))  # every sample's pixels are the prepared store's
    assert torch.equal(train.__getitems__(ids)[0].permute(0, 2, 3, 1), torch.from_numpy(np.array(store["train"].images)))
    assert torch.equal(src["test"].__getitems__([0, 2])[1], torch.from_numpy(np.array(store["test"].labels[[0, 2]])))
    aug = C.AugmentConfig(crop_pad=2, flip=True, cutout=3)
    norm = Normalize(store.mean, store.std, torch.device("cpu"), channels_last=True)
    reference = None
    for world in (1, 2, 3):
        got = []
        for rank in range(world):
            sampler = src.sampler(6, seed=5, world=world, rank=rank, accum=1)
            prepared = TrainLoader(store["train"], sampler, aug, norm, torch.device("cpu"), seed=5)
            loader = ShardTrainLoader(train, sampler, aug, norm, torch.device("cpu"), 5, workers=2)
            for epoch, start in ((1, 0), (2, 3)):  # (2, 3): resumed mid-epoch
                a, b = list(prepared.epoch(epoch, start)), list(loader.epoch(epoch, start))
                assert len(a) == len(b) == sampler.steps - start
                for p, s in zip(a, b):
                    assert p.step == s.step and torch.equal(p.idx, s.idx)
                    assert torch.equal(p.x, s.x) and torch.equal(p.y, s.y)
            got.append([b.idx for b in loader.epoch(1)])
        per_step = [torch.cat(parts).tolist() for parts in zip(*got)]
        reference = reference or per_step
        assert per_step == reference  # the same images per step for 1, 2 and 3 ranks
    # a resumed epoch is the uninterrupted one's tail
    sampler = src.sampler(6, seed=5, world=1, rank=0, accum=1)
    whole = [b.idx.tolist() for b in ShardTrainLoader(train, sampler, aug, norm, torch.device("cpu"), 5, 1).epoch(4)]
    tail = [b.idx.tolist() for b in ShardTrainLoader(train, sampler, aug, norm, torch.device("cpu"), 5, 1).epoch(4, 2)]
    assert tail == whole[2:]


def test_a_brace_pattern_trains_on_those_shards_only(shard_dir, tmp_path):
    shards = _index(shard_dir)["splits"]["train"]["shards"]
    src = open_shards(f"{shard_dir.as_uri()}/train-{{000001..000003}}.tar", SIZE, 3, tmp_path / "c", "1MB", True)
    chosen = {k for s in shards[1:4] for k in s["keys"]}
    assert len(src["train"]) == len(chosen) and len(src["test"]) == _index(shard_dir)["splits"]["test"]["samples"]
    sampler = src.sampler(2, seed=0, world=1, rank=0, accum=1)
    seen = {int(i) for _, _, idx in sampler.epoch(0) for i in idx}
    assert seen <= chosen and len(seen) >= len(chosen) - 1
    with pytest.raises(DataError, match="train-000999.tar is not a training shard"):
        open_shards(f"{shard_dir}/train-000999.tar", SIZE, 3, tmp_path / "c", "1MB", True)
    with pytest.raises(DataError, match=r"index.json: not found; point --data at the folder `phalanx data shard`"):
        open_shards((tmp_path / "nowhere").as_uri(), SIZE, 3, tmp_path / "c", "1MB", True)


def _index(shard_dir):
    return json.loads((shard_dir / "index.json").read_text())


def test_cache_stays_within_its_budget_and_fetches_each_shard_once_while_it_fits(shard_dir, tmp_path):
    shards = _index(shard_dir)["splits"]["train"]["shards"]
    largest = max(s["bytes"] for s in shards)
    cache = ShardCache(tmp_path / "c", budget=3 * largest)
    for s in shards[:3]:
        cache.local((shard_dir / s["name"]).as_uri(), s)
        cache.local((shard_dir / s["name"]).as_uri(), s)  # cached: not fetched again
    assert cache.fetched() == sum(s["bytes"] for s in shards[:3])
    peak = 0
    for s in shards * 2:
        p = cache.local((shard_dir / s["name"]).as_uri(), s)
        assert p.read_bytes() == (shard_dir / s["name"]).read_bytes()
        peak = max(peak, cache.used())
    assert peak <= cache.budget and cache.used() <= cache.budget
    names = sorted(p.name for p in cache.root.glob("*.tar"))
    assert len(names) >= 3 and names == sorted(s["name"] for s in shards[-len(names):])  # least recently used out
    # budget too small for three shards: one line saying what to give
    with pytest.raises(DataError, match=r"--data.shard_cache .*smaller than 3 of these shards.*give at least"):
        open_shards(str(shard_dir), SIZE, 3, tmp_path / "c2", str(2 * largest), is_main=True)


@pytest.mark.parametrize("fault", ["missing", "truncated", "corrupt"])
def test_a_bad_shard_is_one_line_naming_it_and_nothing_is_read(fault, shard_dir, tmp_path):
    bad = tmp_path / "set"
    shutil.copytree(shard_dir, bad)
    shard = _index(bad)["splits"]["train"]["shards"][1]
    src = open_shards(bad.as_uri(), SIZE, 3, tmp_path / "cache", "1MB", is_main=True)
    (src.cache.root / shard["name"]).unlink()  # fetched for the mean/std: gone from the cache, then spoilt at the source
    f = bad / shard["name"]
    if fault == "missing":
        f.unlink()
    elif fault == "truncated":
        f.write_bytes(f.read_bytes()[:-700])
    else:
        data = bytearray(f.read_bytes())
        data[600] ^= 0xFF
        f.write_bytes(bytes(data))
    want = {"missing": "not found", "truncated": "truncated", "corrupt": "corrupt"}[fault]
    with pytest.raises(DataError) as e:
        src["train"].__getitems__(shard["keys"][:2])
    msg = str(e.value)
    assert len(msg.splitlines()) == 1 and shard["name"] in msg and want in msg
    assert "upload it again" in msg
    assert not (src.cache.root / shard["name"]).exists()  # no bad copy kept
    if fault != "corrupt":
        return
    # through the DataLoader workers of the training loader: the same one line
    sampler = src.sampler(33, seed=0, world=1, rank=0, accum=1)
    norm = Normalize([0.5] * 3, [0.25] * 3, torch.device("cpu"), channels_last=True)
    loader = ShardTrainLoader(src["train"], sampler, C.AugmentConfig(), norm, torch.device("cpu"), 0, workers=1)
    with pytest.raises(DataError) as e:
        list(loader.epoch(0))
    assert len(str(e.value).splitlines()) == 1 and shard["name"] in str(e.value) and want in str(e.value)

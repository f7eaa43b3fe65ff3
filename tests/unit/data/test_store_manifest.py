"""A store's manifest.json, whatever it holds, opens the store or gives one DataError line naming
it; it can never make Phalanx read a file outside the store folder."""
import json

import numpy as np
import pytest
from hypothesis import HealthCheck, event, example, given, settings

from phalanx.data.prepare import summary
from phalanx.data.store import MANIFEST, StoreWriter, open_store
from phalanx.errors import DataError
from tests.unit.train.json_documents import file_contents


def _store(out):
    w = StoreWriter(out, ["a", "b", "c"], (4, 4, 1), source="test", options={
        "kind": "imagefolder", "held_out": {"split": "test", "fraction": 0.1, "seed": 0}, "empty_classes": ["c"]})
    rng = np.random.default_rng(0)
    w.add_split("train", rng.integers(0, 256, (6, 4, 4, 1), dtype=np.uint8), np.array([0, 1, 0, 1, 0, 1]))
    w.add_split("test", rng.integers(0, 256, (2, 4, 4, 1), dtype=np.uint8), np.array([0, 1]))
    return w.commit([{"path": "a/x.png", "reason": "empty file (0 bytes)"}])


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return _store(tmp_path_factory.mktemp("stores") / "s")


def _rewrite(store_dir, change):
    m = json.loads((store_dir / MANIFEST).read_text())
    change(m)
    (store_dir / MANIFEST).write_text(json.dumps(m))


@pytest.mark.parametrize("field", ["images", "labels"])
@pytest.mark.parametrize("name", ["../outside.npy", "/tmp/outside.npy", "sub/train-images.npy", "..", "", "a\\b"])
def test_a_manifest_naming_a_file_outside_the_store_is_refused(tmp_path, field, name):
    out = _store(tmp_path / "s")
    np.save(tmp_path / "outside.npy", np.zeros((6, 4, 4, 1), np.uint8))
    _rewrite(out, lambda m: m["splits"]["train"].__setitem__(field, name))
    with pytest.raises(DataError) as e:
        open_store(out)
    msg = str(e.value)
    assert "\n" not in msg and str(out / MANIFEST) in msg and repr(name) in msg
    assert "plain file name" in msg


def test_manifest_of_any_content_opens_or_is_one_data_error(store):
    mpath = store / MANIFEST
    original = mpath.read_bytes()
    valid = json.loads(original)
    train = valid["splits"]["train"]

    @settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(file_contents(valid))
    @example(b"[1, 2]")
    @example(json.dumps({k: v for k, v in valid.items() if k != "shape"}).encode())
    @example(json.dumps(dict(valid, splits={"train": dict(train, count="6")})).encode())
    @example(json.dumps(dict(valid, splits={"train": dict(train, images="test-labels.npy")})).encode())
    @example(json.dumps(dict(valid, splits={"train": dict(train, images=MANIFEST)})).encode())
    @example(json.dumps(dict(valid, mean=[0.1, 0.2])).encode())
    @example(json.dumps(dict(valid, options={"held_out": {"fraction": "10%"}})).encode())
    def check(content):
        mpath.write_bytes(content)
        try:
            s = open_store(store)
            s.verify()
            text = summary(s.manifest, store)  # what `phalanx data info` prints
        except DataError as e:
            msg = str(e)
            assert "\n" not in msg and str(store) in msg, msg
            event("refused")
            return
        event("opened")
        assert s.shape[2] == len(s.mean) == len(s.std) and text

    try:
        check()
    finally:
        mpath.write_bytes(original)
    assert len(open_store(store)["train"]) == 6

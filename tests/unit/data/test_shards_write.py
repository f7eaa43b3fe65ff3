"""`phalanx data shard`: WebDataset-layout tar shards and their index, read back by webdataset itself."""
import hashlib
import json
import tarfile

import numpy as np
import pytest
import torch

from phalanx.commands import main
from phalanx.data import prepare as P
from phalanx.data.imageio import decode_chw
from phalanx.data.shard_write import label_array, parse_bytes, write_shards
from phalanx.data.store import open_store
from phalanx.errors import ConfigError
from tests.unit.data.test_stream_training import make_jpeg_folder

pytestmark = pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_jpeg_folder(tmp_path_factory.mktemp("shard-src") / "imgs")


@pytest.fixture(scope="module")
def shards(folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("shards") / "out"
    return out, write_shards(folder, out, shard_size=20_000, progress=False)


def test_parse_bytes():
    assert parse_bytes("256MB", "x") == 256 * 10**6 and parse_bytes("1.5GiB", "x") == int(1.5 * 2**30)
    assert parse_bytes("4096", "x") == 4096 and parse_bytes("64k", "x") == 64_000
    with pytest.raises(ConfigError, match="--shard_size 12 apples: not a byte size"):
        parse_bytes("12 apples", "--shard_size")


def test_index_lists_every_sample_once_with_sizes_and_checksums(folder, shards):
    out, index = shards
    listing = P.list_imagefolder(folder)
    assert index["classes"] == listing.classes and set(index["splits"]) == set(listing.splits)
    for split, entries in listing.splits.items():
        s = index["splits"][split]
        assert s["samples"] == len(entries)
        assert sorted(k for sh in s["shards"] for k in sh["keys"]) == list(range(len(entries)))
        assert label_array(index, split).tolist() == [lab for _, lab in entries]
        for sh in s["shards"]:
            data = (out / sh["name"]).read_bytes()
            assert len(data) == sh["bytes"] <= 20_000 or sh["samples"] == 1
            assert hashlib.sha256(data).hexdigest() == sh["sha256"]
    assert len(index["splits"]["train"]["shards"]) > 2  # several shards: the size limit applies
    assert json.loads((out / "index.json").read_text()) == index
    # training samples are spread over the shards: the first shard is not one class
    first = index["splits"]["train"]["shards"][0]
    assert len(set(first["labels"])) > 1


def test_webdataset_reads_the_shards_with_the_original_bytes(folder, shards):
    wds = pytest.importorskip("webdataset", reason="webdataset is not installed (pip install -e '.[shards]')")
    out, index = shards
    listing = P.list_imagefolder(folder)
    urls = [str(out / sh["name"]) for sh in index["splits"]["train"]["shards"]]
    seen = {}
    for sample in wds.WebDataset(urls, shardshuffle=False):
        key = sample["__key__"]
        ext = "jpg" if "jpg" in sample else "png"
        seen[int(key)] = (sample[ext], int(sample["cls"]))
    entries = listing.splits["train"]
    assert sorted(seen) == list(range(len(entries)))
    for k, (data, label) in seen.items():
        rel, lab = entries[k]
        assert data == (folder / rel).read_bytes() and label == lab
    # webdataset's own decoder: the images decode to the files' pixels
    dec = next(iter(wds.WebDataset(urls[:1], shardshuffle=False).decode("rgb8").to_tuple("jpg;png", "cls")))
    assert dec[0].ndim == 3 and dec[0].shape[2] == 3 and dec[1] == index["splits"]["train"]["shards"][0]["labels"][0]


def test_resized_shards_hold_the_prepared_stores_pixels(folder, tmp_path):
    out = tmp_path / "png16"
    index = write_shards(folder, out, shard_size=10**6, size=16, channels=3, progress=False)
    store = open_store(P.prepare(folder, tmp_path / "store", size=16, channels=3, workers=1, progress=False))
    with tarfile.open(out / index["splits"]["test"]["shards"][0]["name"]) as tar:
        for m in tar.getmembers():
            key, ext = m.name.split(".")
            if ext == "png":
                img = decode_chw(tar.extractfile(m).read(), 16, 3)
                assert torch.equal(img.permute(1, 2, 0), torch.from_numpy(np.array(store["test"].images[int(key)])))


def test_command_line_writes_shards_and_refuses_a_foreign_folder(folder, tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["data", "shard", str(folder), str(out), "--shard_size", "30KB", "--no-progress"]) == 0
    assert "train 33 images in" in capsys.readouterr().out and (out / "index.json").is_file()
    # a shard folder is rewritten: the old shards go
    assert main(["data", "shard", str(folder), str(out), "--shard_size", "1MB", "--no-progress"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["index.json", "test-000000.tar", "train-000000.tar"]
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep")
    capsys.readouterr()
    assert main(["data", "shard", str(folder), str(foreign)]) != 0
    err = capsys.readouterr().err
    assert (foreign / "notes.txt").read_text() == "keep" and sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]
    assert "holds no index.json; choose a new or empty folder" in err and len(err.strip().splitlines()) == 1
    assert main(["data", "shard", str(folder), str(tmp_path / "x"), "--shard_size", "lots"]) != 0
    assert "--shard_size lots: not a byte size" in capsys.readouterr().err

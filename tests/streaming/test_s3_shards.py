"""Shards on a real S3-compatible server (moto, loopback): the same images per step for 1, 2 and 3 ranks as the
prepared store of the same folder gives, an exact mid-epoch resume, and faults as one line."""
import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from phalanx.data import prepare as P
from phalanx.data.shard_write import write_shards
from phalanx.data.shards import open_shards
from phalanx.data.store import open_store
from phalanx.errors import DataError
from tests.conftest import run_phalanx
from tests.streaming.conftest import moto_server, s3_env, upload
from tests.unit.data.test_stream_training import make_jpeg_folder

pytestmark = [pytest.mark.streaming, pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")]
SIZE = 16
EXACT = ["--threads_per_rank", "1", "--precision", "fp32", "--deterministic", "true", "--progress", "false",
         "--model.channels_last", "false", "--tune", "false"]
# GroupNorm + GELU: the per-rank batch split changes no maths, so 1, 2 and 3 ranks reach the same weights
COMMON = ["--data.size", str(SIZE), "--model.norm", "group", "--model.act", "gelu", "--model.width", "8",
          "--global_batch", "6", "--optim.lr", "0.05", "--log_samples", "true", "--data.stream_workers", "1",
          "--ckpt.at_epoch_end", "false", *EXACT]


@pytest.fixture(scope="module")
def data(s3, tmp_path_factory):
    _, env = s3
    root = tmp_path_factory.mktemp("s3data")
    folder = make_jpeg_folder(root / "imgs")
    write_shards(folder, root / "shards", shard_size=20_000, progress=False)
    url = upload(env, root / "shards", "phalanx-data", "set")
    store = open_store(P.prepare(folder, root / "store", size=SIZE, channels=3, workers=1, progress=False))
    return folder, url, store


@pytest.fixture
def aws(s3, monkeypatch):
    for k, v in s3[1].items():
        monkeypatch.setenv(k, v)
    return s3[1]


def samples(run_dir, world):
    parts = [[json.loads(x)["idx"] for x in (run_dir / "logs" / f"samples-rank-{k}.jsonl").read_text().splitlines()]
             for k in range(world)]
    return [sum(step, []) for step in zip(*parts)]


def test_every_sample_from_s3_has_the_prepared_stores_pixels(data, aws, tmp_path):
    _, url, store = data
    src = open_shards(url, SIZE, 3, tmp_path / "cache", "1MB", is_main=True)
    for split in ("train", "test"):
        x, y = src[split].__getitems__(list(range(len(store[split]))))
        assert torch.equal(x.permute(0, 2, 3, 1), torch.from_numpy(np.array(store[split].images)))
        assert torch.equal(y, torch.from_numpy(np.array(store[split].labels)).long())
    assert src.cache.fetched() == sum(s.stat().st_size for s in src.cache.root.glob("*.tar"))  # each shard once


def test_one_two_three_ranks_train_on_the_same_images_per_step_from_s3(data, s3, cache_dir, tmp_path):
    _, url, _ = data
    runs = {}
    for world in (1, 2, 3):
        run_dir = tmp_path / f"n{world}"
        r = run_phalanx(["train", "--data", url, "--nproc", world, "--epochs", "2", "--run_dir", run_dir, *COMMON],
                        cache_dir, env_extra=s3[1], timeout=300)
        assert r.returncode == 0, r.stdout + r.stderr
        runs[world] = run_dir
        assert "AWS" not in (run_dir / "config.toml").read_text() and s3[1]["AWS_SECRET_ACCESS_KEY"] not in \
            (run_dir / "config.toml").read_text()
    one = samples(runs[1], 1)
    assert len(one) == 10 and len({i for step in one for i in step}) > 20  # 2 epochs of 5 steps, many images
    for world in (2, 3):
        assert samples(runs[world], world) == one
        w1, ww = load_file(runs[1] / "model.safetensors"), load_file(runs[world] / "model.safetensors")
        for k in w1:
            torch.testing.assert_close(ww[k], w1[k], rtol=1e-5, atol=1e-6, msg=k)
    # `phalanx eval RUN_DIR` reads the test shards from S3 as training's final evaluation did
    r = run_phalanx(["eval", runs[2], "--nproc", "1"], cache_dir, env_extra=s3[1], timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    got, summary = json.loads(r.stdout.strip().splitlines()[-1]), json.loads((runs[2] / "summary.json").read_text())
    assert got["count"] == summary["count"] == 3 and got["correct"] == summary["correct"]
    assert abs(got["loss"] - summary["loss"]) < 1e-5


def test_a_run_stopped_mid_epoch_resumes_from_s3_to_the_same_bits(data, s3, cache_dir, tmp_path):
    _, url, _ = data
    whole = tmp_path / "whole"
    args = ["train", "--data", url, "--nproc", "2", "--epochs", "2", *COMMON]
    r = run_phalanx([*args, "--run_dir", whole], cache_dir, env_extra=s3[1], timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    cut = tmp_path / "cut"  # rank 0 is stopped at step 7: epoch 2, step 2 of 5
    r = run_phalanx([*args, "--run_dir", cut], cache_dir, env_extra={**s3[1], "PHALANX_FAULT": "step:0:7:term"},
                    timeout=300)
    assert r.returncode == 0 and not (cut / "model.safetensors").exists(), r.stdout + r.stderr
    r = run_phalanx([*args, "--run_dir", cut], cache_dir, env_extra=s3[1], timeout=300)
    assert r.returncode == 0 and "resumed from" in r.stdout, r.stdout + r.stderr
    assert samples(cut, 2)[-3:] == samples(whole, 2)[-3:]
    a, b = load_file(whole / "model.safetensors"), load_file(cut / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_missing_object_is_one_line_naming_it(data, aws, tmp_path):
    _, url, _ = data
    import s3fs
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    index = json.loads(fs.cat(url + "/index.json"))
    name = index["splits"]["test"]["shards"][0]["name"]
    src = open_shards(url, SIZE, 3, tmp_path / "cache", "1MB", is_main=True)
    saved = fs.cat(f"{url}/{name}")
    fs.rm(f"{url}/{name}")
    try:
        with pytest.raises(DataError) as e:
            src["test"].__getitems__([0])
    finally:
        fs.pipe(f"{url}/{name}", saved)
    msg = str(e.value)
    assert len(msg.splitlines()) == 1 and f"{url}/{name}: not found" in msg and "upload it again" in msg


def test_refused_credentials_are_one_line(deps, data, cache_dir, tmp_path):
    _, url, _ = data
    # a second server that checks credentials (moto: IAM auth from the first request on): ours are unknown to it
    server = moto_server(tmp_path, {"INITIAL_NO_AUTH_ACTION_COUNT": "0"})
    try:
        env = s3_env(server.url, key="AKIAWRONGKEY0000", secret="nope")
        r = run_phalanx(["train", "--data", url, "--nproc", "1", "--epochs", "1", "--run_dir", tmp_path / "run",
                         *COMMON], cache_dir, env_extra=env, timeout=120)
    finally:
        server.stop()
    assert r.returncode != 0
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and "access refused" in lines[0] and "AWS_ACCESS_KEY_ID" in lines[0], r.stderr
    assert os.environ.get("AWS_SECRET_ACCESS_KEY") != "nope"

"""Training on a streamed ImageFolder (--data.stream): the same batches, evaluation and weights as a
prepared store of the same folder."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from phalanx import config as C
from phalanx.commands import main
from phalanx.data import prepare as P
from phalanx.data.augment import Normalize
from phalanx.data.loader import SplitOnDevice, TrainLoader, eval_chunks
from phalanx.data.sampler import GlobalSampler
from phalanx.data.store import open_store
from phalanx.data.streaming import StreamSplit, StreamTrainLoader, open_folder_stream

pytestmark = pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")

SIZE = 16


def make_jpeg_folder(root: Path, per_class: int = 12, seed: int = 0) -> Path:
    """3 classes of JPEGs and PNGs, 20..90 px a side: some decoded at 1/2 or 1/4 scale at SIZE."""
    rng = np.random.default_rng(seed)
    for c, name in enumerate(("ant", "bee", "cow")):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            h, w = (int(v) for v in rng.integers(20, 91, 2))
            y, x = np.mgrid[0:h, 0:w]
            a = np.stack([x * (3 + c), y * 4, (x + y) * 2], -1) % 256 + rng.integers(0, 40, (h, w, 3))
            im = Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))
            im.save(root / name / (f"{i}.png" if i % 4 == 0 else f"{i}.jpg"), quality=90)
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return make_jpeg_folder(tmp_path_factory.mktemp("stream-train") / "imgs")


@pytest.fixture(scope="module")
def store(folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("stream-store") / "store"
    return open_store(P.prepare(folder, out, size=SIZE, channels=3, workers=1, progress=False))


@pytest.mark.parametrize("world,accum", [(1, 1), (2, 2), (3, 1)])
def test_streamed_batches_equal_the_prepared_loader_for_every_rank_and_a_resume(folder, store, world, accum):
    stream = open_folder_stream(str(folder), SIZE, 3, workers=1)
    assert stream.classes == store.classes and stream.shape == store.shape
    assert stream.mean == store.mean and stream.std == store.std  # whole train split sampled: equal stats
    aug = C.AugmentConfig(crop_pad=2, flip=True, cutout=3)
    norm = Normalize(store.mean, store.std, torch.device("cpu"), channels_last=True)
    for rank in range(world):
        sampler = GlobalSampler(len(store["train"]), 6, seed=5, world=world, rank=rank, accum=accum)
        prepared = TrainLoader(store["train"], sampler, aug, norm, torch.device("cpu"), seed=5)
        streamed = StreamTrainLoader(stream["train"], sampler, aug, norm, torch.device("cpu"), seed=5, workers=2)
        assert len(streamed) == len(prepared)
        for epoch, start in ((1, 0), (2, 2)):  # (2, 2): resumed mid-epoch
            a, b = list(prepared.epoch(epoch, start)), list(streamed.epoch(epoch, start))
            assert len(a) == len(b) == (sampler.steps - start) * accum
            for p, s in zip(a, b):
                assert (p.step, p.micro) == (s.step, s.micro) and p.idx.tolist() == s.idx.tolist()
                torch.testing.assert_close(s.x, p.x, atol=0, rtol=0)
                assert s.y.tolist() == p.y.tolist()


def test_streamed_eval_split_gathers_the_prepared_pixels(folder, store):
    stream = open_folder_stream(str(folder), SIZE, 3, workers=1)
    test = store["test"]
    streamed, prepared = StreamSplit(stream["test"], torch.device("cpu"), workers=1, batch=2), \
        SplitOnDevice(test, torch.device("cpu"), resident=False)
    assert len(streamed.split) == len(test)
    for _, lo, hi in eval_chunks(len(test), 2, 1, 0):
        (xs, ys), (xp, yp) = streamed.gather(torch.arange(lo, hi)), prepared.gather(torch.arange(lo, hi))
        torch.testing.assert_close(xs, xp, atol=0, rtol=0)
        assert ys.tolist() == yp.tolist()


def _train(folder, tmp_path, name, *extra):
    argv = ["train", "--data", str(folder), "--data.size", str(SIZE), "--nproc", "1", "--epochs", "2",
            "--global_batch", "8", "--model.width", "8", "--precision", "fp32", "--deterministic", "true",
            "--progress", "false", "--model.channels_last", "false", "--threads_per_rank", "1",
            "--ckpt.at_epoch_end", "false", "--eval_batch", "2", "--log_samples", "true",
            "--data.cache_dir", str(tmp_path / "cache"), "--run_dir", str(tmp_path / name), *extra]
    assert main(argv) == 0
    return tmp_path / name


def test_streamed_run_ends_with_the_weights_of_the_prepared_run(folder, tmp_path):
    prepared = _train(folder, tmp_path, "prepared")
    streamed = _train(folder, tmp_path, "streamed", "--data.stream", "true", "--data.stream_workers", "2")
    samples = [(r / "logs" / "samples-rank-0.jsonl").read_text() for r in (prepared, streamed)]
    assert samples[0] == samples[1] and samples[0].count("\n") == 2 * 4  # 32 train images / 8: 4 steps
    wp, ws = load_file(prepared / "model.safetensors"), load_file(streamed / "model.safetensors")
    for k in wp:
        torch.testing.assert_close(ws[k], wp[k], atol=0, rtol=0, msg=k)
    sp, ss = (json.loads((r / "summary.json").read_text()) for r in (prepared, streamed))
    assert (ss["loss"], ss["correct"], ss["count"]) == (sp["loss"], sp["correct"], sp["count"])
    mp, ms = (json.loads((r / "model.json").read_text()) for r in (prepared, streamed))
    assert ms == mp  # classes, size, mean/std for export and predict


def test_eval_of_a_streamed_run_of_a_grayscale_folder_uses_its_channels(tmp_path, capsys):
    gray = tmp_path / "gray"
    for c in ("a", "b"):
        (gray / c).mkdir(parents=True)
        for i in range(10):
            Image.fromarray(np.full((20, 20), 12 * i + (120 if c == "b" else 0), np.uint8)).save(gray / c / f"{i}.png")
    run = _train(gray, tmp_path, "streamed", "--data.stream", "true", "--data.stream_workers", "1")
    assert "channels = 3" in (run / "config.toml").read_text()  # streaming reads RGB unless told
    capsys.readouterr()
    assert main(["eval", str(run), "--nproc", "1", "--data.cache_dir", str(tmp_path / "cache")]) == 0
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    summary = json.loads((run / "summary.json").read_text())
    assert (got["correct"], got["count"]) == (summary["correct"], summary["count"])


@pytest.mark.parametrize("extra,needle", [
    (["--data.stream", "true"], "data.size=0: --data.stream needs the image side"),
    (["--data.stream", "true", "--data.size", "8", "--data", "STORE"], "this is not an ImageFolder"),
    (["--data.size", "8", "--data", "STORE"], "--data.size 8: --data STORE is a prepared store"),
    (["--data.channels", "2"], "data.channels=2: must be 1"),
])
def test_bad_stream_options_are_one_clear_line(store, tmp_path, capsys, extra, needle):
    argv = ["train", "--nproc", "1", "--out_dir", str(tmp_path / "runs")]
    argv += [str(store.path) if a == "STORE" else a for a in extra]
    assert main(argv) in (1, 2)
    err = capsys.readouterr().err
    assert needle.replace("STORE", str(store.path)) in err and err.count("\n") == 1, err
    assert not (tmp_path / "runs").exists()


def test_unreadable_file_stops_a_streamed_run_naming_it(folder, tmp_path, capsys):
    import shutil
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    for k in range(12):  # every file of one class: whichever the sample or the first batch reads first
        (bad / "cow" / f"{k}.{'png' if k % 4 == 0 else 'jpg'}").write_bytes(b"\xff\xd8\xff\xe0" + b"\x13" * 50)
    code = main(["train", "--data", str(bad), "--data.stream", "true", "--data.size", "8", "--nproc", "1",
                 "--progress", "false", "--run_dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 1 and "cow" in err and "cannot decode" in err and err.count("\n") == 1, err

"""Streaming path: the same pixels as a prepared store, in the global order, uint8 out."""
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from phalanx.data import prepare as P
from phalanx.data.imageio import decode_chw, fit
from phalanx.data.sampler import GlobalSampler
from phalanx.data.store import open_store
from phalanx.data.streaming import (
    CudaJpegLoader,
    ImageFolderStream,
    RankOrder,
    decode_jpeg_batch_cuda,
    fit_by_shape,
    streaming_loader,
)
from phalanx.errors import DataError
from tests.unit.data.test_prepare import make_imagefolder

pytestmark = pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")


@pytest.fixture
def clean_folder(tmp_path):
    """The messy test folder without its two unreadable files."""
    root = make_imagefolder(tmp_path / "src")
    (root / "cat" / "corrupt.jpg").unlink()
    (root / "dog" / "zero.png").unlink()
    # Large enough to be decoded at 1/4 scale at size 16: prepared and streamed must still agree.
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (70, 90, 3), dtype=np.uint8)).save(
        root / "owl" / "large.jpg", quality=90)
    return root


def test_streamed_items_equal_the_prepared_store(clean_folder, tmp_path):
    store = open_store(P.prepare(clean_folder, tmp_path / "store", size=16, channels=3, workers=1, progress=False))
    for split in ("train", "test"):
        ds = ImageFolderStream(clean_folder, 16, 3, split=split)
        assert len(ds) == len(store[split]) and ds.classes == store.classes
        for i in range(len(ds)):
            x, y = ds[i]
            assert x.dtype == torch.uint8 and x.shape == (3, 16, 16)
            np.testing.assert_array_equal(x.permute(1, 2, 0).numpy(), store[split].images[i])
            assert y == store[split].labels[i]
    assert len(ImageFolderStream(clean_folder, 16, 3, split="all")) == sum(len(s) for s in store.splits.values())


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_yields_uint8_batches_in_the_sampler_order(clean_folder, workers):
    ds = ImageFolderStream(clean_folder, 12, 1)
    order = list(range(len(ds)))[::-1]
    loader = streaming_loader(clean_folder, 12, 1, batch=4, workers=workers, sampler_indices=order, dataset=ds)
    xs, ys = [], []
    for x, y in loader:
        assert x.dtype == torch.uint8 and x.shape[1:] == (1, 12, 12) and y.dtype == torch.int64
        xs.append(x)
        ys.append(y)
    x, y = torch.cat(xs), torch.cat(ys)
    assert len(x) == len(ds)
    for k in (0, 5, len(ds) - 1):
        torch.testing.assert_close(x[k], decode_chw(ds.files[order[k]], 12, 1), atol=0, rtol=0)
    assert y.tolist() == [int(ds.labels[i]) for i in order]


@pytest.mark.parametrize("world", [1, 2, 3])
def test_rank_order_gives_each_rank_its_part_of_every_global_batch(world):
    n, gb = 50, 12
    per_step: dict[int, set] = {}
    for rank in range(world):
        order = RankOrder(GlobalSampler(n, gb, seed=3, world=world, rank=rank))
        order.set_epoch(2)
        idx = list(order)
        assert len(idx) == len(order)
        for k in range(0, len(idx), order.batch_size):
            per_step.setdefault(k // order.batch_size, set()).update(idx[k:k + order.batch_size])
    full = GlobalSampler(n, gb, seed=3)
    for step, _, idx in full.epoch(2):
        assert per_step[step] == set(idx.tolist())


def test_unreadable_file_names_itself(tmp_path):
    root = make_imagefolder(tmp_path / "src")
    ds = ImageFolderStream(root, 8, 3, split="all")
    bad = next(i for i, f in enumerate(ds.files) if f.endswith("corrupt.jpg"))
    with pytest.raises(DataError, match="corrupt.jpg"):
        ds[bad]
    with pytest.raises(DataError, match="no split"):
        ImageFolderStream(root, 8, 3, split="val")


def test_encoded_items_are_the_file_bytes(clean_folder):
    ds = ImageFolderStream(clean_folder, 8, 3, encoded=True)
    data, _ = ds[0]
    assert data.dtype == torch.uint8 and bytes(data.numpy()) == Path(ds.files[0]).read_bytes()


@pytest.mark.parametrize("channels", [3, 1])
def test_fitting_stacks_of_same_shape_gives_each_images_own_pixels(channels, monkeypatch):
    """The GPU decoder resizes each shape's images as one stack (in parts of at most FIT_STACK_VALUES values):
    every image, whatever its shape, its index and its stack, comes out as `fit` of it alone."""
    import phalanx.data.streaming as S
    monkeypatch.setattr(S, "FIT_STACK_VALUES", 3 * 40 * 30 * 2)  # two 40 x 30 images a stack
    g = torch.Generator().manual_seed(0)
    shapes = [(40, 30), (20, 20), (40, 30), (30, 40), (40, 30), (20, 20), (40, 30), (40, 30), (16, 16)]
    images = [(i * 3 + 1, torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8))
              for i, (h, w) in enumerate(shapes)]
    got = dict(fit_by_shape(images, 16, channels))
    assert sorted(got) == [i for i, _ in images]
    for i, img in images:
        want = fit(img, 16, channels)
        assert got[i].shape == (channels, 16, 16) and torch.equal(got[i], want), i


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_gpu_decode_refuses_without_cuda():
    with pytest.raises(RuntimeError, match="CUDA"):
        decode_jpeg_batch_cuda([torch.zeros(4, dtype=torch.uint8)], 8, 3, "cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (nvJPEG)")
def test_gpu_decode_matches_cpu_closely(clean_folder):
    loader = CudaJpegLoader(clean_folder, 16, 3, batch=8, workers=0, device="cuda")
    ds = ImageFolderStream(clean_folder, 16, 3)
    x, y = next(iter(loader))
    assert x.is_cuda and x.dtype == torch.uint8 and x.shape == (8, 3, 16, 16)
    for i in range(8):
        diff = (x[i].cpu().int() - ds[i][0].int()).abs().float().mean()
        assert diff < 3

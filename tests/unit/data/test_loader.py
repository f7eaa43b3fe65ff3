"""Loader and device augmentation: exactly-once epochs across ranks, reproducible augmentation."""
import numpy as np
import pytest
import torch

from phalanx.config import AugmentConfig
from phalanx.data.augment import AugmentParams, Normalize, augment_uint8, draw_params
from phalanx.data.loader import TrainLoader
from phalanx.data.sampler import GlobalSampler
from phalanx.data.store import Split


def indexed_split(n: int, h: int = 6, w: int = 6) -> Split:
    """Image i is filled with i % 251 + 1 (never 0), its label is i: batches reveal their indices."""
    images = np.broadcast_to(((np.arange(n) % 251) + 1).astype(np.uint8)[:, None, None, None], (n, h, w, 1)).copy()
    return Split(images, np.arange(n, dtype=np.int64))


def loader(split, gb, world, rank, accum=1, aug=None, seed=0):
    s = GlobalSampler(len(split), gb, seed, world=world, rank=rank, accum=accum)
    norm = Normalize([0.0], [1 / 255], torch.device("cpu"), channels_last=False)  # x -> x (as float)
    return TrainLoader(split, s, aug or AugmentConfig(crop_pad=0, flip=False), norm, torch.device("cpu"), seed,
                       prefetch=False)


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("accum", [1, 2])
def test_every_index_of_an_epoch_is_seen_once_across_ranks(world, accum):
    n, gb = 101, 12  # 101 = 8 steps of 12 + a dropped tail of 5
    split = indexed_split(n)
    seen, per_step = [], {}
    for rank in range(world):
        for b in loader(split, gb, world, rank, accum).epoch(epoch=1):
            ids = b.y.tolist()
            assert (b.x[:, 0, 0, 0] == torch.tensor([i % 251 + 1 for i in ids], dtype=torch.float32)).all()
            seen += ids
            per_step.setdefault(b.step, []).extend(ids)
    steps = n // gb
    assert len(seen) == len(set(seen)) == steps * gb  # nothing twice, only the tail missing
    assert set(per_step) == set(range(steps)) and all(len(v) == gb for v in per_step.values())
    one = {b.step: set(b.y.tolist()) for b in loader(split, gb, 1, 0).epoch(epoch=1)}
    assert {k: set(v) for k, v in per_step.items()} == one  # same samples per step for any world size


def test_resume_mid_epoch_continues_the_same_order():
    split = indexed_split(60)
    full = [b.y.tolist() for b in loader(split, 10, 1, 0).epoch(3)]
    resumed = [b.y.tolist() for b in loader(split, 10, 1, 0).epoch(3, start_step=2)]
    assert resumed == full[2:]
    assert full != [b.y.tolist() for b in loader(split, 10, 1, 0).epoch(4)]


def test_augmentation_is_independent_of_world_size_and_accumulation():
    rng = np.random.default_rng(0)
    split = Split(rng.integers(0, 256, (48, 8, 8, 3), dtype=np.uint8), np.arange(48, dtype=np.int64))
    aug = AugmentConfig(crop_pad=2, flip=True, cutout=3)

    def per_sample(world, accum):
        out = {}
        for rank in range(world):
            for b in loader(split, 12, world, rank, accum, aug=aug, seed=5).epoch(2):
                out.update({int(i): x for i, x in zip(b.y, b.x)})
        return out

    ref = per_sample(1, 1)
    for world, accum in ((2, 1), (3, 1), (3, 2), (2, 3)):
        got = per_sample(world, accum)
        assert got.keys() == ref.keys()
        assert all(torch.equal(got[k], ref[k]) for k in ref)


def test_draw_params_are_a_function_of_seed_epoch_step():
    cfg = AugmentConfig(crop_pad=4, flip=True, cutout=5)
    a = draw_params(cfg, 64, 32, 32, seed=1, epoch=2, step=3)
    b = draw_params(cfg, 64, 32, 32, seed=1, epoch=2, step=3)
    for f in ("dy", "dx", "flip", "cut_y", "cut_x"):
        assert torch.equal(getattr(a, f), getattr(b, f))
    for other in (dict(seed=2, epoch=2, step=3), dict(seed=1, epoch=3, step=3), dict(seed=1, epoch=2, step=4)):
        c = draw_params(cfg, 64, 32, 32, **other)
        assert not (torch.equal(a.dx, c.dx) and torch.equal(a.dy, c.dy) and torch.equal(a.flip, c.flip))
    assert a.dy.min() >= 0 and a.dy.max() <= 8 and a.flip.any() and (~a.flip).any()


def numpy_translate_flip(img: np.ndarray, p: int, dy: int, dx: int, flip: bool) -> np.ndarray:
    """The definition: zero-pad by p, crop the HxW window at (dy, dx), then mirror left-right."""
    c, h, w = img.shape
    padded = np.zeros((c, h + 2 * p, w + 2 * p), img.dtype)
    padded[:, p:p + h, p:p + w] = img
    out = padded[:, dy:dy + h, dx:dx + w]
    return out[:, :, ::-1] if flip else out


def test_translated_and_flipped_image_matches_the_hand_computed_result():
    img = np.arange(1, 1 + 2 * 4 * 5, dtype=np.uint8).reshape(2, 4, 5)
    cfg = AugmentConfig(crop_pad=2, flip=True, cutout=0)
    params = AugmentParams(dy=torch.tensor([0, 3, 2]), dx=torch.tensor([4, 1, 2]), flip=torch.tensor([True, False, True]),
                           cut_y=torch.zeros(3, dtype=torch.long), cut_x=torch.zeros(3, dtype=torch.long))
    x = torch.from_numpy(np.stack([img] * 3))
    got = augment_uint8(x, cfg, params).numpy()
    # Case 0 by hand (p=2, dy=0, dx=4, flip): the crop reads crop[r, c] = img[r - 2, c + 2]; the mirror
    # reads out[r, c] = crop[r, 4 - c] = img[r - 2, 6 - c]. Rows 0-1 and columns 0-1 fall in the padding.
    hand = np.zeros((2, 4, 5), np.uint8)
    for r in range(2, 4):
        for c in range(2, 5):
            hand[:, r, c] = img[:, r - 2, 6 - c]
    np.testing.assert_array_equal(got[0], hand)
    for i in range(3):
        want = numpy_translate_flip(img, 2, int(params.dy[i]), int(params.dx[i]), bool(params.flip[i]))
        np.testing.assert_array_equal(got[i], want)


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5])
def test_cutout_zeroes_a_k_by_k_square(k):
    x = torch.full((1, 1, 12, 12), 200, dtype=torch.uint8)
    cfg = AugmentConfig(crop_pad=0, flip=False, cutout=k)
    params = AugmentParams(dy=torch.zeros(1, dtype=torch.long), dx=torch.zeros(1, dtype=torch.long),
                           flip=torch.zeros(1, dtype=torch.bool), cut_y=torch.tensor([6]), cut_x=torch.tensor([5]))
    out = augment_uint8(x, cfg, params)[0, 0]
    zero = (out == 0).nonzero()
    assert len(zero) == k * k
    assert zero[:, 0].min() == 6 - k // 2 and zero[:, 1].min() == 5 - k // 2
    corner = AugmentParams(params.dy, params.dx, params.flip, torch.tensor([0]), torch.tensor([11]))
    # rows [-k//2, k - k//2) and columns [11 - k//2, 11 - k//2 + k) clipped to the image
    assert (augment_uint8(x, cfg, corner) == 0).sum() == (k - k // 2) * (k // 2 + 1)


def test_normalize_is_channels_last_and_exact():
    x = torch.randint(0, 256, (2, 3, 5, 5), dtype=torch.uint8)
    n = Normalize([0.5, 0.4, 0.3], [0.2, 0.25, 0.3], torch.device("cpu"), channels_last=True)
    y = n(x)
    assert y.is_contiguous(memory_format=torch.channels_last)
    want = (x.float() / 255 - torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1)) / torch.tensor([0.2, 0.25, 0.3]).view(
        1, 3, 1, 1)
    torch.testing.assert_close(y, want, atol=1e-5, rtol=1e-5)


def test_a_read_only_store_goes_to_the_device_without_a_warning():
    """A store's memmap is read-only; torch warned about it on every GPU run's console (torch 2.11, H100)."""
    import warnings

    import numpy as np
    import torch

    from phalanx.data.loader import resident_copy
    a = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    a.setflags(write=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        t = resident_copy(a, torch.device("cpu"))
    assert t.dtype == torch.uint8 and t.tolist() == a.tolist()

"""The augmentations for larger images (crop, RandomResizedCrop, TrivialAugment, erasing, mixup/CutMix):
the same pixels and targets for 1, 2 and 3 ranks and on resume; the default path as it was."""
import hashlib

import numpy as np
import pytest
import torch

from phalanx.config import AugmentConfig
from phalanx.data.augment import Normalize, augment_uint8, draw_params
from phalanx.data.loader import TrainLoader
from phalanx.data.sampler import GlobalSampler
from phalanx.data.store import Split
from phalanx.errors import ConfigError

ALL_ON = AugmentConfig(crop_pad=2, flip=True, cutout=3, crop_size=12, rrc=True, trivial_augment=True, erase=0.5,
                       mixup=0.4, cutmix=1.0)


@pytest.fixture(autouse=True)
def one_thread():
    # The arithmetic must not depend on how many samples a kernel sees: pin threads like the ranks do.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def random_split(n=72, side=16, channels=3, seed=0) -> Split:
    rng = np.random.default_rng(seed)
    return Split(rng.integers(0, 256, (n, side, side, channels), dtype=np.uint8), np.arange(n, dtype=np.int64) % 10)


def loader(split, gb, world, rank, accum=1, aug=ALL_ON, seed=3):
    s = GlobalSampler(len(split), gb, seed, world=world, rank=rank, accum=accum)
    norm = Normalize([0.4, 0.5, 0.6], [0.2, 0.25, 0.3], torch.device("cpu"), channels_last=True)
    return TrainLoader(split, s, aug, norm, torch.device("cpu"), seed, prefetch=False)


def per_sample(split, gb, world, accum, epoch=1, start_step=0, aug=ALL_ON):
    """{(step, dataset index): (pixels, label, partner label, lambda)} over all ranks of `world`."""
    out = {}
    for rank in range(world):
        for b in loader(split, gb, world, rank, accum, aug).epoch(epoch, start_step):
            assert b.x.shape[1:] == (3, 12, 12) and b.x.is_contiguous(memory_format=torch.channels_last)
            for k, i in enumerate(b.idx.tolist()):
                out[(b.step, i)] = (b.x[k], int(b.y[k]), int(b.y_b[k]), float(b.lam[k]))
    return out


def assert_same(a: dict, b: dict):
    assert a.keys() == b.keys()
    for key in a:
        xa, ya, yba, la = a[key]
        xb, yb, ybb, lb = b[key]
        assert torch.equal(xa, xb), f"pixels of sample {key} differ"
        assert (ya, yba, la) == (yb, ybb, lb), f"targets of sample {key} differ"


def test_extra_augmentation_is_identical_for_1_2_3_ranks_and_accumulation():
    split = random_split()
    gb = 24  # a multiple of 2 x ranks x grad_accum for every layout below: no pair is cut
    one = per_sample(split, gb, 1, 1)
    assert len(one) == 3 * gb
    # the draws really vary: mixing of both kinds and erasing happened, pairs have distinct lambdas
    lams = {v[3] for v in one.values()}
    assert len(lams) > 10 and all(0.0 <= v <= 1.0 for v in lams)
    assert any(v[1] != v[2] for v in one.values())  # some pair mixes two classes
    for world, accum in ((2, 1), (3, 1), (2, 2), (3, 2)):
        assert_same(one, per_sample(split, gb, world, accum))


def test_extra_augmentation_replays_on_resume_and_changes_with_the_epoch():
    split = random_split()
    full = per_sample(split, 24, 2, 1, epoch=4)
    resumed = per_sample(split, 24, 2, 1, epoch=4, start_step=2)
    assert_same({k: v for k, v in full.items() if k[0] >= 2}, resumed)
    other = per_sample(split, 24, 2, 1, epoch=5)
    assert not all(torch.equal(full[k][0], other[k][0]) for k in full.keys() & other.keys())


@pytest.mark.parametrize("aug", [
    AugmentConfig(crop_size=12),                                   # random crops of the padded image
    AugmentConfig(crop_size=12, rrc=True, flip=False),             # geometry alone
    AugmentConfig(crop_size=20, rrc=True, cutout=4),               # RandomResizedCrop enlarging 16 -> 20
    AugmentConfig(trivial_augment=True, crop_pad=0),               # colour/geometric ops at the stored side
    AugmentConfig(crop_size=12, erase=1.0),                        # erasing alone
], ids=["crop", "rrc", "rrc-enlarging", "trivial", "erase"])
def test_each_augmentation_alone_is_world_size_independent(aug):
    split = random_split(48)

    def parts(world):
        out = {}
        for rank in range(world):
            for b in loader(split, 12, world, rank, 1, aug).epoch(0):
                assert b.lam is None and b.y_b is None  # no mixing: plain labels, the default loss
                out.update({(b.step, i): b.x[k] for k, i in enumerate(b.idx.tolist())})
        return out

    one = parts(1)
    for world in (2, 3):
        got = parts(world)
        assert got.keys() == one.keys() and all(torch.equal(got[k], one[k]) for k in one)


def test_default_path_is_bit_identical_to_before():
    # sha256 of augment_uint8's output for these draws, computed with the code before the larger-image
    # augmentations were added (git d19d0ff): the default path must not move by one pixel.
    rng = np.random.default_rng(7)
    x = torch.from_numpy(rng.integers(0, 256, (24, 20, 20, 3), dtype=np.uint8)).permute(0, 3, 1, 2)
    h = hashlib.sha256()
    for cfg in (AugmentConfig(), AugmentConfig(crop_pad=4, flip=True, cutout=6), AugmentConfig(crop_pad=0, flip=False)):
        for step in range(3):
            h.update(augment_uint8(x, cfg, draw_params(cfg, 24, 20, 20, 5, 2, step)).contiguous().numpy().tobytes())
    assert h.hexdigest() == "1d5e44d78ffc03dcdd0b77342b526964fcca7ea2df980c7145048a77c21f7713"


def test_default_loader_batches_are_the_gather_alone():
    split = random_split(48)
    aug = AugmentConfig()
    norm = Normalize([0.4, 0.5, 0.6], [0.2, 0.25, 0.3], torch.device("cpu"), channels_last=True)
    for b in loader(split, 12, 2, 1, 1, aug).epoch(2):
        assert b.y_b is None and b.lam is None
        x = torch.from_numpy(split.images[b.idx.numpy()]).permute(0, 3, 1, 2)
        p = draw_params(aug, 12, 16, 16, 3, 2, b.step).slice(6, 12)  # rank 1 of 2 holds the second half
        assert torch.equal(b.x, norm(augment_uint8(x, aug, p)))


def test_a_layout_that_would_cut_a_mixing_pair_is_one_line():
    split = random_split(300)
    with pytest.raises(ConfigError) as e:
        loader(split, 256, 3, 0)  # parts of 85, 85, 86 images
    msg = str(e.value)
    assert "\n" not in msg and "global_batch=256" in msg and "85, 85, 86" in msg and "multiple of 6" in msg
    loader(split, 252, 3, 0)  # parts of 84: accepted
    loader(split, 256, 3, 0, aug=AugmentConfig(crop_size=12, rrc=True))  # no mixing: any layout

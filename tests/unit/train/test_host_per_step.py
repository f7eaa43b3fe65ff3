"""Host work per step: the augmentation draws cross to the device in one packed copy, and come back equal."""
import torch

from phalanx.config import AugmentConfig
from phalanx.data.augment import augment_uint8, draw_params, draws_to


def test_draws_cross_in_one_packed_copy_and_arrive_equal():
    cfg = AugmentConfig(crop_pad=2, flip=True, cutout=8)
    params = draw_params(cfg, 64, 28, 28, seed=3, epoch=1, step=5).slice(16, 48)
    copies = []

    def copy(t, device):  # stands in for the pinned, non-blocking host-to-device copy of a GPU
        copies.append(t.shape)
        return t.clone()

    moved = draws_to(params, torch.device("cpu"), copy=copy)
    assert copies == [torch.Size([5, 32])]  # dy, dx, flip, cut_y, cut_x: one transfer
    for name in ("dy", "dx", "flip", "cut_y", "cut_x"):
        a, b = getattr(params, name), getattr(moved, name)
        assert a.dtype == b.dtype and torch.equal(a, b), name
    x = torch.randint(0, 256, (32, 1, 28, 28), dtype=torch.uint8)
    assert torch.equal(augment_uint8(x, cfg, moved), augment_uint8(x, cfg, params))


def test_on_the_host_the_draws_are_not_copied():
    params = draw_params(AugmentConfig(), 8, 28, 28, seed=0, epoch=0, step=0)
    assert draws_to(params, torch.device("cpu")) is params

"""Mixup and CutMix: soft targets that sum to 1, CutMix's lambda equal to the pasted area, the mixed loss
equal to the dense-target cross-entropy; and the one-line refusals of the new augment settings."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from phalanx.config import AugmentConfig, Config
from phalanx.data.augment import Normalize, augment_extra, draw_extra, draw_params
from phalanx.errors import ConfigError
from phalanx.tools.checks import check_config
from phalanx.train.step import mixed_cross_entropy


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny batches: threads only contend with the other tests' processes
    yield
    torch.set_num_threads(before)


IDENT = Normalize([0.0], [1 / 255], torch.device("cpu"), False)  # x -> x as float


def constant_images(b=32, side=16) -> torch.Tensor:
    """Image i is filled with the value 3 i + 1: every pixel tells which image it came from."""
    return (torch.arange(b, dtype=torch.uint8) * 3 + 1)[:, None, None, None].expand(b, 1, side, side).contiguous()


def mixed(cfg: AugmentConfig, step: int, b=32, side=16):
    x, y = constant_images(b, side), torch.arange(b) % 7
    extra = draw_extra(cfg, b, side, side, 11, 0, step)
    out, y_b, lam = augment_extra(x, y, cfg, draw_params(cfg, b, side, side, 11, 0, step), extra, IDENT)
    return x, y, out, y_b, lam, extra


def test_mixup_targets_sum_to_one_and_pixels_are_the_same_blend():
    cfg = AugmentConfig(crop_pad=0, flip=False, mixup=0.4)
    for step in range(5):
        x, y, out, y_b, lam, extra = mixed(cfg, step)
        assert extra.mix_kind == "mixup"
        assert torch.equal(y_b, y.view(-1, 2).flip(1).reshape(-1))  # partners are the pairs (2i, 2i+1)
        assert torch.equal(lam[0::2], lam[1::2]) and ((lam >= 0) & (lam <= 1)).all()
        target = lam[:, None] * F.one_hot(y, 7) + (1 - lam[:, None]) * F.one_hot(y_b, 7)
        torch.testing.assert_close(target.sum(1), torch.ones(32, dtype=target.dtype))
        partner = x.view(16, 2, 1, 16, 16).flip(1).reshape(32, 1, 16, 16).float()
        want = lam[:, None, None, None] * x.float() + (1 - lam[:, None, None, None]) * partner
        torch.testing.assert_close(out, want, rtol=0, atol=1e-4)
    # Beta(0.4, 0.4) puts most pairs near 0 or 1 and some in between
    lams = torch.cat([mixed(cfg, s)[4] for s in range(20)])
    assert (lams < 0.1).float().mean() > 0.12 and (lams > 0.9).float().mean() > 0.12  # 0.24 each in theory
    assert ((lams > 0.3) & (lams < 0.7)).any()


def test_cutmix_lambda_is_the_kept_area_of_the_pasted_box():
    cfg = AugmentConfig(crop_pad=0, flip=False, cutmix=1.0)
    pasted_any = False
    for step in range(8):
        x, y, out, y_b, lam, extra = mixed(cfg, step)
        assert extra.mix_kind == "cutmix"
        own = out == x.float()
        other = out == x.view(16, 2, 1, 16, 16).flip(1).reshape(32, 1, 16, 16).float()
        assert (own | other).all() and not (own & other).any()  # every pixel is its own or its partner's
        kept = own.float().mean((1, 2, 3))
        torch.testing.assert_close(lam, kept, rtol=0, atol=1e-6)  # lambda = the area actually kept
        target = lam[:, None] * F.one_hot(y, 7) + (1 - lam[:, None]) * F.one_hot(y_b, 7)
        torch.testing.assert_close(target.sum(1), torch.ones(32, dtype=target.dtype))
        pasted_any |= bool((kept < 1).any())
        # the pasted region is one rectangle
        for i in range(0, 32, 5):
            rows, cols = other[i, 0].any(1).nonzero()[:, 0], other[i, 0].any(0).nonzero()[:, 0]
            if len(rows):
                assert other[i, 0, rows.min():rows.max() + 1, cols.min():cols.max() + 1].all()
    assert pasted_any


def test_with_both_each_global_batch_picks_one():
    cfg = AugmentConfig(crop_pad=0, flip=False, mixup=0.8, cutmix=1.0)
    kinds = [draw_extra(cfg, 16, 8, 8, 0, 0, s).mix_kind for s in range(60)]
    assert 15 < kinds.count("cutmix") < 45 and kinds.count("cutmix") + kinds.count("mixup") == 60


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_mixed_loss_is_the_dense_target_cross_entropy(smoothing):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(12, 5, generator=g)
    y, y_b = torch.randint(0, 5, (12,), generator=g), torch.randint(0, 5, (12,), generator=g)
    lam = torch.rand(12, generator=g)
    dense = lam[:, None] * F.one_hot(y, 5) + (1 - lam[:, None]) * F.one_hot(y_b, 5)
    want = F.cross_entropy(logits, dense, reduction="sum", label_smoothing=smoothing)
    torch.testing.assert_close(mixed_cross_entropy(logits, y, y_b, lam, smoothing), want)
    # lam = 1: the plain loss
    torch.testing.assert_close(mixed_cross_entropy(logits, y, y_b, torch.ones(12), smoothing),
                               F.cross_entropy(logits, y, reduction="sum", label_smoothing=smoothing))


@pytest.mark.parametrize("args,key", [
    (dict(rrc=True), "augment.rrc"),
    (dict(crop_size=-1), "augment.crop_size"),
    (dict(crop_size=32, rrc=True, rrc_min_scale=0.0), "augment.rrc_min_scale"),
    (dict(crop_size=32, rrc=True, rrc_min_scale=1.5), "augment.rrc_min_scale"),
    (dict(eval_crop=0.0), "augment.eval_crop"),
    (dict(eval_crop=1.2), "augment.eval_crop"),
    (dict(erase=1.5), "augment.erase"),
    (dict(erase=-0.1), "augment.erase"),
    (dict(mixup=-0.2), "augment.mixup"),
    (dict(cutmix=-1.0), "augment.cutmix"),
])
def test_bad_augment_values_are_one_line_naming_the_field(args, key):
    with pytest.raises(ConfigError) as e:
        Config(augment=AugmentConfig(**args)).validate()
    msg = str(e.value)
    assert msg.startswith(f"{key}=") and "\n" not in msg


def test_the_new_fields_are_off_by_default_and_valid():
    a = AugmentConfig()
    assert (a.crop_size, a.rrc, a.trivial_augment, a.erase, a.mixup, a.cutmix) == (0, False, False, 0.0, 0.0, 0.0)
    Config(augment=AugmentConfig(crop_size=24, rrc=True, trivial_augment=True, erase=0.25, mixup=0.2,
                                 cutmix=1.0)).validate()


def test_a_mixing_layout_that_cuts_pairs_is_refused_before_any_rank_starts():
    check_config(Config(global_batch=30, augment=AugmentConfig(mixup=0.2)).validate())  # nproc auto: ranks check
    cfg = Config(global_batch=30, augment=AugmentConfig(cutmix=1.0))
    cfg.parallel.nproc = "2"
    with pytest.raises(ConfigError) as e:
        check_config(cfg.validate())
    assert str(e.value).startswith("global_batch=30 (grad_accum=1) splits into parts of 15, 15 images over 2 rank")
    assert "multiple of 4" in str(e.value) and "e.g. 28" in str(e.value)
    cfg.global_batch = 28
    check_config(cfg.validate())


def test_crops_the_store_cannot_give_are_one_line(tmp_path):
    from phalanx.data.store import Split
    from phalanx.train.setup import check_data

    class Store:  # the parts of a prepared store check_data reads
        path, shape, classes, splits = tmp_path, (16, 16, 1), ["a", "b"], {"train": 0, "test": 0}
        manifest = {"source": str(tmp_path), "options": {"kind": "idx"}}

        def __getitem__(self, name):
            return Split(np.zeros((8, 16, 16, 1), np.uint8), np.arange(8) % 2)

    def check(**aug):
        check_data(Config(global_batch=4, augment=AugmentConfig(**aug)), Store())

    check(crop_size=12)  # a smaller random crop
    check(crop_size=32, rrc=True)  # RandomResizedCrop may enlarge
    with pytest.raises(ConfigError, match=r"^augment.crop_size=32: larger than the 16x16 images") as e:
        check(crop_size=32)
    assert "\n" not in str(e.value) and "--augment.rrc true" in str(e.value)
    with pytest.raises(ConfigError, match=r"^augment.cutout=14: larger than the 12x12 crops"):
        check(crop_size=12, cutout=14)

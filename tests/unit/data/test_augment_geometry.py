"""RandomResizedCrop boxes and pixels, TrivialAugment's ops, random erasing and evaluation's centre crop,
checked against their definitions and against torchvision's own transforms."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from phalanx.config import AugmentConfig
from phalanx.data import geometry
from phalanx.data.augment import Normalize, augment_extra, draw_extra, draw_params


def images(b=4, c=3, h=16, w=16, seed=0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (b, c, h, w), dtype=np.uint8))


def test_rrc_boxes_lie_inside_the_image_with_torchvisions_scale_and_ratio():
    g = torch.Generator().manual_seed(0)
    h = w = 64
    boxes = geometry.rrc_boxes(g, 20000, h, w, 0.08)
    top, left, bh, bw = boxes.unbind(1)
    assert (top >= 0).all() and (left >= 0).all() and (bh >= 1).all() and (bw >= 1).all()
    assert (top + bh <= h).all() and (left + bw <= w).all()
    area = (bh * bw).double() / (h * w)
    log_r = (bw.double() / bh).log()
    # Rounding a side to whole pixels moves area and ratio a little past the drawn values.
    assert area.min() >= 0.08 * 0.85 and area.max() <= 1.0
    assert log_r.abs().max() <= math.log(4 / 3) + 2 / 8  # a side of >= 16 px rounded by <= 0.5 px
    # Area is drawn uniformly in [0.08, 1] and kept when the box fits: a box of a large area and extreme
    # ratio does not, so the mean falls a little below 0.54; the log-ratio is symmetric around 0.
    assert 0.40 < area.mean() < 0.54 and abs(log_r.mean()) < 0.01
    assert (area < 0.2).float().mean() > 0.1 and (area > 0.8).float().mean() > 0.05  # the whole range is used
    assert log_r.std() > 0.12  # spread over the ratio range, not a fixed square


def test_rrc_falls_back_to_the_centre_crop_like_torchvision():
    # A 10 x 40 image: with scale 1 no box of ratio <= 4/3 fits in 10 tries, so every draw is the
    # centre crop of ratio 4/3 (torchvision's fallback): height 10, width round(13.33) = 13, left (40-13)//2.
    g = torch.Generator().manual_seed(1)
    boxes = geometry.rrc_boxes(g, 50, 10, 40, 1.0)
    assert (boxes == torch.tensor([0, 13, 10, 13])).all()


def test_the_whole_image_box_returns_the_input_and_the_input_resized():
    x = images()
    b, c, h, w = x.shape
    whole = torch.tensor([[0, 0, h, w]] * b)
    no_flip = torch.zeros(b, dtype=torch.bool)
    same = geometry.warp(x, geometry.sampling_matrices(b, h, w, h, w, whole, no_flip, None, None), h, w,
                         geometry.clamp_limits(torch.ones(b, dtype=torch.bool), h, w))
    assert torch.equal(same, x.float())  # exactly the stored pixels
    flipped = geometry.warp(x, geometry.sampling_matrices(b, h, w, h, w, whole, ~no_flip, None, None), h, w)
    assert torch.equal(flipped, x.flip(3).float())
    big = geometry.warp(x, geometry.sampling_matrices(b, h, w, 24, 24, whole, no_flip, None, None), 24, 24,
                        geometry.clamp_limits(torch.ones(b, dtype=torch.bool), h, w))
    ref = F.interpolate(x.float(), size=(24, 24), mode="bilinear", align_corners=False).round()
    assert (big - ref).abs().max() <= 1  # the same resampling (F.interpolate repeats the border too)
    assert (big - ref).abs().mean() < 0.05  # whole-level rounding of nearly equal sampling positions


def test_a_box_gives_torchvisions_resized_crop():
    x = images(b=3, h=32, w=32)
    boxes = torch.tensor([[3, 5, 20, 12], [0, 0, 32, 32], [10, 2, 8, 30]])
    no_flip = torch.zeros(3, dtype=torch.bool)
    got = geometry.warp(x, geometry.sampling_matrices(3, 32, 32, 16, 16, boxes, no_flip, None, None), 16, 16,
                        geometry.clamp_limits(torch.ones(3, dtype=torch.bool), 32, 32))
    for i, (t, l, bh, bw) in enumerate(boxes.tolist()):
        ref = TF.resized_crop(x[i].float(), t, l, bh, bw, [16, 16], antialias=False)  # bilinear, no antialias
        # torchvision crops, then resizes: an upscaled box's outer half-pixel repeats the box's edge, where
        # the affine resampling reads the real neighbouring pixels (as roi_align would). Same inside.
        inner = (slice(None), slice(1, -1), slice(1, -1))
        assert (got[i][inner] - ref.round()[inner]).abs().max() <= 1, i


@pytest.mark.parametrize("angle", [30.0, -75.0])
def test_trivial_augment_rotation_is_torchvisions_rotate(angle):
    x = images(b=1, h=24, w=24)
    rot = torch.tensor([geometry.TA_OPS.index("rotate")])
    theta = geometry.sampling_matrices(1, 24, 24, 24, 24, torch.tensor([[0, 0, 24, 24]]), torch.tensor([False]),
                                       rot, torch.tensor([angle], dtype=torch.float64))
    got = geometry.warp(x, theta, 24, 24)
    ref = TF.rotate(x.float(), angle, interpolation=InterpolationMode.BILINEAR)  # counter-clockwise, fill 0
    inner = (slice(None), slice(None), slice(6, 18), slice(6, 18))  # away from the rotated corners' edges
    assert (got[inner] - ref[inner].round()).abs().max() <= 1
    assert (got - ref).abs().mean() < 3


@pytest.mark.parametrize("op,mag,ref", [
    ("brightness", 0.5, lambda x: TF.adjust_brightness(x, 1.5)),
    ("brightness", -0.7, lambda x: TF.adjust_brightness(x, 0.3)),
    ("color", 0.8, lambda x: TF.adjust_saturation(x, 1.8)),
    ("contrast", -0.5, lambda x: TF.adjust_contrast(x, 0.5)),
    ("sharpness", 0.9, lambda x: TF.adjust_sharpness(x, 1.9)),
    ("sharpness", -0.6, lambda x: TF.adjust_sharpness(x, 0.4)),
    ("posterize", 3.0, lambda x: TF.posterize(x, 3)),
    ("solarize", 100.0, lambda x: TF.solarize(x, 100)),
    ("autocontrast", 0.0, TF.autocontrast),
    ("equalize", 0.0, TF.equalize),
])
def test_trivial_augment_colour_ops_are_torchvisions(op, mag, ref):
    x = images(b=5, h=20, w=20, seed=3) // 2 + 40  # a narrow range: autocontrast and equalize change it
    got = geometry.colour_op(x.float(), op, torch.full((5,), mag))
    want = ref(x).float()
    # torchvision casts its grayscale to uint8 before mixing it in (color, contrast): up to 1 level apart
    tol = 1 if op in ("color", "contrast") else 0
    assert (got - want).abs().max() <= tol
    assert not torch.equal(got, x.float())  # the op did something


def test_trivial_augment_draws_every_op_and_leaves_identity_images_alone():
    cfg = AugmentConfig(trivial_augment=True, crop_pad=0, flip=False)
    x = images(b=300, h=12, w=12, seed=5)
    extra = draw_extra(cfg, 300, 12, 12, 0, 0, 0)
    assert set(extra.ta_op.tolist()) == set(range(len(geometry.TA_OPS)))
    norm = Normalize([0.0] * 3, [1 / 255] * 3, torch.device("cpu"), False)  # x -> x as float
    out, _, _ = augment_extra(x, torch.zeros(300, dtype=torch.long), cfg, draw_params(cfg, 300, 12, 12, 0, 0, 0),
                              extra, norm)
    ident = extra.ta_op == geometry.TA_OPS.index("identity")
    assert torch.equal(out[ident], x[ident].float())
    # most other images change (not all: magnitude bin 0 is the identity for most ops)
    assert (out[~ident] != x[~ident].float()).any(dim=(1, 2, 3)).float().mean() > 0.8


def test_random_erasing_boxes_follow_torchvisions_area_and_ratio_bounds():
    g = torch.Generator().manual_seed(0)
    h = w = 40
    boxes = geometry.erase_boxes(g, 20000, h, w, 0.6)
    top, left, eh, ew = boxes.unbind(1)
    on = eh > 0
    assert 0.57 < on.float().mean() < 0.63  # the probability
    assert (top[on] >= 0).all() and (left[on] >= 0).all() and (top + eh <= h).all() and (left + ew <= w).all()
    area = (eh * ew)[on].double() / (h * w)
    ratio = eh[on].double() / ew[on]
    assert area.min() >= 0.02 * 0.7 and area.max() <= (1 / 3) * 1.15  # whole-pixel sides
    assert ratio.min() >= 0.3 * 0.8 and ratio.max() <= 3.3 * 1.25
    assert abs(ratio.log().mean()) < 0.05 and ratio.log().std() > 0.5


def test_erased_pixels_are_zero_after_normalisation_and_only_those():
    cfg = AugmentConfig(crop_pad=0, flip=False, erase=1.0)
    x = images(b=16, h=20, w=20, seed=2) // 2 + 100  # never 0 after the normalisation below
    norm = Normalize([0.1, 0.2, 0.3], [0.2, 0.2, 0.2], torch.device("cpu"), True)
    extra = draw_extra(cfg, 16, 20, 20, 0, 0, 0)
    out, y_b, lam = augment_extra(x, torch.zeros(16, dtype=torch.long), cfg, draw_params(cfg, 16, 20, 20, 0, 0, 0),
                                  extra, norm)
    assert y_b is None and lam is None
    zero = (out == 0).all(1)
    assert torch.equal(zero.sum((1, 2)), extra.erase[:, 2] * extra.erase[:, 3])
    assert torch.equal(out[~zero[:, None].expand_as(out)], norm(x)[~zero[:, None].expand_as(out)])


def test_eval_crop_of_a_known_image():
    # 64 x 64, dark, with a bright 32 x 32 square in the middle and one bright pixel block in a corner.
    x = torch.full((1, 1, 64, 64), 10, dtype=torch.uint8)
    x[..., 16:48, 16:48] = 200
    x[..., 0:4, 0:4] = 255
    # crop 28 at 0.875: resize to 32 (the square becomes rows/cols 8..24), keep the centre 28 (offset 2).
    out = geometry.eval_resize_crop(x, 28, 0.875)
    assert out.shape == (1, 1, 28, 28) and out.dtype == torch.uint8
    assert (out[..., 7:21, 7:21] == 200).all()  # inside the square, away from its blurred edge
    assert (out[..., :5, 10:18] == 10).all() and (out[..., 23:, 10:18] == 10).all()
    assert out.max() <= 200  # the corner block was cropped away
    # crop 32 of a 32 store at any fraction <= 1 resizes to 32/frac first; 28 of 32 at 0.875 is the plain centre
    y = images(b=2, c=3, h=32, w=32)
    assert torch.equal(geometry.eval_resize_crop(y, 28, 0.875), y[..., 2:30, 2:30])


def test_evaluation_input_uses_the_crop_only_when_asked():
    x = images(b=2, h=32, w=32)
    plain = Normalize([0.5] * 3, [0.25] * 3, torch.device("cpu"), True)
    cropped = Normalize([0.5] * 3, [0.25] * 3, torch.device("cpu"), True, eval_crop=(28, 0.875))
    assert torch.equal(plain.for_eval(x), plain(x))
    assert torch.equal(cropped.for_eval(x), plain(x[..., 2:30, 2:30]))
    assert cropped.for_eval(x).is_contiguous(memory_format=torch.channels_last)


def test_evaluation_feeds_the_model_the_centre_crop():
    from phalanx.data.loader import SplitOnDevice
    from phalanx.data.store import Split
    from phalanx.train.evaluate import eval_crop_of_meta, evaluate

    rng = np.random.default_rng(4)
    split = Split(rng.integers(0, 256, (10, 16, 16, 1), dtype=np.uint8), np.arange(10, dtype=np.int64) % 3)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12 * 12, 3))  # takes 12 x 12 images only
    norm = Normalize([0.5], [0.25], torch.device("cpu"), False, eval_crop=(12, 0.75))  # 16 -> crop 12, no resize
    res = evaluate(model, SplitOnDevice(split, torch.device("cpu"), False), norm, 4, 1, 0)
    x = torch.from_numpy(split.images).permute(0, 3, 1, 2)[..., 2:14, 2:14]
    with torch.no_grad():
        logits = model(norm(x)).double()
    y = torch.from_numpy(split.labels)
    assert res["correct"] == int((logits.argmax(1) == y).sum())
    assert res["loss"] == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-6)
    # model.json: weights trained on crops name them; older files and uncropped runs evaluate as stored
    assert eval_crop_of_meta({"image_size": 16, "crop_size": 12, "eval_crop": 0.75}) == (12, 0.75)
    assert eval_crop_of_meta({"image_size": 16, "crop_size": 12, "eval_crop": 1}) == (12, 1.0)
    assert eval_crop_of_meta({"image_size": 16}) is None
    assert eval_crop_of_meta({"image_size": 16, "crop_size": 16}) is None

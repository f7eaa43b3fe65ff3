"""Batched augmentation on the device: one gather does translation and flip for the whole batch.

Random draws come from a generator seeded by (seed, epoch, step) and are drawn for the whole
*global* batch; each rank applies the slice of its micro-batch part. So the augmentation of a
sample depends neither on how many ranks share the batch nor on gradient accumulation, and a
resumed run replays the same draws.

With everything added for larger images off (crop_size, rrc, trivial_augment, erase, mixup,
cutmix), `augment_uint8` is the whole of it: one gather. Otherwise `augment_extra` runs instead
(geometry.py: one affine resampling for RandomResizedCrop, flip and TrivialAugment's geometric
ops; colour ops; random erasing; mix.py: mixup/CutMix over pairs of the global batch), from
draws of a second generator (`draw_extra`), so the first one's draws never change.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch

from phalanx import runtime
from phalanx.config import AugmentConfig
from phalanx.data import geometry, mix
from phalanx.data.sampler import mix_seed


@dataclass
class AugmentParams:
    dy: torch.Tensor      # (B,) row offset into the padded image, 0..2p
    dx: torch.Tensor      # (B,) column offset
    flip: torch.Tensor    # (B,) bool
    cut_y: torch.Tensor   # (B,) cutout centre row
    cut_x: torch.Tensor   # (B,) cutout centre column

    def slice(self, lo: int, hi: int) -> "AugmentParams":
        return AugmentParams(*(t[lo:hi] for t in (self.dy, self.dx, self.flip, self.cut_y, self.cut_x)))


def draw_params(cfg: AugmentConfig, batch: int, h: int, w: int, seed: int, epoch: int, step: int) -> AugmentParams:
    """Augmentation draws for global batch `step` of `epoch` (`batch` = global batch size, h x w the
    stored images). With crop_size set (and no RandomResizedCrop) the translation is that of a
    crop_size crop of the padded image."""
    g = torch.Generator().manual_seed(mix_seed(seed, epoch, step, 0xA06))
    p = cfg.crop_pad
    oh, ow = out_size(cfg, h, w)
    # (a RandomResizedCrop may enlarge, oh > h: it draws its own boxes and leaves these unused)
    dy = torch.randint(0, max(1, h - oh + 2 * p + 1), (batch,), generator=g)
    dx = torch.randint(0, max(1, w - ow + 2 * p + 1), (batch,), generator=g)
    flip = (torch.rand(batch, generator=g) < 0.5) if cfg.flip else torch.zeros(batch, dtype=torch.bool)
    cy = torch.randint(0, oh, (batch,), generator=g)
    cx = torch.randint(0, ow, (batch,), generator=g)
    return AugmentParams(dy, dx, flip, cy, cx)


def augment_uint8(x: torch.Tensor, cfg: AugmentConfig, params: AugmentParams) -> torch.Tensor:
    """Translate (crop), flip and cut out a uint8 batch (B, C, H, W) in one gather; returns uint8
    (B, C, crop_size, crop_size) when crop_size is set, else (B, C, H, W)."""
    b, c, h, w = x.shape
    p = cfg.crop_pad
    dev = x.device
    oh, ow = out_size(cfg, h, w)
    if p == 0 and not cfg.flip and cfg.cutout == 0 and (oh, ow) == (h, w):
        return x
    dy, dx, flip = params.dy.to(dev), params.dx.to(dev), params.flip.to(dev)
    ar_h = torch.arange(oh, device=dev)
    ar_w = torch.arange(ow, device=dev)
    # Row/column of the padded image that lands at each output pixel. A flip reads columns backwards.
    rows = dy[:, None] + ar_h[None, :]                                              # (B, H)
    cols = dx[:, None] + torch.where(flip[:, None], (ow - 1 - ar_w)[None, :], ar_w[None, :])  # (B, W)
    # Instead of padding, read index-p and zero whatever falls outside the image.
    rows = rows - p
    cols = cols - p
    valid = ((rows >= 0) & (rows < h))[:, :, None] & ((cols >= 0) & (cols < w))[:, None, :]  # (B, H, W)
    if cfg.cutout > 0:
        # The square [c - k//2, c - k//2 + k) around the drawn centre: exactly k pixels a side, even k too
        # (|i - c| < k/2 gave k-1 for even k). Parts outside the image are simply not there.
        k = cfg.cutout
        y0, x0 = params.cut_y.to(dev) - k // 2, params.cut_x.to(dev) - k // 2
        in_y = ((ar_h[None, :] - y0[:, None]) >= 0) & ((ar_h[None, :] - y0[:, None]) < k)
        in_x = ((ar_w[None, :] - x0[:, None]) >= 0) & ((ar_w[None, :] - x0[:, None]) < k)
        valid &= ~(in_y[:, :, None] & in_x[:, None, :])
    flat = rows.clamp(0, h - 1)[:, :, None] * w + cols.clamp(0, w - 1)[:, None, :]  # (B, H, W)
    src = x.reshape(b, c, h * w) if x.is_contiguous() else x.contiguous().reshape(b, c, h * w)
    out = torch.gather(src, 2, flat.reshape(b, 1, oh * ow).expand(b, c, oh * ow)).reshape(b, c, oh, ow)
    return out * valid[:, None].to(out.dtype)


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor (draws) on `device` with no host synchronisation: from page-locked memory where
    that makes the copy asynchronous (CUDA)."""
    if device.type == "cpu":
        return t
    return runtime.of(device).pin(t).to(device, non_blocking=True)


def draws_to(params, device: torch.device, copy=to_device):
    """A dataclass of draws (CPU tensors) on `device`: identity on CPU; else its tensors of one length packed into
    one int64 host tensor, one copy (`copy`: to_device), and unpacked on the device into views of their dtypes
    (bool back from 0/1), so that a step pays one host-to-device transfer for its draws, not one per field."""
    if device.type == "cpu" and copy is to_device:
        return params
    fields = [(f.name, v) for f in dataclasses.fields(params) if isinstance(v := getattr(params, f.name), torch.Tensor)]
    packable = [(k, v) for k, v in fields if v.dim() == 1 and not v.is_floating_point()]
    if len({len(v) for _, v in packable}) != 1:  # nothing to pack, or lengths that differ: one copy each
        return dataclasses.replace(params, **{k: copy(v, device) for k, v in fields})
    packed = copy(torch.stack([v.long() for _, v in packable]), device)
    moved = {k: packed[i] if v.dtype == torch.int64 else packed[i].to(v.dtype) for i, (k, v) in enumerate(packable)}
    moved.update({k: copy(v, device) for k, v in fields if k not in moved})
    return dataclasses.replace(params, **moved)


def out_size(cfg: AugmentConfig, h: int, w: int) -> tuple[int, int]:
    """(height, width) of the training images the model sees."""
    return (cfg.crop_size, cfg.crop_size) if cfg.crop_size else (h, w)


def uses_extra(cfg: AugmentConfig) -> bool:
    """Whether any augmentation beyond augment_uint8's gather is on (then augment_extra runs)."""
    return cfg.rrc or cfg.trivial_augment or cfg.erase > 0 or cfg.mixup > 0 or cfg.cutmix > 0


@dataclass
class ExtraParams:
    """Draws of augment_extra for a global batch (None: that augmentation is off). Host tensors."""
    box: torch.Tensor | None = None      # (B, 4) RandomResizedCrop boxes (top, left, height, width) of the input
    ta_op: torch.Tensor | None = None    # (B,) index into geometry.TA_OPS
    ta_mag: torch.Tensor | None = None   # (B,) its signed magnitude
    erase: torch.Tensor | None = None    # (B, 4) erased boxes of the output (height 0: none)
    mix_kind: str = ""                   # "mixup", "cutmix" or "" (off)
    lam: torch.Tensor | None = None      # (B,) share of a sample's own image and label
    cut: torch.Tensor | None = None      # (B, 4) CutMix boxes (the partner's pixels)

    def slice(self, lo: int, hi: int) -> "ExtraParams":
        def part(t):
            return None if t is None else t[lo:hi]
        return ExtraParams(part(self.box), part(self.ta_op), part(self.ta_mag), part(self.erase), self.mix_kind,
                           part(self.lam), part(self.cut))


def draw_extra(cfg: AugmentConfig, batch: int, h: int, w: int, seed: int, epoch: int, step: int) -> ExtraParams:
    """augment_extra's draws for global batch `step` of `epoch`, from their own generator (seed, epoch,
    step): a function of those and of the config alone, whatever the world size."""
    g = torch.Generator().manual_seed(mix_seed(seed, epoch, step, 0xA07))
    oh, ow = out_size(cfg, h, w)
    e = ExtraParams()
    if cfg.rrc:
        e.box = geometry.rrc_boxes(g, batch, h, w, cfg.rrc_min_scale)
    if cfg.trivial_augment:
        e.ta_op = torch.randint(0, len(geometry.TA_OPS), (batch,), generator=g)
        mag = geometry.ta_magnitude(e.ta_op, torch.randint(0, geometry.TA_BINS, (batch,), generator=g))
        sign = torch.where(torch.rand(batch, generator=g) < 0.5, -1.0, 1.0).double()
        e.ta_mag = torch.where(geometry.ta_signed(e.ta_op), mag * sign, mag)
    if cfg.erase > 0:
        e.erase = geometry.erase_boxes(g, batch, oh, ow, cfg.erase)
    if cfg.mixup > 0 or cfg.cutmix > 0:
        rng = np.random.default_rng(mix_seed(seed, epoch, step, 0xA08))
        e.mix_kind, e.lam, e.cut = mix.draw_mix(rng, g, batch, oh, ow, cfg.mixup, cfg.cutmix)
    return e


def augment_extra(x: torch.Tensor, y: torch.Tensor, cfg: AugmentConfig, params: AugmentParams,
                  extra: ExtraParams, normalize: "Normalize"
                  ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """uint8 (B, C, H, W) with this part's draws -> (normalised images, partner labels, lambda);
    the last two are None without mixup/CutMix.

    Order as torchvision/timm: crop (RandomResizedCrop or translation), flip, TrivialAugment,
    normalise, random erasing, then mixing over pairs.
    """
    b, c, h, w = x.shape
    oh, ow = out_size(cfg, h, w)

    def move(t: torch.Tensor) -> torch.Tensor:
        return to_device(t, x.device)

    if cfg.rrc or cfg.trivial_augment:
        ta = extra.ta_op is not None
        is_geo = (torch.isin(extra.ta_op, torch.tensor(sorted(geometry.TA_GEOMETRIC)))
                  if ta else torch.zeros(b, dtype=torch.bool))  # images whose TrivialAugment op moves pixels
        if extra.box is not None:
            box = extra.box
        else:  # crop_pad's translation (zeros outside), as augment_uint8 would cut it
            p = cfg.crop_pad
            box = torch.stack([params.dy - p, params.dx - p, torch.full_like(params.dy, oh),
                               torch.full_like(params.dx, ow)], 1)
        theta = geometry.sampling_matrices(b, h, w, oh, ow, box, params.flip,
                                           extra.ta_op if ta else None, extra.ta_mag if ta else None)
        # RandomResizedCrop boxes lie inside the image: read no zeros from outside it (TrivialAugment's
        # geometric ops do, as torchvision's fill=0)
        limits = move(geometry.clamp_limits(~is_geo, h, w)) if extra.box is not None else None
        xf = geometry.warp(x, move(theta), oh, ow, limits)
        if cfg.cutout > 0:
            k = cfg.cutout
            cut = torch.stack([params.cut_y - k // 2, params.cut_x - k // 2, torch.full_like(params.cut_y, k),
                               torch.full_like(params.cut_x, k)], 1)
            xf = xf.masked_fill_(geometry.box_mask(move(cut), oh, ow), 0.0)
        if ta:
            xf = geometry.apply_colour_ops(xf, extra.ta_op, extra.ta_mag, move)
    else:
        xf = augment_uint8(x, cfg, draws_to(params, x.device))
    out = normalize(xf)
    if extra.erase is not None:
        out = out.masked_fill_(geometry.box_mask(move(extra.erase), oh, ow), 0.0)
    if not extra.mix_kind:
        return out, None, None
    out, y_b, lam = mix.apply_mix(out, y, extra.mix_kind, move(extra.lam),
                                  None if extra.cut is None else move(extra.cut))
    if normalize.channels_last:
        out = out.contiguous(memory_format=torch.channels_last)
    return out, y_b, lam


class Normalize:
    """uint8 (B, C, H, W) -> float, normalised, channels-last when asked."""

    def __init__(self, mean: list[float], std: list[float], device: torch.device, channels_last: bool,
                 eval_crop: tuple[int, float] | None = None):
        self.scale = (1.0 / (255.0 * torch.tensor(std, device=device))).view(1, -1, 1, 1)
        self.shift = (-torch.tensor(mean, device=device) / torch.tensor(std, device=device)).view(1, -1, 1, 1)
        self.channels_last = channels_last
        self.eval_crop = eval_crop  # (crop side, fraction): evaluation's resize + centre crop (for_eval)

    def for_eval(self, x: torch.Tensor) -> torch.Tensor:
        """Evaluation input: uint8 (B, C, H, W) resized and centre-cropped as `eval_crop` says, normalised."""
        if self.eval_crop is not None:
            x = geometry.eval_resize_crop(x, *self.eval_crop)
        return self(x)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.addcmul(self.shift, x.float(), self.scale)
        return y.contiguous(memory_format=torch.channels_last) if self.channels_last else y.contiguous()


def eval_crop_of(crop_size: int, eval_crop: float, side: int) -> tuple[int, float] | None:
    """(crop side, fraction) of evaluation's resize + centre crop for stored images of `side`, or None
    (crop_size unset or equal to the stored side: the images are evaluated as stored)."""
    if crop_size and crop_size != side:
        return crop_size, float(eval_crop)
    return None

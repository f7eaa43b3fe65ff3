"""Batched augmentation on the device: one gather does translation and flip for the whole batch.

Random draws come from a generator seeded by (seed, epoch, step) and are drawn for the whole
*global* batch; each rank applies the slice of its micro-batch part. So the augmentation of a
sample depends neither on how many ranks share the batch nor on gradient accumulation, and a
resumed run replays the same draws.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from phalanx.config import AugmentConfig
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
    """Augmentation draws for global batch `step` of `epoch` (`batch` = global batch size)."""
    g = torch.Generator().manual_seed(mix_seed(seed, epoch, step, 0xA06))
    p = cfg.crop_pad
    dy = torch.randint(0, 2 * p + 1, (batch,), generator=g)
    dx = torch.randint(0, 2 * p + 1, (batch,), generator=g)
    flip = (torch.rand(batch, generator=g) < 0.5) if cfg.flip else torch.zeros(batch, dtype=torch.bool)
    cy = torch.randint(0, h, (batch,), generator=g)
    cx = torch.randint(0, w, (batch,), generator=g)
    return AugmentParams(dy, dx, flip, cy, cx)


def augment_uint8(x: torch.Tensor, cfg: AugmentConfig, params: AugmentParams) -> torch.Tensor:
    """Translate, flip and cut out a uint8 batch (B, C, H, W) in one gather; returns uint8."""
    b, c, h, w = x.shape
    p = cfg.crop_pad
    dev = x.device
    if p == 0 and not cfg.flip and cfg.cutout == 0:
        return x
    dy, dx, flip = params.dy.to(dev), params.dx.to(dev), params.flip.to(dev)
    ar_h = torch.arange(h, device=dev)
    ar_w = torch.arange(w, device=dev)
    # Row/column of the padded image that lands at each output pixel. A flip reads columns backwards.
    rows = dy[:, None] + ar_h[None, :]                                              # (B, H)
    cols = dx[:, None] + torch.where(flip[:, None], (w - 1 - ar_w)[None, :], ar_w[None, :])  # (B, W)
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
    out = torch.gather(src, 2, flat.reshape(b, 1, h * w).expand(b, c, h * w)).reshape(b, c, h, w)
    return out * valid[:, None].to(out.dtype)


class Normalize:
    """uint8 (B, C, H, W) -> float, normalised, channels-last when asked."""

    def __init__(self, mean: list[float], std: list[float], device: torch.device, channels_last: bool):
        self.scale = (1.0 / (255.0 * torch.tensor(std, device=device))).view(1, -1, 1, 1)
        self.shift = (-torch.tensor(mean, device=device) / torch.tensor(std, device=device)).view(1, -1, 1, 1)
        self.channels_last = channels_last

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.addcmul(self.shift, x.float(), self.scale)
        return y.contiguous(memory_format=torch.channels_last) if self.channels_last else y.contiguous()

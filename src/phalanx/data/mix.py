"""Mixup and CutMix over pairs of the global batch, so that every rank mixes what one rank would.

timm mixes a batch with its own mirror (`x.flip(0)`): sample i with sample B-1-i of the batch a
process holds. Under data parallelism that batch is a rank's part of the global batch, whose
boundaries move with the world size, so 1, 2 and 3 ranks would train on different mixtures.
Here the partners are the pairs (2i, 2i+1) of the global batch (its order is a random permutation
each epoch, so partners are random), and a layout where a rank's part would split a pair is
refused (`mix_layout_error`). Each pair draws its own lambda (Beta(alpha, alpha), timm's
"pair" mode); with both mixup and CutMix on, each global batch picks one with probability 0.5
(timm's switch). CutMix's lambda is the kept area of the box actually pasted (timm's
`correct_lam`). Both images of a pair use the same lambda and box, each taking the other's pixels.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from phalanx.config import invariant_world_error
from phalanx.data.geometry import box_mask
from phalanx.data.sampler import shard_bounds


def mix_layout_error(global_batch: int, accum: int, world: int) -> str | None:
    """Why pairs (2i, 2i+1) of the global batch would straddle ranks or micro-batches, or None."""
    micro = global_batch // accum
    bounds = [shard_bounds(micro, world, r) for r in range(world)]
    if micro % 2 == 0 and all(lo % 2 == 0 for lo, _ in bounds):
        return None
    parts = ", ".join(str(hi - lo) for lo, hi in bounds)
    good = 2 * world * accum
    near = max(good, global_batch // good * good)
    return (f"global_batch={global_batch} (grad_accum={accum}) splits into parts of {parts} images over {world} "
            f"rank(s), which would cut mixup/CutMix's pairs (2i, 2i+1 of the global batch) in two; use a "
            f"global_batch that is a multiple of {good} (2 x ranks x grad_accum), e.g. {near}")


def world_fits(cfg) -> Callable[[int], bool] | None:
    """Whether the run (`cfg`, a Config) can use a world size: with mixup or CutMix, their pairs whole on each
    rank; with --parallel.invariant, the micro-batches shared equally. None when every world size can."""
    if not (cfg.augment.mixup > 0 or cfg.augment.cutmix > 0 or cfg.parallel.invariant):
        return None
    return lambda world: world_error(cfg, world) is None


def world_error(cfg, world: int) -> str | None:
    """Why the run cannot use `world` ranks (the check `world_fits` makes, as one line), or None."""
    if cfg.parallel.invariant and (why := invariant_world_error(cfg.global_batch, cfg.parallel.micro_batch, world)):
        return why
    if cfg.augment.mixup > 0 or cfg.augment.cutmix > 0:
        return mix_layout_error(cfg.global_batch, cfg.grad_accum, world)
    return None


def draw_mix(rng: np.random.Generator, g: torch.Generator, batch: int, h: int, w: int, mixup: float,
             cutmix: float) -> tuple[str, torch.Tensor, torch.Tensor | None]:
    """(kind 'mixup' or 'cutmix', lambda per sample (B,) float32, CutMix boxes (B, 4) int64 or None).

    Both samples of a pair share their lambda and box. Beta draws come from numpy (torch's
    Beta takes no generator)."""
    pairs = batch // 2
    use_cutmix = cutmix > 0 and (mixup <= 0 or bool(torch.rand(1, generator=g).item() < 0.5))
    alpha = cutmix if use_cutmix else mixup
    lam = torch.from_numpy(rng.beta(alpha, alpha, size=pairs))
    if not use_cutmix:
        return "mixup", lam.repeat_interleave(2).float(), None
    # timm's rand_bbox: a box of side sqrt(1 - lam) x the image's around a uniform centre, clipped to the image.
    cut = (1 - lam).sqrt()
    ch, cw = (h * cut).floor(), (w * cut).floor()
    cy = torch.randint(0, h, (pairs,), generator=g).double()
    cx = torch.randint(0, w, (pairs,), generator=g).double()
    y0, y1 = (cy - (ch / 2).floor()).clamp(0, h), (cy + (ch / 2).floor()).clamp(0, h)
    x0, x1 = (cx - (cw / 2).floor()).clamp(0, w), (cx + (cw / 2).floor()).clamp(0, w)
    lam = 1 - (y1 - y0) * (x1 - x0) / (h * w)  # the area actually kept
    boxes = torch.stack([y0, x0, y1 - y0, x1 - x0], 1).long()
    return "cutmix", lam.repeat_interleave(2).float(), boxes.repeat_interleave(2, 0)


def partner(t: torch.Tensor) -> torch.Tensor:
    """Each sample's pair partner: (2i, 2i+1) swapped, along the first dimension."""
    return t.reshape(t.shape[0] // 2, 2, *t.shape[1:]).flip(1).reshape(t.shape)


def apply_mix(x: torch.Tensor, y: torch.Tensor, kind: str, lam: torch.Tensor, boxes: torch.Tensor | None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mixed images, partner labels y_b, lambda): the target of sample i is lam_i * onehot(y_i) +
    (1 - lam_i) * onehot(y_b_i). `x` holds whole pairs; lam and boxes are on x's device."""
    if x.shape[0] % 2:
        raise ValueError(f"mixing needs whole pairs; got a part of {x.shape[0]} images")
    other = partner(x)
    if kind == "mixup":
        out = torch.lerp(other, x, lam.to(x.dtype)[:, None, None, None])
    else:
        out = torch.where(box_mask(boxes, x.shape[2], x.shape[3]), other, x)
    return out, partner(y), lam

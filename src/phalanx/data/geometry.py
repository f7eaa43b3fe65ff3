"""Per-image geometry and colour for larger images, batched on the device.

RandomResizedCrop, the flip and TrivialAugment's geometric ops are one affine map per image,
composed on the host (a few numbers per image) and applied to the whole batch by one
`F.affine_grid` + `F.grid_sample` (bilinear, zeros outside). TrivialAugment's colour ops run on
the subsets of the batch that drew them (index lists known on the host: no device read). Random
erasing is a mask on the normalised batch. Evaluation resizes and centre-crops with torchvision.

Every draw here is made for the whole global batch from a CPU generator (see augment.py), so the
pixels of a sample do not depend on the world size.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

# TrivialAugmentWide's ops and magnitudes (torchvision.transforms.TrivialAugmentWide, 31 bins).
TA_OPS = ("identity", "shear_x", "shear_y", "translate_x", "translate_y", "rotate",
          "brightness", "color", "contrast", "sharpness", "posterize", "solarize", "autocontrast", "equalize")
TA_GEOMETRIC = {TA_OPS.index(n) for n in ("shear_x", "shear_y", "translate_x", "translate_y", "rotate")}
TA_BINS = 31
_TA_SIGNED = {"shear_x", "shear_y", "translate_x", "translate_y", "rotate", "brightness", "color", "contrast",
              "sharpness"}


def ta_magnitude(op: torch.Tensor, bin_: torch.Tensor) -> torch.Tensor:
    """TrivialAugmentWide's magnitude of op `op` at bin `bin_` (0..30), float64, unsigned."""
    frac = bin_.double() / (TA_BINS - 1)
    top = {"shear_x": 0.99, "shear_y": 0.99, "translate_x": 32.0, "translate_y": 32.0, "rotate": 135.0,
           "brightness": 0.99, "color": 0.99, "contrast": 0.99, "sharpness": 0.99}
    mag = torch.zeros_like(frac)
    for name, hi in top.items():
        mag = torch.where(op == TA_OPS.index(name), frac * hi, mag)
    # posterize: bits kept, 8 down to 2 (torchvision: 8 - (arange(31) / 5).round()); solarize: threshold 255 -> 0
    mag = torch.where(op == TA_OPS.index("posterize"), 8 - (bin_.double() / ((TA_BINS - 1) / 6)).round(), mag)
    mag = torch.where(op == TA_OPS.index("solarize"), 255.0 * (1 - frac), mag)
    return mag


def ta_signed(op: torch.Tensor) -> torch.Tensor:
    """Whether op's magnitude takes a random sign."""
    return torch.isin(op, torch.tensor([TA_OPS.index(n) for n in _TA_SIGNED]))


def rrc_boxes(g: torch.Generator, n: int, h: int, w: int, min_scale: float,
              ratio: tuple[float, float] = (3 / 4, 4 / 3), tries: int = 10) -> torch.Tensor:
    """(n, 4) int64 boxes (top, left, height, width) of torchvision's RandomResizedCrop.get_params,
    vectorised: per image up to `tries` (area, log-ratio) draws, the first that fits is taken; when
    none fits, the centre crop of the ratio range's nearest ratio (torchvision's fallback)."""
    area = h * w
    log_r = torch.empty(n, tries, dtype=torch.float64).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=g)
    scale = torch.empty(n, tries, dtype=torch.float64).uniform_(min_scale, 1.0, generator=g)
    u = torch.rand(n, 2, generator=g, dtype=torch.float64)
    target, r = area * scale, log_r.exp()
    bw, bh = (target * r).sqrt().round(), (target / r).sqrt().round()
    ok = (bw > 0) & (bw <= w) & (bh > 0) & (bh <= h)
    first = ok.to(torch.int8).argmax(1, keepdim=True)  # the first try that fits (0 when none does)
    bw, bh = bw.gather(1, first)[:, 0], bh.gather(1, first)[:, 0]
    top = (u[:, 0] * (h - bh + 1)).floor()
    left = (u[:, 1] * (w - bw + 1)).floor()
    # Fallback: the whole image, narrowed to the ratio range, centred.
    in_ratio = w / h
    if in_ratio < ratio[0]:
        fw, fh = w, round(w / ratio[0])
    elif in_ratio > ratio[1]:
        fw, fh = round(h * ratio[1]), h
    else:
        fw, fh = w, h
    none = ~ok.any(1)
    bh, bw = torch.where(none, float(fh), bh), torch.where(none, float(fw), bw)
    top = torch.where(none, float((h - fh) // 2), top)
    left = torch.where(none, float((w - fw) // 2), left)
    return torch.stack([top, left, bh, bw], 1).long()


def erase_boxes(g: torch.Generator, n: int, h: int, w: int, p: float, scale=(0.02, 1 / 3), ratio=(0.3, 3.3),
                tries: int = 10) -> torch.Tensor:
    """(n, 4) int64 boxes (top, left, height, width) of torchvision's RandomErasing.get_params,
    vectorised; height 0 where the image is not erased (probability 1-p, or no try fitted)."""
    on = torch.rand(n, generator=g, dtype=torch.float64) < p
    area = h * w * torch.empty(n, tries, dtype=torch.float64).uniform_(scale[0], scale[1], generator=g)
    r = torch.empty(n, tries, dtype=torch.float64).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=g).exp()
    u = torch.rand(n, 2, generator=g, dtype=torch.float64)
    eh, ew = (area * r).sqrt().round(), (area / r).sqrt().round()
    ok = (eh < h) & (ew < w) & (eh > 0) & (ew > 0)
    first = ok.to(torch.int8).argmax(1, keepdim=True)
    eh, ew = eh.gather(1, first)[:, 0], ew.gather(1, first)[:, 0]
    on &= ok.any(1)
    top = (u[:, 0] * (h - eh + 1)).floor()
    left = (u[:, 1] * (w - ew + 1)).floor()
    eh = torch.where(on, eh, 0.0)
    return torch.stack([top, left, eh, torch.where(on, ew, 0.0)], 1).long()


def box_mask(boxes: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(B, 1, h, w) bool: inside each image's box (top, left, height, width), on boxes' device."""
    ar_h = torch.arange(h, device=boxes.device)
    ar_w = torch.arange(w, device=boxes.device)
    t, l, bh, bw = boxes.unbind(1)
    in_y = (ar_h[None] >= t[:, None]) & (ar_h[None] < (t + bh)[:, None])
    in_x = (ar_w[None] >= l[:, None]) & (ar_w[None] < (l + bw)[:, None])
    return (in_y[:, :, None] & in_x[:, None, :])[:, None]


def sampling_matrices(n: int, h: int, w: int, oh: int, ow: int, box: torch.Tensor, flip: torch.Tensor,
                      ta_op: torch.Tensor | None, ta_mag: torch.Tensor | None) -> torch.Tensor:
    """(n, 2, 3) float32 `theta` of F.affine_grid (align_corners=False): output -> input coordinates.

    In pixel coordinates (pixel k spans [k, k+1)) an output point is first moved by the inverse of
    the TrivialAugment op (the image is transformed by it), then mirrored (flip), then mapped into
    the box (top, left, height, width) of the input, which is stretched over the whole output:
    torchvision's order RandomResizedCrop -> flip -> TrivialAugment.
    """
    f64 = torch.float64
    eye = torch.eye(3, dtype=f64).expand(n, 3, 3).clone()
    t = eye.clone()  # TrivialAugment's op, sampling direction
    if ta_op is not None:
        m = ta_mag
        cx, cy = ow / 2, oh / 2
        sx, sy = ta_op == TA_OPS.index("shear_x"), ta_op == TA_OPS.index("shear_y")
        t[sx, 0, 1] = m[sx]  # torchvision shears about the top-left corner (center=[0, 0])
        t[sy, 1, 0] = m[sy]
        tx, ty = ta_op == TA_OPS.index("translate_x"), ta_op == TA_OPS.index("translate_y")
        t[tx, 0, 2] = -m[tx]
        t[ty, 1, 2] = -m[ty]
        rot = ta_op == TA_OPS.index("rotate")
        a = torch.deg2rad(m[rot])
        c, s = a.cos(), a.sin()
        t[rot, 0, 0], t[rot, 0, 1], t[rot, 1, 0], t[rot, 1, 1] = c, -s, s, c
        t[rot, 0, 2] = cx - c * cx + s * cy  # about the centre: p' = R (p - c) + c
        t[rot, 1, 2] = cy - s * cx - c * cy
    mirror = eye.clone()
    mirror[flip, 0, 0], mirror[flip, 0, 2] = -1.0, float(ow)
    top, left, bh, bw = box.to(f64).unbind(1)
    into = eye.clone()
    into[:, 0, 0], into[:, 0, 2] = bw / ow, left
    into[:, 1, 1], into[:, 1, 2] = bh / oh, top
    # normalised output -> output pixels, and input pixels -> normalised input
    out_px = torch.tensor([[ow / 2, 0, ow / 2], [0, oh / 2, oh / 2], [0, 0, 1]], dtype=f64)
    in_norm = torch.tensor([[2 / w, 0, -1], [0, 2 / h, -1], [0, 0, 1]], dtype=f64)
    theta = in_norm @ into @ mirror @ t @ out_px
    return theta[:, :2].float()


def clamp_limits(clamp_inside: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(B, 1, 1, 2) bounds of `warp`'s sampling grid: the border pixels' centres for the images of
    `clamp_inside`, none (inf) for the others."""
    lim = torch.tensor([1 - 1 / w, 1 - 1 / h])
    return torch.where(clamp_inside[:, None, None, None], lim, torch.inf)


def warp(x: torch.Tensor, theta: torch.Tensor, oh: int, ow: int, limits: torch.Tensor | None = None
         ) -> torch.Tensor:
    """uint8 (B, C, H, W) -> float (B, C, oh, ow) with whole values in [0, 255], sampled bilinearly at the
    affine map `theta` of each image; zeros outside the image. `limits` (clamp_limits, on x's device):
    those images read no further out than the border pixels' centres (an upscaled crop's edge would
    otherwise fade into the zeros outside, where F.interpolate repeats the border)."""
    b, c, h, w = x.shape
    grid = F.affine_grid(theta, [b, c, oh, ow], align_corners=False)
    if limits is not None:
        grid = grid.clamp_(-limits, limits)
    out = F.grid_sample(x.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out.round_().clamp_(0, 255)  # whole values, as a uint8 image would hold (the colour ops need them)


def _gray(x: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) luminance (ITU-R 601-2, torchvision's rgb_to_grayscale) of float RGB or gray images."""
    if x.shape[1] == 1:
        return x
    r, g, b = x.unbind(1)
    return (0.2989 * r + 0.587 * g + 0.114 * b)[:, None]


def _blend(a: torch.Tensor, b: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return (factor * a + (1 - factor) * b).clamp_(0, 255).floor_()  # floor: torchvision's cast to uint8


def _equalize(x: torch.Tensor) -> torch.Tensor:
    """torchvision's equalize, per image and channel, batched: one scatter_add for all histograms."""
    b, c, h, w = x.shape
    v = x.reshape(b * c, h * w).long()
    hist = torch.zeros(b * c, 256, device=x.device).scatter_add_(1, v, torch.ones_like(v, dtype=torch.float))
    last = torch.where(hist > 0, torch.arange(256, device=x.device).expand_as(hist), -1).argmax(1, keepdim=True)
    last_count = hist.gather(1, last)  # count of the highest value present
    step = ((h * w - last_count) / 255).floor()  # torchvision: (numel - histo[last nonzero]) // 255
    lut = ((hist.cumsum(1) - hist + (step / 2).floor()) / step.clamp(min=1)).floor().clamp(0, 255)
    out = lut.gather(1, v)
    out = torch.where(step > 0, out, v.float())  # one value (or nearly): unchanged
    return out.reshape(b, c, h, w)


def colour_op(x: torch.Tensor, op: str, mag: torch.Tensor) -> torch.Tensor:
    """TrivialAugment colour op `op` on float whole-valued images in [0, 255], magnitudes (B,) signed,
    on x's device."""
    m = mag.to(torch.float32)[:, None, None, None]
    if op == "brightness":
        return _blend(x, torch.zeros_like(x), 1 + m)
    if op == "color":
        return x if x.shape[1] == 1 else _blend(x, _gray(x), 1 + m)
    if op == "contrast":
        return _blend(x, _gray(x).mean((1, 2, 3), keepdim=True), 1 + m)
    if op == "sharpness":  # torchvision: blend with a 3x3-smoothed copy (border pixels kept)
        k = torch.ones(3, 3, device=x.device)
        k[1, 1] = 5.0
        k = (k / 13).expand(x.shape[1], 1, 3, 3)
        smooth = x.clone()
        smooth[..., 1:-1, 1:-1] = F.conv2d(x, k, groups=x.shape[1]).round_()
        return (x + (-m) * (smooth - x)).clamp_(0, 255).floor_()  # torchvision's form of the blend (rounding)
    if op == "posterize":
        q = 2 ** (8 - m)  # keep the top `bits` bits
        return (x / q).floor_() * q
    if op == "solarize":
        return torch.where(x >= m, 255 - x, x)
    if op == "autocontrast":
        lo, hi = x.amin((2, 3), keepdim=True), x.amax((2, 3), keepdim=True)
        inv_scale = torch.where(hi > lo, (hi - lo) * (1 / 255), 1.0)  # torchvision divides by this (rounding)
        lo = torch.where(hi > lo, lo, 0.0)
        return ((x - lo) / inv_scale).clamp_(0, 255).floor_()
    if op == "equalize":
        return _equalize(x)
    raise ValueError(op)


def apply_colour_ops(x: torch.Tensor, ta_op: torch.Tensor, ta_mag: torch.Tensor,
                     move: Callable[[torch.Tensor], torch.Tensor] = lambda t: t) -> torch.Tensor:
    """Each image's colour op (ta_op, ta_mag: host tensors) on the subset of the batch that drew it, in
    place; `move` copies a host tensor to x's device."""
    for k, name in enumerate(TA_OPS):
        if k in TA_GEOMETRIC or name == "identity":
            continue
        rows = (ta_op == k).nonzero()[:, 0]  # host tensors: no device read
        if len(rows):
            idx = move(rows)
            x.index_copy_(0, idx, colour_op(x.index_select(0, idx), name, move(ta_mag[rows].float())))
    return x


def eval_resize_crop(x: torch.Tensor, crop: int, frac: float) -> torch.Tensor:
    """uint8 (B, C, H, W) -> uint8 (B, C, crop, crop): resized (antialiased bilinear) so that the
    centre crop of `frac` of its side is `crop` pixels, then that centre crop (torchvision's
    reference evaluation: Resize(crop / 0.875) + CenterCrop(crop))."""
    from torchvision.transforms.v2 import functional as TF
    side = int(round(crop / frac))
    h, w = x.shape[-2:]
    # The shorter side goes to `side` (torchvision's Resize(int)); the store's images are square.
    size = [side, int(round(w * side / h))] if h <= w else [int(round(h * side / w)), side]
    return TF.center_crop(TF.resize(x, size, antialias=True), [crop, crop])

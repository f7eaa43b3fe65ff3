"""Decode one image file into uint8 pixels at a fixed size: the single definition of "the pixels".

`phalanx data prepare`, the streaming loader and `phalanx predict` all go through `decode_chw`, so
an image is turned into exactly the same bytes whether it was prepared, streamed or predicted.

    bytes -> JPEG at least twice `size` on its shorter side: libjpeg's reduced-scale decode (1/2,
             1/4 or 1/8, the smallest keeping both sides >= size, as PIL's `Image.draft` picks),
             through libjpeg-turbo's API (simplejpeg) when the file has no Exif, else through PIL,
             which applies the Exif orientation; both give the same pixels
          -> otherwise torchvision.io.decode_image (JPEG, PNG, GIF, WebP; palette, alpha, gray, 16-bit)
          -> PIL for the rest (BMP, TIFF, PPM, ...) or when torchvision.io refuses a file
          (any file whose header declares more than `max_pixels()` is refused first: a small file
          must not make a decoder allocate gigabytes)
          -> RGB uint8 -> 1 channel (PIL's integer luma formula) if asked
          -> shorter side resized to `size` (bilinear, antialias) -> centre crop size x size

The reduced-scale decode computes the scaled image in the inverse DCT (entropy decoding still
reads the whole file), so a small target costs well under a full decode plus a large resize. Its
pixels differ from a full decode followed by the resize by a few levels (about 3 on average,
more on sharp edges); they are still the pixels of this function, which prepare, streaming and
predict all call, so prepared and streamed images stay identical.

Decoding always goes through RGB, and grayscale is computed here with the formula PIL uses, so a
grayscale file gives back its own bytes and a colour file gives back `PIL.Image.convert("L")`,
whatever decoder read it. Alpha is dropped (as `convert("RGB")` does); 16-bit samples keep their
high byte; EXIF orientation is applied, so a photo comes out the way viewers show it.
"""
from __future__ import annotations

import io
import os
import struct
import warnings
from pathlib import Path

import numpy as np
import torch

from phalanx.errors import DecodeError

# Lower-case suffixes of the files an ImageFolder is made of; anything else in the tree is ignored.
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".dib", ".gif", ".webp", ".tif",
                              ".tiff", ".ppm", ".pgm", ".pbm", ".pnm"})

# torchvision 0.29 deprecates its decoders in favour of TorchCodec and warns on every call. They are
# what this module is built on while they exist (torchvision < 0.30 is pinned); should they go,
# the ImportError below falls back to PIL.
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision are deprecated",
                        category=DeprecationWarning)

# Images whose header declares more pixels than this are refused before any decoding: PIL's
# decompression-bomb limit (2 * Image.MAX_IMAGE_PIXELS, 178,956,970 by default), the one that
# `probe`, and so `phalanx data prepare`, already applies through Image.open. Read from PIL when a
# file is decoded, so a program that raises Image.MAX_IMAGE_PIXELS (or sets it to None) moves both.
def max_pixels() -> int | None:
    """The most pixels an image may declare (None: no limit), as PIL's Image.open enforces it."""
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - torchvision depends on Pillow
        return 2 * 89_478_485
    limit = Image.MAX_IMAGE_PIXELS
    return None if limit is None else 2 * int(limit)


# PIL modes whose pixels carry no colour.
_GRAY_MODES = frozenset({"1", "L", "LA", "La", "I", "F", "I;16", "I;16L", "I;16B", "I;16N"})


def is_image_file(path: str | Path) -> bool:
    return os.path.splitext(str(path))[1].lower() in IMAGE_EXTENSIONS


def sniff(head: bytes) -> str | None:
    """Container format from the first bytes of a file ('jpeg', 'png', 'gif', 'webp', ...) or None."""
    if head[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if head[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    if head[:2] == b"BM":
        return "bmp"
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return "tiff"
    return None


# Formats torchvision.io decodes itself; everything else goes straight to PIL.
_TORCHVISION_FORMATS = frozenset({"jpeg", "png", "gif", "webp"})


def read_encoded(source: str | Path | bytes | bytearray | memoryview | torch.Tensor) -> tuple[torch.Tensor, str]:
    """(the encoded file as a 1-D uint8 CPU tensor, a name for messages)."""
    if isinstance(source, torch.Tensor):
        return source.reshape(-1).to(torch.uint8), "<tensor>"
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = np.frombuffer(source, dtype=np.uint8).copy()  # copy: torch wants a writable buffer
        return torch.from_numpy(data), "<bytes>"
    name = str(source)
    try:
        data = np.fromfile(name, dtype=np.uint8)
    except OSError as e:
        raise DecodeError(name, f"cannot read ({e.strerror or e})") from None
    return torch.from_numpy(data), name


def _short_error(e: BaseException) -> str:
    # torchvision's messages start with a C++ source location: keep the part a user can act on.
    msg = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
    if ".cpp:" in msg:
        msg = msg.rsplit(", ", 1)[-1]
    return msg


def _decode_torchvision(data: torch.Tensor) -> torch.Tensor:
    from torchvision.io import ImageReadMode, decode_image
    img = decode_image(data, mode=ImageReadMode.RGB, apply_exif_orientation=True)
    if img.ndim == 4:  # animated GIF: the first frame
        img = img[0]
    if img.dtype != torch.uint8:  # 16-bit PNG: keep the high byte
        img = (img.to(torch.int32) >> 8).to(torch.uint8)
    return img


def _decode_pil(data: torch.Tensor) -> torch.Tensor:
    from PIL import Image, ImageOps
    with Image.open(io.BytesIO(data.numpy().tobytes())) as im:
        im = ImageOps.exif_transpose(im)
        mode = im.mode
        if mode.startswith("I;16") or mode == "I":  # 16/32-bit integer samples: the high byte of 16 bits
            a = (np.clip(np.asarray(im, dtype=np.int64), 0, 65535) >> 8).astype(np.uint8)
        elif mode == "F":
            a = np.clip(np.rint(np.asarray(im, dtype=np.float64)), 0, 255).astype(np.uint8)
        else:
            a = np.array(im.convert("RGB"))
    if a.ndim == 2:
        a = np.repeat(a[:, :, None], 3, axis=2)
    return torch.from_numpy(np.ascontiguousarray(a)).permute(2, 0, 1).contiguous()


# Start-of-frame markers (baseline, extended, progressive, lossless...; not DHT C4, JPG C8, DAC CC).
_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def jpeg_header(data: bytes | memoryview) -> tuple[int, int, bool] | None:
    """(height, width, has an Exif segment) from a JPEG's markers, or None when no frame header is found.

    Written by hand because it is on the hot path of the streaming loader: walking the few marker
    segments costs microseconds, where opening the file with PIL to learn its size costs ~0.2 ms,
    about an eighth of decoding a 400-px JPEG.
    """
    n, i, exif = len(data), 2, False
    while i + 9 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0xD8 or 0xD0 <= marker <= 0xD7 or marker == 0x01:  # no length field
            i += 2
            continue
        length = (data[i + 2] << 8) | data[i + 3]
        if marker == 0xE1 and bytes(data[i + 4:i + 8]) == b"Exif":
            exif = True
        if marker in _SOF:
            return (data[i + 5] << 8) | data[i + 6], (data[i + 7] << 8) | data[i + 8], exif
        if marker == 0xDA or length < 2:  # start of scan before any frame header: malformed
            return None
        i += 2 + length
    return None


def declared_size(data: bytes | memoryview, fmt: str | None) -> tuple[int, int] | None:
    """(height, width) that a PNG, GIF, WebP or JPEG header declares, from its first bytes; None for
    other formats (PIL checks those itself when it opens them) or a header too short to tell."""
    head = bytes(data[:64])
    if fmt == "png" and len(head) >= 24 and head[12:16] == b"IHDR":
        w, h = struct.unpack(">II", head[16:24])
        return h, w
    if fmt == "gif" and len(head) >= 10:  # the logical screen, which every frame is drawn on
        w, h = struct.unpack("<HH", head[6:10])
        return h, w
    if fmt == "webp" and len(head) >= 30:
        return _webp_size(head)
    if fmt == "jpeg":
        header = jpeg_header(data)
        return None if header is None else header[:2]
    return None


def _webp_size(head: bytes) -> tuple[int, int] | None:
    chunk = head[12:16]
    if chunk == b"VP8X":  # extended: 24-bit canvas width - 1 and height - 1
        w = int.from_bytes(head[24:27], "little") + 1
        h = int.from_bytes(head[27:30], "little") + 1
        return h, w
    if chunk == b"VP8L" and head[20] == 0x2F:  # lossless: 14-bit width - 1 and height - 1
        bits = int.from_bytes(head[21:25], "little")
        return ((bits >> 14) & 0x3FFF) + 1, (bits & 0x3FFF) + 1
    if chunk == b"VP8 " and head[23:26] == b"\x9d\x01\x2a":  # lossy key frame: 14-bit width, height
        w, h = struct.unpack("<HH", head[26:30])
        return h & 0x3FFF, w & 0x3FFF
    return None


def too_many_pixels(size: tuple[int, int] | None) -> bool:
    """Whether a declared (height, width) is over `max_pixels()` (False when unknown or unlimited)."""
    limit = max_pixels()
    return size is not None and limit is not None and size[0] * size[1] > limit


def check_pixels(name: str, size: tuple[int, int] | None) -> None:
    """DecodeError when a header declares more pixels than `max_pixels()`: refused before decoding,
    so a small file cannot make a decoder allocate gigabytes (a decompression bomb)."""
    if not too_many_pixels(size):
        return
    limit = max_pixels()
    raise DecodeError(name, f"declares {size[1]}x{size[0]} pixels, more than the limit of {limit:,d} (PIL's "
                            f"decompression-bomb limit); shrink the image or leave it out")


def _reduced_scale(h: int, w: int, min_side: int) -> int:
    """PIL's `draft` rule: the largest of 8, 4, 2, 1 not above min(h // min_side, w // min_side)."""
    r = min(h // min_side, w // min_side)
    return next(d for d in (8, 4, 2, 1) if r >= d)


def _decode_jpeg_turbo(data: torch.Tensor, h: int, w: int, min_side: int) -> torch.Tensor | None:
    """The reduced-scale decode of `_decode_jpeg_reduced` through libjpeg-turbo's own API (simplejpeg):
    the same libjpeg scaled IDCT, so the same pixels, without PIL's per-file overhead (~25% less
    time per 64-px image here). For JPEGs without Exif (nothing to rotate); None when simplejpeg is
    missing or refuses the file (CMYK, ...), and the PIL path takes over."""
    try:
        import simplejpeg
    except ImportError:
        return None
    d = _reduced_scale(h, w, min_side)
    hd, wd = -(-h // d), -(-w // d)  # libjpeg's size at scale 1/d (rounded up)
    try:  # min_factor=d and a minimum size of the 1/d image make libjpeg-turbo pick exactly 1/d
        a = simplejpeg.decode_jpeg(data.numpy(), "RGB", min_height=hd, min_width=wd, min_factor=d)
    except (ValueError, RuntimeError):
        return None
    if a.shape[:2] != (hd, wd):  # another factor was picked (only for tiny images)
        return None
    return torch.from_numpy(a).permute(2, 0, 1)


def _decode_jpeg_reduced(data: torch.Tensor, min_side: int) -> torch.Tensor | None:
    """RGB uint8 (3, H, W) decoded at 1/2, 1/4 or 1/8 scale with both sides still >= min_side, or None
    when the JPEG is under 2 * min_side on a side or PIL cannot decode it that way."""
    from PIL import Image, ImageOps
    try:
        with Image.open(io.BytesIO(data.numpy()), formats=("JPEG",)) as im:
            if min(im.size) < 2 * min_side:
                return None
            # Pillow's rule: scale = the largest of 8, 4, 2 not above min(W // w, H // h) for the size asked.
            im.draft("RGB", (min_side, min_side))
            im = ImageOps.exif_transpose(im)
            a = np.array(im if im.mode == "RGB" else im.convert("RGB"))
    except Exception:  # truncated, CMYK oddities...: the full decode below reports or handles it
        return None
    # (3, H, W) as a view of the (H, W, 3) pixels: the uint8 resize reads channels-last directly.
    return torch.from_numpy(a).permute(2, 0, 1)


def decode_rgb(source: str | Path | bytes | torch.Tensor, min_side: int = 0) -> torch.Tensor:
    """Decode an encoded image to RGB uint8 (3, H, W), possibly a channels-last view; DecodeError if
    unreadable, or before any decoding when its header declares more than `max_pixels()` pixels.

    min_side 0: the native size. min_side > 0: a JPEG whose shorter side is at least 2 * min_side is
    decoded at a reduced scale (1/2, 1/4, 1/8) that keeps both sides >= min_side; other images and
    formats come back at their native size.
    """
    data, name = read_encoded(source)
    if data.numel() == 0:
        raise DecodeError(name, "empty file (0 bytes)")
    fmt = sniff(data[:16].numpy().tobytes())
    header = jpeg_header(memoryview(data.numpy())) if fmt == "jpeg" else None
    check_pixels(name, header[:2] if header is not None else declared_size(memoryview(data.numpy()), fmt))
    if header is not None and min_side > 0 and min(header[:2]) >= 2 * min_side:
        img = None if header[2] else _decode_jpeg_turbo(data, header[0], header[1], min_side)
        if img is None:  # Exif (PIL applies its orientation), no simplejpeg, or a file it refuses
            img = _decode_jpeg_reduced(data, min_side)
        if img is not None:
            return img
    first_error = None
    if fmt in _TORCHVISION_FORMATS:
        try:
            return _decode_torchvision(data)
        except (RuntimeError, ValueError, ImportError) as e:  # e.g. a JPEG variant or WebP not built in
            first_error = e
    try:
        return _decode_pil(data)
    except Exception as e:  # PIL raises many types (UnidentifiedImageError, OSError, SyntaxError...)
        err = first_error or e
        what = f"{fmt.upper()} " if fmt else ""
        if type(e).__name__ == "UnidentifiedImageError" and first_error is None:
            raise DecodeError(name, "not a recognised image format") from None
        raise DecodeError(name, f"cannot decode {what}image ({_short_error(err)})") from None


def to_channels(img: torch.Tensor, channels: int) -> torch.Tensor:
    """RGB uint8 (..., 3, H, W) -> `channels` (1 or 3); gray uses PIL's integer ITU-R 601-2 luma."""
    if channels == 3 or img.shape[-3] == channels:
        return img
    if channels != 1:
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    r, g, b = img.to(torch.int32).unbind(-3)
    # Pillow's Convert.c: L = (R*19595 + G*38470 + B*7471 + 0x8000) >> 16; the weights sum to 65536,
    # so a gray image that was expanded to RGB comes back unchanged.
    luma = (r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16
    return luma.to(torch.uint8).unsqueeze(-3)


def resize_crop(img: torch.Tensor, size: int) -> torch.Tensor:
    """Shorter side to `size` (bilinear, antialias), then the centre size x size; (..., C, H, W) uint8.

    Sizes and crop offsets follow torchvision's Resize(size) + CenterCrop(size). `size` 0 keeps the
    image as it is.
    """
    h, w = img.shape[-2:]
    if size <= 0 or (h == size and w == size):
        return img
    if h <= w:
        nh, nw = size, max(size, int(size * w / h))
    else:
        nh, nw = max(size, int(size * h / w)), size
    if (nh, nw) != (h, w):
        x = img if img.ndim == 4 else img[None]
        if x.device.type == "cpu":  # uint8 in, uint8 out: the CPU kernel has a fast uint8 path
            y = torch.nn.functional.interpolate(x, size=(nh, nw), mode="bilinear", antialias=True,
                                                align_corners=False)
        else:  # CUDA's antialiased kernel takes floating point only
            y = torch.nn.functional.interpolate(x.float(), size=(nh, nw), mode="bilinear", antialias=True,
                                                align_corners=False).round_().clamp_(0, 255).to(torch.uint8)
        img = y if img.ndim == 4 else y[0]
    top, left = int(round((nh - size) / 2.0)), int(round((nw - size) / 2.0))
    return img[..., top:top + size, left:left + size]


def fit(img: torch.Tensor, size: int, channels: int) -> torch.Tensor:
    """RGB uint8 (..., 3, H, W) -> (..., channels, size, size), contiguous."""
    return resize_crop(to_channels(img, channels), size).contiguous()


def decode_chw(source: str | Path | bytes | torch.Tensor, size: int, channels: int) -> torch.Tensor:
    """Decode and fit an image: uint8 tensor (channels, size, size); size 0 keeps the native size.

    A JPEG at least 2 * size on its shorter side is decoded at reduced scale first (module docstring).
    """
    return fit(decode_rgb(source, size), size, channels)


def decode_to_uint8(source: str | Path | bytes | torch.Tensor, size: int, channels: int) -> np.ndarray:
    """Decode and fit an image: uint8 array (size, size, channels), the layout of a prepared store."""
    return decode_chw(source, size, channels).permute(1, 2, 0).contiguous().numpy()


def probe(path: str | Path) -> tuple[int, int, bool]:
    """(height, width, grayscale) from the file's header only, after EXIF orientation; DecodeError if
    the header is unreadable. Cheap: used to choose a store's size and channels before decoding."""
    from PIL import Image
    name = str(path)
    try:
        if os.path.getsize(name) == 0:
            raise DecodeError(name, "empty file (0 bytes)")
        with Image.open(name) as im:
            w, h = im.size
            mode = im.mode
            gray = mode in _GRAY_MODES
            if mode in ("P", "PA"):
                pal = im.getpalette() or []
                gray = all(pal[i] == pal[i + 1] == pal[i + 2] for i in range(0, len(pal) - 2, 3))
            rotated = im.format in ("JPEG", "MPO", "TIFF", "WEBP", "PNG") and im.getexif().get(0x0112, 1) in (5, 6, 7, 8)
            if rotated:  # by 90 degrees
                h, w = w, h
    except DecodeError:
        raise
    except Exception as e:
        if type(e).__name__ == "UnidentifiedImageError":
            raise DecodeError(name, "not a recognised image format") from None
        raise DecodeError(name, f"cannot read the image header ({_short_error(e)})") from None
    return h, w, gray

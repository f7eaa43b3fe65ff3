"""Reader for the idx format of MNIST and Fashion-MNIST, gzipped or raw, validated.

Hand-written rather than torchvision's `read_sn3_pascalvincent_tensor` because that one trusts
the header: a truncated download or a swapped file surfaces later as a shape error deep in
torch. Here every mistake names the file and what is wrong with it.
"""
from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from phalanx.errors import DataError

# idx type codes -> numpy dtypes (big-endian on disk)
_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | Path, expect_ndim: int | None = None) -> np.ndarray:
    """Read one idx file (`.gz` or raw) into a numpy array, validating its header and length."""
    path = Path(path)
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise DataError(f"{path}: cannot read ({e}); the file is truncated or not gzip") from None
    if len(raw) < 4:
        raise DataError(f"{path}: file is {len(raw)} bytes, too short for an idx header")
    if raw[0] != 0 or raw[1] != 0 or raw[2] not in _DTYPES:
        raise DataError(f"{path}: bad magic number {raw[:4].hex()} (expected 0000 08 0N for an idx file)")
    ndim = raw[3]
    if expect_ndim is not None and ndim != expect_ndim:
        raise DataError(f"{path}: has {ndim} dimensions, expected {expect_ndim} "
                        f"({'labels' if expect_ndim == 1 else 'images'} file swapped?)")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated header")
    dims = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_DTYPES[raw[2]])
    need = int(np.prod(dims)) * dtype.itemsize
    have = len(raw) - header
    if have < need:
        raise DataError(f"{path}: truncated: header promises {dims} ({need} bytes of data), file holds {have}")
    if have > need:
        raise DataError(f"{path}: {have - need} bytes of trailing data after {dims}; the file is corrupt")
    return np.frombuffer(raw, dtype=dtype, offset=header, count=int(np.prod(dims))).reshape(dims)


def read_idx_pair(images_path: Path, labels_path: Path, num_classes: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, H, W) uint8 and labels (N,) int64, checked against each other."""
    images = read_idx(images_path, expect_ndim=3)
    labels = read_idx(labels_path, expect_ndim=1)
    if images.dtype != np.uint8:
        raise DataError(f"{images_path}: pixels are {images.dtype}, expected uint8")
    if len(images) != len(labels):
        raise DataError(f"{images_path} holds {len(images)} images but {labels_path} holds "
                        f"{len(labels)} labels; the two files do not belong together")
    labels = labels.astype(np.int64)
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        bad = int(np.flatnonzero((labels < 0) | (labels >= num_classes))[0])
        raise DataError(f"{labels_path}: label {labels[bad]} at index {bad} is out of range 0..{num_classes - 1}")
    return images, labels


def find_idx_files(folder: Path) -> dict[str, tuple[Path, Path]]:
    """Locate train/test image+label idx files in a folder (MNIST naming, gz or raw)."""
    def one(stem: str) -> Path | None:
        for name in (f"{stem}.gz", stem, stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz"):
            if (folder / name).is_file():
                return folder / name
        return None

    out = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        im, lb = one(f"{prefix}-images-idx3-ubyte"), one(f"{prefix}-labels-idx1-ubyte")
        if im and lb:
            out[split] = (im, lb)
    return out

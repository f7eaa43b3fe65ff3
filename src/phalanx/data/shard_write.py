"""`phalanx data shard`: an ImageFolder written as tar shards in WebDataset's layout, plus an index.

Each sample is two tar members, `KEY.jpg` (or `.png`, or the file's own format: `.bmp`, `.gif`, `.webp`...)
holding the encoded file's bytes as they are, and `KEY.cls` holding the class number in ASCII. KEY is the
sample's number in its split, in the order of `phalanx data prepare` (`list_imagefolder`: sorted by class,
then path), so sample KEY of the shards is image KEY of a store prepared from the same folder. With
`size` every image is decoded, resized and centre-cropped exactly as `phalanx data prepare --size` does,
and re-encoded as PNG (lossless: the same pixels as that store).

Training samples are spread over the shards in a fixed shuffled order (seed 0), so every shard holds a mix
of classes; the test (or val) split is written in order, into `test-000000.tar`... beside the training
shards, so one folder (one URL) carries both.

`index.json` (written last: a folder without it holds no finished shards) lists, per split, each shard's
name, sample count, byte size, SHA-256, and the keys and labels of its samples; plus the classes.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from phalanx.data.imageio import decode_chw, sniff
from phalanx.data.prepare import trainable_listing
from phalanx.errors import ConfigError, DataError

INDEX = "index.json"
FORMAT = "phalanx-shards"
VERSION = 1
WRITE_SEED = 0
# WebDataset's extension for each format `imageio.sniff` names (its image decoder reads jpg and png).
EXTENSIONS = {"jpeg": "jpg", "png": "png", "bmp": "bmp", "gif": "gif", "webp": "webp", "tiff": "tif", "ppm": "ppm"}
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_bytes(text: str, what: str) -> int:
    """Bytes of `256MB`, `1.5GiB`, `4096` (decimal units: KB/MB/GB/TB; binary: KiB/MiB/GiB/TiB)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([kmgt]?i?b?)\s*", str(text), re.IGNORECASE)
    unit = m.group(2).upper() if m else ""
    if unit and not unit.endswith("B"):
        unit += "B"
    if not m or unit not in _UNITS or float(m.group(1)) * _UNITS[unit] < 1:
        raise ConfigError(f"{what} {text}: not a byte size; write e.g. 256MB, 2GB or 512MiB")
    return int(float(m.group(1)) * _UNITS[unit])


def shard_name(split: str, k: int) -> str:
    return f"{split}-{k:06d}.tar"


def _member(name: str, data: bytes) -> tuple[tarfile.TarInfo, io.BytesIO]:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uid, info.gid = len(data), 0, 0o644, 0, 0
    info.uname = info.gname = ""
    return info, io.BytesIO(data)


def _encoded(path: Path, size: int, channels: int) -> tuple[bytes, str]:
    """(bytes to store, extension): the file as it is, or re-encoded as PNG at `size`."""
    if size:
        from torchvision.io import encode_png  # torchvision: imported where it is needed (slow import)
        img = decode_chw(path, size, channels)
        return encode_png(img).numpy().tobytes(), "png"
    data = path.read_bytes()
    fmt = sniff(data[:16])
    if fmt not in EXTENSIONS:
        raise DataError(f"{path}: not an image phalanx can read (unknown format); remove it from the folder, "
                        f"or write the shards with --size N to have every image decoded and re-encoded")
    return data, EXTENSIONS[fmt]


def _check_out(out: Path) -> None:
    """OUT must be new, empty, or a shard folder written before (whose files are then replaced)."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out}: a file is in the way; choose a new or empty folder for the shards")
    if out.is_dir() and any(out.iterdir()) and not (out / INDEX).is_file():
        raise ConfigError(f"{out}: not empty and holds no {INDEX}; choose a new or empty folder for the shards "
                          f"(its files are left as they are)")


def _shard_groups(order: list[int], sizes: list[int], shard_size: int) -> Iterator[list[int]]:
    """Consecutive runs of `order` whose payloads (plus tar headers) stay within shard_size, one sample at least."""
    group, used = [], 0
    for i in order:
        need = 512 + -(-sizes[i] // 512) * 512 + 1024  # header and padded data, then the .cls member's two blocks
        # the archive ends with two zero blocks and is padded to tarfile's 10240-byte records
        if group and -(-(used + need + 1024) // tarfile.RECORDSIZE) * tarfile.RECORDSIZE > shard_size:
            yield group
            group, used = [], 0
        group.append(i)
        used += need
    if group:
        yield group


def write_shards(src: Path, out: Path, shard_size: int, size: int = 0, channels: int = 0,
                 progress: bool = True) -> dict:
    """Write the shards and index of the ImageFolder `src` into `out`; return the index."""
    src, out = Path(src), Path(out)
    if size and channels not in (0, 1, 3):
        raise ConfigError(f"--channels {channels}: must be 1 or 3")
    _check_out(out)
    listing = trainable_listing(src, "remove them before writing shards")
    out.mkdir(parents=True, exist_ok=True)
    old = json.loads((out / INDEX).read_text()) if (out / INDEX).is_file() else None
    if old is not None:  # a shard folder written before: its index goes first, so no half-new set looks finished
        (out / INDEX).unlink()
        for split in old.get("splits", {}).values():
            for s in split.get("shards", []):
                (out / s["name"]).unlink(missing_ok=True)
    index = {"format": FORMAT, "version": VERSION, "source": str(src.resolve()), "classes": listing.classes,
             "size": size, "channels": (channels or 3) if size else 0, "splits": {}}
    for split, entries in listing.splits.items():
        n = len(entries)
        order = list(range(n))
        if split == "train":
            g = torch.Generator().manual_seed(WRITE_SEED)
            order = torch.randperm(n, generator=g).tolist()
        files = [src / rel for rel, _ in entries]
        # with --size the PNG's size is known only once encoded: counted as the uncompressed pixels
        sizes = [f.stat().st_size for f in files] if not size else [size * size * (channels or 3) + 1024] * n
        shards = []
        for k, group in enumerate(_shard_groups(order, sizes, shard_size)):
            shards.append(_write_one(out, shard_name(split, k), group, files, entries, size, channels))
            if progress:
                print(f"\rphalanx: {split}: {sum(s['samples'] for s in shards):,d}/{n:,d} images, "
                      f"{len(shards)} shard(s)", end="", flush=True)
        if progress:
            print(flush=True)
        index["splits"][split] = {"samples": n, "shards": shards}
    tmp = out / f".{INDEX}.tmp"
    tmp.write_text(json.dumps(index))
    os.replace(tmp, out / INDEX)
    return index


def _write_one(out: Path, name: str, group: list[int], files: list[Path], entries, size: int, channels: int
               ) -> dict:
    tmp = out / f".{name}.tmp"
    with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
        for i in group:
            data, ext = _encoded(files[i], size, channels)
            key = f"{i:08d}"
            tar.addfile(*_member(f"{key}.{ext}", data))
            tar.addfile(*_member(f"{key}.cls", str(entries[i][1]).encode()))
    digest = hashlib.sha256()
    with open(tmp, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    os.replace(tmp, out / name)
    return {"name": name, "samples": len(group), "bytes": (out / name).stat().st_size,
            "sha256": digest.hexdigest(), "keys": group, "labels": [int(entries[i][1]) for i in group]}


def summary(index: dict, where: str) -> str:
    parts = []
    for split, s in index["splits"].items():
        nbytes = sum(x["bytes"] for x in s["shards"])
        parts.append(f"{split} {s['samples']:,d} images in {len(s['shards'])} shard(s) ({nbytes / 1e6:,.1f} MB)")
    return f"phalanx: shards {where}: {'; '.join(parts)}, {len(index['classes'])} classes" + (
        f", re-encoded as PNG at {index['size']}x{index['size']}" if index["size"] else ", files as they were")


def label_array(index: dict, split: str) -> np.ndarray:
    """Labels of a split by sample key."""
    s = index["splits"][split]
    y = np.empty(s["samples"], dtype=np.int64)
    for sh in s["shards"]:
        y[sh["keys"]] = sh["labels"]
    return y

"""The prepared store: decoded uint8 images in memory-mappable `.npy` files plus a JSON manifest.

    STORE/manifest.json          written last: a store without it is incomplete and never read
    STORE/<split>-images.npy     uint8, (N, H, W, C): NHWC so a gathered batch is channels-last for free
    STORE/<split>-labels.npy     int64, (N,)

Every rank maps the same files, so the OS page cache holds one copy of the dataset per node, not
one per rank. A store is built in a temporary sibling directory and renamed into place, so an
interrupted prepare never leaves something that looks complete.
"""
from __future__ import annotations

import glob
import json
import os
import shutil
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from phalanx.durable import fsync_path, is_count, is_numbers, json_type, plain_file_name, read_json, sha256_file
from phalanx.errors import DataError
from phalanx.paths import process_alive

FORMAT = "phalanx-store"
VERSION = 1
MANIFEST = "manifest.json"


@dataclass
class Split:
    images: np.ndarray  # (N, H, W, C) uint8, usually a read-only memmap
    labels: np.ndarray  # (N,) int64

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class Store:
    path: Path
    manifest: dict
    splits: dict[str, Split] = field(default_factory=dict)

    @property
    def classes(self) -> list[str]:
        return self.manifest["classes"]

    @property
    def shape(self) -> tuple[int, int, int]:
        """(H, W, C) of every image."""
        return tuple(self.manifest["shape"])  # type: ignore[return-value]

    @property
    def mean(self) -> list[float]:
        return self.manifest["mean"]

    @property
    def std(self) -> list[float]:
        return self.manifest["std"]

    def __getitem__(self, split: str) -> Split:
        if split not in self.splits:
            raise DataError(f"{self.path}: store has no split {split!r} (has: {', '.join(self.splits)})")
        return self.splits[split]

    def verify(self) -> None:
        """Recompute every checksum in the manifest; raise DataError on the first mismatch."""
        check_manifest(self.manifest, self.path / MANIFEST)
        for name, info in self.manifest["splits"].items():
            if "sha256" not in info:
                raise DataError(f"{self.path / MANIFEST}: split {name!r} has no 'sha256' field; prepare the store "
                                f"again")
            for kind in ("images", "labels"):
                f = self.path / info[kind]
                if sha256_file(f) != info["sha256"][kind]:
                    raise DataError(f"{f}: checksum differs from {self.path / MANIFEST}; the store is corrupt, "
                                    f"prepare it again")


def channel_stats(images: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of uint8 (N, H, W, C) images scaled to [0, 1], rounded to 6 digits.

    The normalisation of a prepared store, and of a streamed ImageFolder (over a sample of it).
    """
    c = images.shape[-1]
    s = np.zeros(c)
    s2 = np.zeros(c)
    for i in range(0, len(images), 4096):  # chunked: stores can be larger than memory
        blk = np.asarray(images[i:i + 4096], dtype=np.float64).reshape(-1, c) / 255.0
        s += blk.sum(0)
        s2 += (blk ** 2).sum(0)
    n = max(1, len(images) * images.shape[1] * images.shape[2])
    mean = s / n
    return mean.round(6).tolist(), np.sqrt(np.maximum(s2 / n - mean ** 2, 1e-12)).round(6).tolist()


def is_store(path: Path) -> bool:
    """True when `path` holds a complete store: a manifest.json of this format (StoreWriter's), not
    any folder that happens to have a manifest.json (a web project's, say)."""
    try:
        manifest = json.loads((Path(path) / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and manifest.get("format") == FORMAT


KINDS = ("images", "labels")


def _check_split(mpath: Path, name: str, info) -> None:
    where = f"{mpath}: split {name!r}"
    if not isinstance(info, dict):
        raise DataError(f"{where} must be an object, found {json_type(info)}")
    for kind in KINDS:
        f = info.get(kind)
        if not plain_file_name(f):
            raise DataError(f"{where}: field {kind!r} must be a plain file name inside {mpath.parent}, found "
                            f"{f!r}; refusing to read it (prepare the store again)")
    if not is_count(info.get("count")):
        raise DataError(f"{where}: field 'count' must be a non-negative integer, found "
                        f"{json_type(info.get('count'))}")
    sha = info.get("sha256")
    if "sha256" in info and not (isinstance(sha, dict) and all(isinstance(sha.get(k), str) for k in KINDS)):
        raise DataError(f"{where}: field 'sha256' must be an object with 'images' and 'labels' strings")
    cc = info.get("class_counts")
    if "class_counts" in info and not (isinstance(cc, list) and all(map(is_count, cc))):
        raise DataError(f"{where}: field 'class_counts' must be a list of non-negative integers (one per class)")


def check_manifest(manifest, mpath: Path) -> None:
    """The fields of a store manifest that Phalanx reads, by type; one DataError line naming the
    manifest and the field otherwise. File names must be plain names inside the store folder."""
    if not isinstance(manifest, dict):
        raise DataError(f"{mpath}: a manifest must be a JSON object, found {json_type(manifest)}")
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise DataError(f"{mpath}: not a {FORMAT} v{VERSION} manifest")
    classes, shape, splits = manifest.get("classes"), manifest.get("shape"), manifest.get("splits")
    if not (isinstance(classes, list) and classes and all(isinstance(c, str) for c in classes)):
        raise DataError(f"{mpath}: field 'classes' must be a non-empty list of class names, found "
                        f"{json_type(classes)}")
    if not (isinstance(shape, list) and len(shape) == 3 and all(is_count(x) and x > 0 for x in shape)
            and shape[2] in (1, 3)):
        raise DataError(f"{mpath}: field 'shape' must be [height, width, channels] (positive integers, 1 or 3 "
                        f"channels), found {shape!r:.60}")
    if not isinstance(splits, dict):
        raise DataError(f"{mpath}: field 'splits' must be an object (split name -> files), found {json_type(splits)}")
    for name, info in splits.items():
        _check_split(mpath, name, info)
    for key in ("mean", "std"):
        v = manifest.get(key)
        if (key in manifest or splits) and not is_numbers(v, shape[2]):
            raise DataError(f"{mpath}: field {key!r} must be a list of {shape[2]} numbers (one per channel), found "
                            f"{json_type(v)}")
    _check_descriptive(manifest, mpath)


def _check_descriptive(manifest: dict, mpath: Path) -> None:
    """The fields only `phalanx data info` shows: their types, so that it too never fails on them."""
    for key, kind, words in (("options", dict, "an object"), ("skipped", list, "a list"), ("source", str, "a string"),
                             ("created", str, "a string")):
        if key in manifest and not isinstance(manifest[key], kind):
            raise DataError(f"{mpath}: field {key!r} must be {words}, found {json_type(manifest[key])}")
    if not all(isinstance(e, dict) and isinstance(e.get("path"), str) and isinstance(e.get("reason"), str)
               for e in manifest.get("skipped", [])):
        raise DataError(f"{mpath}: field 'skipped' must be a list of {{\"path\", \"reason\"}} objects")
    opts = manifest.get("options", {})
    held, empty = opts.get("held_out"), opts.get("empty_classes")
    number = (int, float)
    if held and not (isinstance(held, dict) and isinstance(held.get("fraction"), number)
                     and isinstance(held.get("seed"), number)):
        raise DataError(f"{mpath}: field 'options.held_out' must be an object with numbers 'fraction' and 'seed'")
    if empty and not (isinstance(empty, list) and all(isinstance(c, str) for c in empty)):
        raise DataError(f"{mpath}: field 'options.empty_classes' must be a list of class names")


def read_manifest(path: str | Path) -> dict:
    """The checked manifest of the store at `path`; DataError (one line) when it is missing or unusable."""
    path = Path(path)
    mpath = path / MANIFEST
    if not mpath.is_file():
        raise DataError(f"{path}: not a prepared store (no {MANIFEST}); an interrupted prepare leaves none, "
                        f"run `phalanx data prepare` again")
    manifest = read_json(mpath, DataError, "manifest")
    check_manifest(manifest, mpath)
    return manifest


def open_store(path: str | Path) -> Store:
    """Map a prepared store read-only; validates the manifest and file sizes, not checksums."""
    path = Path(path)
    manifest = read_manifest(path)
    store = Store(path, manifest)
    shape = tuple(manifest["shape"])
    for name, info in manifest["splits"].items():
        try:
            images = np.load(path / info["images"], mmap_mode="r")
            labels = np.load(path / info["labels"], mmap_mode="r")
        except (OSError, ValueError, EOFError) as e:  # EOFError: an empty file
            raise DataError(f"{path / info['images']}: cannot map ({e}); prepare the store again") from None
        if images.dtype != np.uint8 or images.shape[1:] != shape or len(images) != info["count"]:
            raise DataError(f"{path / info['images']}: shape {images.shape} {images.dtype} does not match the "
                            f"manifest ({info['count']}, {shape}) uint8")
        if len(labels) != info["count"]:
            raise DataError(f"{path / info['labels']}: {len(labels)} labels, manifest says {info['count']}")
        store.splits[name] = Split(images, labels)
    return store


def _same_data(path: Path, manifest: dict) -> bool:
    """True when `path` is a complete store with exactly the classes, shape and split files (by
    SHA-256) of `manifest`."""
    try:
        theirs = read_manifest(path)
    except DataError:
        return False

    def key(m: dict) -> tuple:
        return (m.get("classes"), m.get("shape"), m.get("options"),
                {n: (i.get("count"), i.get("sha256")) for n, i in m.get("splits", {}).items()})
    return isinstance(theirs, dict) and key(theirs) == key(manifest)


def remove_stale_partials(out: Path, host: str) -> list[Path]:
    """Remove the partial stores of `out` that killed prepares on this host left behind (their
    process is gone); partials of live prepares and of other hosts sharing the folder stay."""
    prefix = f"{out.name}.partial-{host}-"
    removed = []
    for p in out.parent.glob(glob.escape(prefix) + "*"):
        pid = p.name[len(prefix):]
        if pid.isdigit() and int(pid) != os.getpid() and not process_alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


class StoreWriter:
    """Builds a store in `OUT.partial-<host>-<pid>`, then renames it to OUT once the manifest is written.

    Usage: `w = StoreWriter(out, classes, shape, source, options)`, then `w.add_split(...)` per split
    (or `w.open_split` + fill the returned memmaps for streaming writers), then `w.commit()`.
    """

    def __init__(self, out: str | Path, classes: list[str], shape: tuple[int, int, int], source: str,
                 options: dict | None = None):
        self.out = Path(out)
        # commit() replaces what is at `out`: only ever an older store or an empty folder, never a
        # folder of the user's that happens to have that name.
        if self.out.exists() and not is_store(self.out) and (not self.out.is_dir() or any(self.out.iterdir())):
            raise DataError(f"{self.out}: exists and is not a prepared store; choose another output folder "
                            f"(it would be replaced)")
        host = socket.gethostname().replace(os.sep, "_")
        self.tmp = self.out.with_name(f"{self.out.name}.partial-{host}-{os.getpid()}")
        remove_stale_partials(self.out, host)
        if self.tmp.exists():
            shutil.rmtree(self.tmp)
        self.tmp.mkdir(parents=True)
        self.manifest = {"format": FORMAT, "version": VERSION, "classes": list(classes), "shape": list(shape),
                         "splits": {}, "source": source, "options": options or {}, "skipped": [],
                         "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
        self._open: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def open_split(self, name: str, count: int) -> tuple[np.ndarray, np.ndarray]:
        """Writable memmaps (images NHWC uint8, labels int64) for a split of `count` images."""
        from numpy.lib.format import open_memmap
        images = open_memmap(self.tmp / f"{name}-images.npy", mode="w+", dtype=np.uint8,
                             shape=(count, *self.manifest["shape"]))
        labels = open_memmap(self.tmp / f"{name}-labels.npy", mode="w+", dtype=np.int64, shape=(count,))
        self._open[name] = (images, labels)
        return images, labels

    def shrink_split(self, name: str, count: int) -> tuple[np.ndarray, np.ndarray]:
        """Keep the first `count` images of a split opened with `open_split`; returns the new memmaps.

        For streaming writers that allocated one slot per file and then found files they could not
        decode. Copies in bounded chunks (a `.npy` header fixes the length, so the file is rewritten).
        """
        from numpy.lib.format import open_memmap
        images, labels = self._open.pop(name)
        if count == len(labels):
            self._open[name] = (images, labels)
            return images, labels
        if not 0 <= count < len(labels):
            raise ValueError(f"cannot shrink split {name!r} of {len(labels)} images to {count}")
        for kind, arr in (("images", images), ("labels", labels)):
            part = self.tmp / f"{name}-{kind}.npy.shrink"
            new = open_memmap(part, mode="w+", dtype=arr.dtype, shape=(count, *arr.shape[1:]))
            rows = max(1, (64 << 20) // max(1, arr.itemsize * int(np.prod(arr.shape[1:]))))
            for i in range(0, count, rows):
                new[i:min(count, i + rows)] = arr[i:min(count, i + rows)]
            new.flush()
            del new
            os.replace(part, self.tmp / f"{name}-{kind}.npy")
        del images, labels, arr
        im = open_memmap(self.tmp / f"{name}-images.npy", mode="r+")
        lb = open_memmap(self.tmp / f"{name}-labels.npy", mode="r+")
        self._open[name] = (im, lb)
        return im, lb

    def add_split(self, name: str, images: np.ndarray, labels: np.ndarray) -> None:
        if images.ndim == 3:
            images = images[..., None]
        im, lb = self.open_split(name, len(labels))
        im[:] = images
        lb[:] = labels

    def commit(self, skipped: list[dict] | None = None) -> Path:
        """Finish the store: statistics, checksums, fsync, manifest last, atomic rename."""
        self.manifest["skipped"] = skipped or []
        n_cls = len(self.manifest["classes"])
        for name, (images, labels) in self._open.items():
            images.flush()
            labels.flush()
            info = {"count": int(len(labels)), "images": f"{name}-images.npy", "labels": f"{name}-labels.npy",
                    "class_counts": np.bincount(np.asarray(labels), minlength=n_cls).tolist()}
            if name == "train" or "mean" not in self.manifest:
                self.manifest["mean"], self.manifest["std"] = channel_stats(images)
            del images, labels
            self.manifest["splits"][name] = info
        self._open.clear()
        for name, info in self.manifest["splits"].items():
            info["sha256"] = {k: sha256_file(self.tmp / info[k]) for k in ("images", "labels")}
            for k in ("images", "labels"):
                with open(self.tmp / info[k], "rb+") as f:
                    os.fsync(f.fileno())
        mtmp = self.tmp / (MANIFEST + ".tmp")
        mtmp.write_text(json.dumps(self.manifest, indent=1))
        with open(mtmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(mtmp, self.tmp / MANIFEST)
        fsync_path(self.tmp)
        if _same_data(self.out, self.manifest):
            # Another process (another node sharing this cache, say) committed the same images first:
            # keep its store, whose files ranks may already have mapped, and drop this copy.
            shutil.rmtree(self.tmp, ignore_errors=True)
            return self.out
        if self.out.exists():  # replacing an older or incomplete store
            old = self.out.with_name(f"{self.out.name}.old-{os.getpid()}")
            os.replace(self.out, old)
            shutil.rmtree(old, ignore_errors=True)
        os.replace(self.tmp, self.out)
        fsync_path(self.out.parent)
        return self.out

    def abort(self) -> None:
        self._open.clear()
        shutil.rmtree(self.tmp, ignore_errors=True)

"""Turn raw images into a prepared store (see store.py); `phalanx data prepare|info|verify` is commands/data.py.

    idx folder     MNIST / Fashion-MNIST idx files               -> read as they are (idx.read_idx_pair)
    CIFAR-10/100   the *binary* version (data_batch_N.bin, ...)   -> fixed-size records parsed with numpy;
                   the python version is refused: it is pickle, and unpickling runs code
    ImageFolder    ROOT/<class>/**/<image>, or ROOT/train/<class>/... with ROOT/val|test/<class>/...
                   -> decoded in worker processes (imageio.decode_chw), resized, centre-cropped

An ImageFolder is prepared in up to two parallel passes over chunks of files: a header scan (only
when the size or channel count has to be chosen from the images) and the decode, whose results
the main process writes, in order, into the store's memory-mapped arrays, so memory stays bounded
by a few chunks. Unreadable files are collected, never fatal on their own: at the end they are
either all listed in one error, or (`skip_bad`) recorded in the manifest. The store is built by
StoreWriter in a temporary directory and renamed into place last, so an interrupted prepare leaves
nothing that looks complete; a prepare whose store is already there returns at once.
"""
from __future__ import annotations

import collections
import hashlib
import multiprocessing
import os
import shutil
import signal
import sys
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from phalanx.data import imageio
from phalanx.data.idx import find_idx_files, read_idx_pair
from phalanx.data.imageio import IMAGE_EXTENSIONS, decode_to_uint8, fit, is_image_file, probe
from phalanx.data.store import MANIFEST, StoreWriter, is_store, open_store, read_manifest
from phalanx.errors import ConfigError, DataError, DecodeError
from phalanx.paths import check_destination, check_path, inside
from phalanx.runtime.cpu import PROCESSES_PER_CORE, max_processes, usable_cores

DEFAULT_SIZE = 64          # side of the images when they do not all share one square size
HELD_OUT_FRACTION = 0.1    # share of each class held out as "test" when the tree has no split folders
HELD_OUT_SEED = 0
DECODE_CHUNK = 32          # files per task sent to a worker process
PROBE_CHUNK = 256
SPLIT_DIRS = ("train", "val", "test")

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
CIFAR100_CLASSES = (  # noqa: SIM905 (a list literal of 100 names would be 100 lines or one unreadable one)
    "apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus butterfly camel can "
    "castle caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile cup dinosaur dolphin "
    "elephant flatfish forest fox girl hamster house kangaroo keyboard lamp lawn_mower leopard lion lizard lobster "
    "man maple_tree motorcycle mountain mouse mushroom oak_tree orange orchid otter palm_tree pear pickup_truck "
    "pine_tree plain plate poppy porcupine possum rabbit raccoon ray road rocket rose sea seal shark shrew skunk "
    "skyscraper snail snake spider squirrel streetcar sunflower sweet_pepper table tank telephone television tiger "
    "tractor train trout tulip turtle wardrobe whale willow_tree wolf woman worm").split()
_CIFAR_SUBDIR = {"cifar10": "cifar-10-batches-bin", "cifar100": "cifar-100-binary"}
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot"]
MNIST_CLASSES = [str(i) for i in range(10)]


# ----------------------------------------------------------------------------- what is this folder?

def _subdirs(folder: Path) -> list[Path]:
    try:
        return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError:
        return []


def _has_image_below(folder: Path) -> bool:
    for _, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        if any(is_image_file(f) and not f.startswith(".") for f in filenames):
            return True
    return False


def _split_layout(root: Path) -> dict[str, Path] | None:
    """{split: folder} when ROOT holds train/ and val/ or test/, each a folder of class folders."""
    subs = {p.name: p for p in _subdirs(root)}
    if "train" not in subs or not ("val" in subs or "test" in subs):
        return None
    found = {s: subs[s] for s in SPLIT_DIRS if s in subs}
    if all(_subdirs(p) for p in found.values()) and any(_has_image_below(p) for p in _subdirs(found["train"])):
        return found
    return None


def detect_kind(path: Path) -> str | None:
    """What kind of data source `path` is: 'store', 'idx', 'cifar10', 'cifar100', 'imagefolder', or None.

    The one place that tells sources apart: `phalanx data prepare`, `--data` and `--data.stream` all
    ask it. Raises DataError for the python (pickle) version of CIFAR, which is never read.
    """
    path = Path(path)
    if is_store(path):
        return "store"
    if not path.is_dir():
        return None
    if find_idx_files(path):
        return "idx"
    names = set(os.listdir(path))
    for kind, sub in _CIFAR_SUBDIR.items():
        if sub in names and (path / sub).is_dir():
            return kind
    if "test_batch.bin" in names or any(n.startswith("data_batch_") and n.endswith(".bin") for n in names):
        return "cifar10"
    if "train.bin" in names or "test.bin" in names:
        return "cifar100"
    if ({"cifar-10-batches-py", "cifar-100-python"} & names or "data_batch_1" in names
            or ({"train", "test", "meta"} <= names and (path / "train").is_file())):
        raise DataError(f"{path}: this is the python (pickle) version of CIFAR, which Phalanx does not read "
                        f"(unpickling can run arbitrary code). Download the binary version instead: "
                        f"cifar-10-binary.tar.gz or cifar-100-binary.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html")
    if _split_layout(path) is not None:
        return "imagefolder"
    if any(_has_image_below(d) for d in _subdirs(path)):
        return "imagefolder"
    return None


# ----------------------------------------------------------------------------- ImageFolder listing

@dataclass
class FolderListing:
    """The files of an ImageFolder tree and how they are split; paths are relative to `root`."""
    root: Path
    classes: list[str]
    splits: dict[str, list[tuple[str, int]]]   # split -> [(relative path, label)], sorted by (label, path)
    layout: str                                # "splits": train/ + val|test/ folders; "classes": one tree
    empty_classes: list[str] = field(default_factory=list)
    ignored_files: int = 0                     # files without an image extension, or outside class folders
    zero_byte: list[str] = field(default_factory=list)
    held_out: dict | None = None
    fingerprint: str = ""                      # changes when any image file is added, removed or modified


def file_stamp(path: str | Path, name: str | None = None) -> tuple[str, int, int]:
    """(name, size, mtime in ns) of a file, (name, -1, -1) when it cannot be stat'ed; name defaults to path."""
    name = str(path) if name is None else name
    try:
        st = os.stat(path)
    except OSError:  # a dangling symlink: whoever reads the file reports it
        return name, -1, -1
    return name, st.st_size, st.st_mtime_ns


def fingerprint(stamps: Iterable[tuple[str, int, int]]) -> str:
    """sha1 of `file_stamp`s, in the order given: changes when a file is added, removed, renamed or rewritten.

    The one test of "is this source still what was prepared": a store records it in its options
    (ImageFolder, CIFAR, idx), and the cache names a raw source's store by it. File sizes and
    mtimes, not contents: reading every image would cost as much as preparing them again.
    """
    h = hashlib.sha1()
    for name, size, mtime_ns in stamps:
        h.update(f"{name}\0{size}\0{mtime_ns}\0".encode())
    return h.hexdigest()


def _walk_images(folder: Path, root: Path, stamps: list[tuple[str, int, int]], zero: list[str]
                 ) -> tuple[list[str], int]:
    """Image files below `folder` (recursively, symlinks followed once), relative to root; + ignored count.
    Appends each file's `file_stamp` to `stamps` and the empty ones to `zero`.

    `folder` itself may be a link to anywhere; a link to a directory below it must stay inside it:
    one pointing elsewhere (a parent, another class or split, outside the tree) would count images
    again or under the wrong class, so it is refused with a DataError naming it.
    """
    files, ignored, seen = [], 0, set()
    top = os.path.realpath(folder)
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        st = os.stat(dirpath)
        if (st.st_dev, st.st_ino) in seen:  # a symlink loop
            dirnames[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for d in dirnames:
            _check_dir_link(os.path.join(dirpath, d), top, folder)
        for name in filenames:
            if name.startswith("."):
                continue
            if not is_image_file(name):
                ignored += 1
                continue
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, root)
            stamps.append(file_stamp(full, rel))
            if stamps[-1][1] == 0:
                zero.append(rel)
            files.append(rel)
    return sorted(files), ignored


def _check_dir_link(path: str, top: str, folder: Path) -> None:
    """DataError when `path` is a link to a directory that is not strictly inside `top` (the real
    path of the class folder `folder`)."""
    if not os.path.islink(path):
        return
    target = os.path.realpath(path)
    if target.startswith(top.rstrip(os.sep) + os.sep):
        return
    above = (top + os.sep).startswith(target.rstrip(os.sep) + os.sep)
    where = "the class folder itself or a folder above it" if above else "a folder outside it"
    raise DataError(f"{path}: a link to {where} ({target}); Phalanx does not follow it, as its images would count "
                    f"again or under the wrong class. Remove the link, or move the images themselves into {folder}")


def trainable_listing(root: Path, remedy: str) -> FolderListing:
    """`list_imagefolder(root)` for reading every file as it is (streaming, shards): refused in one line when it
    holds empty files (`remedy` says what to do) or no training images."""
    listing = list_imagefolder(root)
    if listing.zero_byte:
        raise DataError(f"{root}: {len(listing.zero_byte)} empty (0-byte) image file(s), first "
                        f"{listing.zero_byte[0]}; {remedy}")
    if not listing.splits.get("train"):
        raise DataError(f"{root}: no training images")
    return listing


def _held_out_rank(rel: str, seed: int) -> bytes:
    # A file's place depends on its own path only: stable across platforms and library versions,
    # and adding files to a class moves few others between train and test.
    return hashlib.sha1(f"{seed}:{rel.replace(os.sep, '/')}".encode()).digest()


def list_imagefolder(root: Path, held_out: float = HELD_OUT_FRACTION, seed: int = HELD_OUT_SEED) -> FolderListing:
    """List an ImageFolder tree; without train/ + val|test/ folders, hold out a stratified test split.

    Held-out rule: per class of n files, the round(n * held_out) files (at least 1 when n >= 2, never
    all of them) whose sha1(f"{seed}:{path}") is smallest.
    """
    root = Path(root)
    layout = _split_layout(root)
    stamps: list[tuple[str, int, int]] = []
    zero: list[str] = []
    ignored = 0
    if layout is not None:
        classes = [p.name for p in _subdirs(layout["train"])]
        index = {c: i for i, c in enumerate(classes)}
        splits: dict[str, list[tuple[str, int]]] = {}
        counts = collections.Counter()
        for split, folder in layout.items():
            extra = [p.name for p in _subdirs(folder) if p.name not in index]
            if extra:
                raise DataError(f"{folder}: class folder(s) {', '.join(extra)} are not in {layout['train']}; "
                                f"every split must use the training classes")
            entries = []
            for cdir in _subdirs(folder):
                files, ign = _walk_images(cdir, root, stamps, zero)
                ignored += ign
                entries += [(f, index[cdir.name]) for f in files]
                if split == "train":
                    counts[cdir.name] += len(files)
            splits[split] = entries
        listing = FolderListing(root, classes, splits, "splits")
        listing.empty_classes = [c for c in classes if counts[c] == 0]
    else:
        cdirs = _subdirs(root)
        classes = [p.name for p in cdirs]
        by_class = []
        for cdir in cdirs:
            files, ign = _walk_images(cdir, root, stamps, zero)
            ignored += ign
            by_class.append(files)
        train, test = [], []
        for label, files in enumerate(by_class):
            n = len(files)
            k = min(max(1, round(n * held_out)), n - 1) if n >= 2 and held_out > 0 else 0
            chosen = set(sorted(files, key=lambda f: _held_out_rank(f, seed))[:k])
            train += [(f, label) for f in files if f not in chosen]
            test += [(f, label) for f in files if f in chosen]
        listing = FolderListing(root, classes, {"train": train, "test": test}, "classes")
        listing.empty_classes = [c for c, files in zip(classes, by_class) if not files]
        listing.held_out = {"split": "test", "fraction": held_out, "seed": seed, "stratified": True,
                            "rule": "per class of n files: the round(n*fraction) files (>= 1 when n >= 2, < n) "
                                    "with the smallest sha1('<seed>:<path>')"}
    # Images lying next to the class folders (or next to train/, val/) belong to no class.
    for folder in [root, *(layout.values() if layout else [])]:
        ignored += sum(1 for f in os.listdir(folder) if not f.startswith(".") and (folder / f).is_file())
    listing.ignored_files, listing.zero_byte, listing.fingerprint = ignored, sorted(zero), fingerprint(stamps)
    return listing


# ----------------------------------------------------------------------------- worker processes

def _init_worker() -> None:
    import torch
    torch.set_num_threads(1)  # one decode per process: the pool is the parallelism
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is handled once, by the main process


def _probe_chunk(paths: list[str]) -> list[tuple[int, int, bool] | str]:
    """(height, width, gray) per file, or the reason it is unreadable."""
    out: list[tuple[int, int, bool] | str] = []
    for p in paths:
        try:
            out.append(probe(p))
        except DecodeError as e:
            out.append(e.reason)
    return out


def _decode_chunk(paths: list[str], size: int, channels: int) -> tuple[np.ndarray, list[tuple[int, str]]]:
    """(decoded images of the readable files, in order; [(position in `paths`, reason)] of the others)."""
    out = np.empty((len(paths), size, size, channels), dtype=np.uint8)
    bad, k = [], 0
    for i, p in enumerate(paths):
        try:
            out[k] = decode_to_uint8(p, size, channels)
            k += 1
        except DecodeError as e:
            bad.append((i, e.reason))
    return out[:k], bad


POOL_MIN_TASKS = 8
"""With --workers 0 (one per core), fewer chunks than this (256 files) decode in this process: starting the
pool's server (it preloads torch) took ~3-5 s on 2 cores, decoding 110 small JPEGs in-process 0.1 s."""


def _make_pool(workers: int, tasks: int) -> ProcessPoolExecutor | None:
    n = min(workers or usable_cores(), tasks)
    if n <= 1 or (workers == 0 and tasks < POOL_MIN_TASKS):
        return None  # decoding in this process: no start-up cost for small jobs
    # forkserver: workers fork from a clean server that preloaded this module (torch included), so
    # they start fast and inherit none of the caller's threads (a training process may hold CUDA or
    # process-group threads that make a plain fork unsafe).
    if "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload([__name__, "torchvision.io", "PIL.Image", "PIL.PngImagePlugin",
                                    "PIL.JpegImagePlugin"])
    else:  # pragma: no cover - no forkserver on this platform
        ctx = multiprocessing.get_context("spawn")
    return ProcessPoolExecutor(max_workers=n, mp_context=ctx, initializer=_init_worker)


def _chunks(items: list, size: int) -> list[list]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def _ordered_map(pool: ProcessPoolExecutor | None, fn: Callable, chunks: Iterable[list], *args) -> Iterator:
    """fn(chunk, *args) for each chunk, results in order; at most 2 chunks per worker in flight, so
    finished chunks waiting for a slow one stay few (memory bounded)."""
    if pool is None:
        for c in chunks:
            yield fn(c, *args)
        return
    window = 2 * pool._max_workers  # noqa: SLF001 - the size it was created with
    pending: collections.deque[Future] = collections.deque()
    it = iter(chunks)
    try:
        for c in it:
            pending.append(pool.submit(fn, c, *args))
            if len(pending) >= window:
                break
        while pending:
            try:
                res = pending.popleft().result()
            except BrokenProcessPool:
                raise DataError("a decoding worker process died (out of memory? or prepare() called at the top "
                                "level of a script without `if __name__ == '__main__':`, which worker processes "
                                "import); rerun with --workers 1 to decode in this process") from None
            nxt = next(it, None)
            if nxt is not None:
                pending.append(pool.submit(fn, nxt, *args))
            yield res
    finally:
        for f in pending:
            f.cancel()


def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit="img", disable=not enabled, dynamic_ncols=True, file=sys.stderr,
                mininterval=0.5, smoothing=0.1)


def _bad_files_error(src: Path, bad: dict[str, str]) -> DataError:
    lines = "\n".join(f"  {rel}: {why}" for rel, why in sorted(bad.items()))
    return DataError(f"{src}: {len(bad)} unreadable image file(s); fix or remove them, or rerun with --skip-bad "
                     f"to leave them out (they are then listed in the store's manifest):\n{lines}")


# ----------------------------------------------------------------------------- prepare

def _bytes_text(n: float) -> str:
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:.0f} bytes"


def check_room(out: Path, images: int, shape: tuple[int, int, int]) -> None:
    """ConfigError, before anything is written, when a store of `images` images of `shape` (h, w, c) would
    not fit the free space of the file system `out` goes on (the old store there is replaced only after
    the new one is complete, so its space does not count)."""
    h, w, c = shape
    need = images * (h * w * c + 8)  # uint8 pixels and an int64 label per image
    probe = out
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if need > free:
        raise ConfigError(f"{out}: the store would take ~{_bytes_text(need)} ({images:,d} images of {h}x{w}x{c}), "
                          f"more than the {_bytes_text(free)} free on its disk; choose a smaller --size, or an "
                          f"output folder on a disk with more room")


def _matching_store(out: Path, source: str, key: dict) -> bool:
    """A complete store from the same source with the same options is already at `out`."""
    try:
        m = open_store(out).manifest  # files present, shapes as the manifest says
    except (OSError, ValueError):
        return False
    opts = m.get("options", {})
    return m.get("source") == source and all(opts.get(k) == v for k, v in key.items())


def _warn_once_on_bad(bad: dict[str, str], skip_bad: bool) -> Callable:
    """note(bar): on the first unreadable file (unless skip_bad), say the prepare will fail at the end."""
    warned = False

    def note_bad(bar) -> None:
        nonlocal warned
        if bad and not skip_bad and not warned:
            warned = True
            bar.write(f"phalanx: found unreadable image file(s) (first: {next(iter(bad))}); the prepare will stop "
                      f"with the full list at the end (--skip-bad leaves them out)", file=sys.stderr)

    return note_bad


def _scan_headers(pool: ProcessPoolExecutor | None, src: Path, todo: list[str], bad: dict[str, str],
                  progress: bool, note_bad: Callable) -> tuple[set[tuple[int, int]], bool]:
    """(the (height, width)s seen, whether every image is gray) from the files' headers; unreadable ones go to `bad`."""
    shapes, gray = set(), True
    with _progress(len(todo), "scan", progress) as bar:
        chunks = _chunks(todo, PROBE_CHUNK)
        for chunk, res in zip(chunks, _ordered_map(pool, _probe_chunk, [[str(src / r) for r in c]
                                                                         for c in chunks])):
            for rel, r in zip(chunk, res):
                if isinstance(r, str):
                    bad[rel] = r
                else:
                    shapes.add(r[:2])
                    gray &= r[2]
            bar.update(len(chunk))
            note_bad(bar)
    return shapes, gray


def _choose_shape(pool: ProcessPoolExecutor | None, src: Path, todo: list[str], bad: dict[str, str], size: int,
                  channels: int, progress: bool, note_bad: Callable) -> tuple[int, int]:
    """(size, channels), each kept when given and otherwise chosen from one cheap pass over the headers."""
    shapes, gray = _scan_headers(pool, src, todo, bad, progress, note_bad)
    if not shapes:
        raise _bad_files_error(src, bad)
    if size == 0:
        h, w = next(iter(shapes))
        size = h if len(shapes) == 1 and h == w else DEFAULT_SIZE
    if channels == 0:
        channels = 1 if gray else 3
    return size, channels


def _imagefolder_writer(out: Path, listing: FolderListing, source: str, key: dict, size: int,
                        channels: int) -> StoreWriter:
    """The StoreWriter of the store, its manifest options saying how the folder was read."""
    options = dict(key, layout=listing.layout, held_out=listing.held_out, empty_classes=listing.empty_classes,
                   ignored_files=listing.ignored_files,
                   resize=f"shorter side to {size} (bilinear, antialias), centre crop {size}x{size}",
                   decoder="torchvision.io, PIL fallback; RGB, gray by PIL's luma formula")
    return StoreWriter(out, listing.classes, (size, size, channels), source=source, options=options)


def _decode_split(writer: StoreWriter, pool: ProcessPoolExecutor | None, src: Path, split: str,
                  entries: list[tuple[str, int]], bad: dict[str, str], size: int, channels: int, bar,
                  note_bad: Callable) -> int:
    """Decode one split's files into the store, in order; returns how many were readable (the rest go to `bad`)."""
    entries = [e for e in entries if e[0] not in bad]
    images, labels = writer.open_split(split, len(entries))
    pos = 0
    chunks = _chunks(entries, DECODE_CHUNK)
    paths = ([str(src / rel) for rel, _ in c] for c in chunks)
    for chunk, (arr, chunk_bad) in zip(chunks, _ordered_map(pool, _decode_chunk, paths, size, channels)):
        skip = {i for i, _ in chunk_bad}
        for i, why in chunk_bad:
            bad[chunk[i][0]] = why
        good = [lab for i, (_, lab) in enumerate(chunk) if i not in skip]
        images[pos:pos + len(good)] = arr
        labels[pos:pos + len(good)] = good
        pos += len(good)
        bar.update(len(chunk))
        note_bad(bar)
    if pos < len(entries):
        writer.shrink_split(split, pos)
    return pos


def _commit_imagefolder(writer: StoreWriter, src: Path, kept: dict[str, int], bad: dict[str, str],
                        skip_bad: bool) -> Path:
    """Fail on unreadable files (unless skip_bad) or an empty train split; else commit, listing the skipped."""
    if bad and not skip_bad:
        raise _bad_files_error(src, bad)
    if kept.get("train", 0) == 0:
        raise DataError(f"{src}: no readable training images")
    skipped = [{"path": rel, "reason": why} for rel, why in sorted(bad.items())]
    return writer.commit(skipped)


def _prepare_imagefolder(src: Path, out: Path, size: int, channels: int, workers: int, skip_bad: bool,
                         progress: bool) -> Path:
    listing = list_imagefolder(src)
    source = str(src.resolve())
    key = {"kind": "imagefolder", "size": size, "channels": channels, "skip_bad": skip_bad,
           "fingerprint": listing.fingerprint}
    if _matching_store(out, source, key):
        return out
    total = sum(len(v) for v in listing.splits.values())
    if total == 0:
        raise DataError(f"{src}: no image files in any class folder (looked for "
                        f"{', '.join(sorted(e.lstrip('.') for e in IMAGE_EXTENSIONS))})")
    bad: dict[str, str] = {rel: "empty file (0 bytes)" for rel in listing.zero_byte}
    if size:  # before the header scan, with the fewest channels; exactly once the shape is known
        check_room(out, total - len(bad), (size, size, channels or 1))
    note_bad = _warn_once_on_bad(bad, skip_bad)
    todo = [rel for entries in listing.splits.values() for rel, _ in entries if rel not in bad]
    pool = _make_pool(workers, max(1, -(-total // DECODE_CHUNK)))
    try:
        if size == 0 or channels == 0:  # choose from the headers: one cheap pass
            size, channels = _choose_shape(pool, src, todo, bad, size, channels, progress, note_bad)
        check_room(out, total - len(bad), (size, size, channels))
        writer = _imagefolder_writer(out, listing, source, key, size, channels)
        try:
            with _progress(total - len(bad), "decode", progress) as bar:
                kept = {split: _decode_split(writer, pool, src, split, entries, bad, size, channels, bar, note_bad)
                        for split, entries in listing.splits.items()}
            return _commit_imagefolder(writer, src, kept, bad, skip_bad)
        except BaseException:
            writer.abort()
            raise
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


def _read_cifar_file(path: Path, label_bytes: int, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(images NHWC uint8, labels int64) of one CIFAR binary file, validated."""
    rec = label_bytes + 3 * 32 * 32
    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size == 0 or raw.size % rec:
        raise DataError(f"{path}: {raw.size} bytes is not a whole number of {rec}-byte CIFAR-"
                        f"{100 if label_bytes == 2 else 10} records; the file is truncated or not CIFAR binary")
    r = raw.reshape(-1, rec)
    if label_bytes == 2 and (bad := np.flatnonzero(r[:, 0] >= 20)).size:
        raise DataError(f"{path}: coarse label {r[bad[0], 0]} of record {bad[0]} is out of range 0..19; "
                        f"not a CIFAR-100 file")
    labels = r[:, label_bytes - 1].astype(np.int64)  # CIFAR-100: the fine label is the second byte
    if (bad := np.flatnonzero(labels >= num_classes)).size:
        raise DataError(f"{path}: label {labels[bad[0]]} of record {bad[0]} is out of range 0..{num_classes - 1}; "
                        f"not a CIFAR-{num_classes} file")
    images = r[:, label_bytes:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return images, labels


def _class_names(path: Path, default: list[str]) -> list[str]:
    try:
        names = [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
    except OSError:
        return default
    return names if len(names) == len(default) else default


def _prepare_cifar(src: Path, out: Path, kind: str, size: int, channels: int, progress: bool) -> Path:
    root = src / _CIFAR_SUBDIR[kind] if (src / _CIFAR_SUBDIR[kind]).is_dir() else src
    if kind == "cifar10":
        files = {"train": [root / f"data_batch_{i}.bin" for i in range(1, 6)], "test": [root / "test_batch.bin"]}
        label_bytes, classes = 1, _class_names(root / "batches.meta.txt", CIFAR10_CLASSES)
    else:
        files = {"train": [root / "train.bin"], "test": [root / "test.bin"]}
        label_bytes, classes = 2, _class_names(root / "fine_label_names.txt", CIFAR100_CLASSES)
    missing = [p.name for fs in files.values() for p in fs if not p.is_file()]
    if missing:
        raise DataError(f"{root}: CIFAR-{len(classes)} binary file(s) missing: {', '.join(missing)}")
    rec = label_bytes + 3072
    counts = {}
    for fs in files.values():
        for p in fs:
            n = p.stat().st_size
            if n == 0 or n % rec:
                raise DataError(f"{p}: {n} bytes is not a whole number of {rec}-byte CIFAR-{len(classes)} records; "
                                f"the file is truncated or not CIFAR binary")
            counts[p] = n // rec
    train_counts = {counts[p] for p in files["train"]}
    if len(train_counts) > 1:
        lines = ", ".join(f"{p.name}: {counts[p]}" for p in files["train"])
        raise DataError(f"{root}: training batches hold different numbers of records ({lines}); one is truncated")
    source = str(src.resolve())
    key = {"kind": kind, "size": size, "channels": channels,
           "fingerprint": fingerprint(file_stamp(p, p.name) for p in sorted(counts))}
    if _matching_store(out, source, key):
        return out
    s, c = size or 32, channels or 3
    check_room(out, sum(counts.values()), (s, s, c))
    options = dict(key, files={k: [p.name for p in v] for k, v in files.items()},
                   resize="none" if s == 32 else f"32x32 to {s}x{s} (bilinear, antialias)")
    writer = StoreWriter(out, classes, (s, s, c), source=source, options=options)
    try:
        import torch
        with _progress(sum(counts.values()), "read", progress) as bar:
            for split, fs in files.items():
                images, labels = writer.open_split(split, sum(counts[p] for p in fs))
                pos = 0
                for p in fs:
                    im, lb = _read_cifar_file(p, label_bytes, len(classes))
                    if (s, c) != (32, 3):
                        for i in range(0, len(im), 1000):
                            x = torch.from_numpy(np.ascontiguousarray(im[i:i + 1000])).permute(0, 3, 1, 2)
                            images[pos + i:pos + i + len(x)] = fit(x, s, c).permute(0, 2, 3, 1).numpy()
                    else:
                        images[pos:pos + len(im)] = im
                    labels[pos:pos + len(lb)] = lb
                    pos += len(lb)
                    bar.update(len(lb))
        return writer.commit()
    except BaseException:
        writer.abort()
        raise


def _prepare_idx(src: Path, out: Path, size: int, channels: int) -> Path:
    if size != 0 or channels not in (0, 1):
        raise DataError(f"{src}: idx files are prepared as they are (grayscale, native size); "
                        f"leave out --size and --channels")
    files = find_idx_files(src)
    if "train" not in files:
        raise DataError(f"{src}: no train-images-idx3-ubyte[.gz] + train-labels-idx1-ubyte[.gz] found")
    source = str(src.resolve())
    key = {"kind": "idx", "fingerprint": fingerprint(file_stamp(p, p.name) for pair in files.values() for p in pair)}
    if _matching_store(out, source, key):
        return out
    pairs = {split: read_idx_pair(*paths) for split, paths in files.items()}
    h, w = pairs["train"][0].shape[1:]
    check_room(out, sum(len(labels) for _, labels in pairs.values()), (h, w, 1))
    classes = FASHION_CLASSES if "fashion" in str(src).lower() else MNIST_CLASSES
    writer = StoreWriter(out, classes, (h, w, 1), source=source, options=key)
    try:
        for split, (images, labels) in pairs.items():
            if images.shape[1:] != (h, w):
                raise DataError(f"{files[split][0]}: images are {images.shape[1:]}, train images are {(h, w)}")
            writer.add_split(split, images, labels)
        return writer.commit()
    except BaseException:
        writer.abort()
        raise


def prepare(src: Path, out: Path, size: int = 0, channels: int = 0, workers: int = 0, skip_bad: bool = False,
            progress: bool = True) -> Path:
    """Build the prepared store `out` from `src` (idx folder, CIFAR binaries or ImageFolder); returns `out`.

    size: side of the square images (0: the images' own size when they all share one square size, else
    64; CIFAR and idx: native). channels: 1 or 3 (0: 1 when every image is grayscale, else 3).
    workers: decoding processes (0: one per usable CPU). skip_bad: leave unreadable files out and list
    them in the manifest instead of failing. Returns at once when `out` already holds this store.
    """
    src, out = Path(src).expanduser(), Path(out).expanduser()
    if size < 0:
        raise DataError(f"--size {size}: must be >= 0 (0: choose from the images)")
    if channels not in (0, 1, 3):
        raise DataError(f"--channels {channels}: must be 1 (grayscale) or 3 (RGB)")
    if workers < 0:
        raise DataError(f"--workers {workers}: must be >= 0 (0: one per CPU)")
    if imageio.too_many_pixels((size, size)):
        raise ConfigError(f"--size {size}: a {size}x{size} image has more pixels than the decoder accepts in any "
                          f"image ({imageio.max_pixels():,d}); choose a side such as 64, 224 or 512")
    if workers > (most := max_processes()):
        raise ConfigError(f"--workers {workers}: more decoding processes than this machine can run usefully (at "
                          f"most {most}: {PROCESSES_PER_CORE} per usable core, within the open-file limit); leave "
                          f"--workers out for one per core")
    check_path(src)
    check_destination(out, fix="choose another output folder", folder=True)
    if not src.exists():
        raise DataError(f"{src}: no such file or folder")
    kind = detect_kind(src)
    if kind == "store":
        raise DataError(f"{src}: is already a prepared store; train on it with --data {src}")
    if not src.is_dir():
        raise DataError(f"{src}: not a folder (unpack archives first, e.g. `tar xzf cifar-10-binary.tar.gz`)")
    _check_out(src, out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if kind == "idx":
        return _prepare_idx(src, out, size, channels)
    if kind in ("cifar10", "cifar100"):
        return _prepare_cifar(src, out, kind, size, channels, progress)
    if kind == "imagefolder":
        return _prepare_imagefolder(src, out, size, channels, workers, skip_bad, progress)
    raise DataError(f"{src}: not an idx folder, CIFAR binaries or an ImageFolder (one sub-folder of images per "
                    f"class, or train/ and val/ or test/ folders of those)")


def _check_out(src: Path, out: Path) -> None:
    """DataError unless the store may be written at `out`: writing it replaces what `out` holds, so `out` is
    new, empty, or a store holding nothing but its own files, and neither inside `src` nor holding it."""
    if inside(out, src):
        raise DataError(f"{out}: the store must not be written inside its source folder {src}")
    if inside(src, out):  # writing the store replaces OUT, and with it the source inside
        raise DataError(f"{out}: holds the source folder {src}, and a store replaces what its folder holds; choose "
                        f"an output folder that does not hold {src} (a new folder beside it)")
    if out.exists() and not is_store(out) and (not out.is_dir() or any(out.iterdir())):
        raise DataError(f"{out}: exists and is not a prepared store; choose another output folder "
                        f"(a store replaces what is there)")
    if (extra := _not_of_the_store(out)) is not None:
        raise DataError(f"{out}: a prepared store that also holds {extra.name!r}, which a new store would delete; "
                        f"move it out, or choose another output folder")


def _not_of_the_store(out: Path) -> Path | None:
    """A file or folder in the store `out` that its manifest does not list (the user's: a store is replaced
    whole), or None."""
    if not is_store(out):
        return None
    try:
        splits = read_manifest(out).get("splits", {})
    except (OSError, ValueError):  # a store whose manifest is unreadable is replaced, as an incomplete one
        return None
    listed = {MANIFEST} | {info.get(k) for info in splits.values() if isinstance(info, dict)
                           for k in ("images", "labels")}
    return next((e for e in sorted(out.iterdir()) if e.name not in listed), None)


# ----------------------------------------------------------------------------- command line

def summary(manifest: dict, path: Path | str) -> str:
    """Human-readable description of a store's manifest."""
    h, w, c = manifest["shape"]
    opts = manifest.get("options", {})
    classes = manifest["classes"]
    shown = ", ".join(classes[:12]) + (f", ... ({len(classes) - 12} more)" if len(classes) > 12 else "")
    lines = [f"store    {path}",
             f"source   {manifest.get('source', '?')} ({opts.get('kind', '?')})",
             f"created  {manifest.get('created', '?')}",
             f"images   {h}x{w}, {c} channel{'s' if c > 1 else ''} ({'RGB' if c == 3 else 'grayscale'}), uint8",
             f"classes  {len(classes)}: {shown}"]
    for name, info in manifest["splits"].items():
        cc = info.get("class_counts", [])
        spread = f"  (per class {min(cc)}..{max(cc)})" if cc else ""
        lines.append(f"split    {name:6s} {info['count']:>10,d} images{spread}")
    lines.append(f"mean     {manifest.get('mean')}   std {manifest.get('std')}")
    if opts.get("held_out"):
        ho = opts["held_out"]
        lines.append(f"test     held out from the tree: {ho['fraction']:.0%} per class, seed {ho['seed']}")
    if opts.get("empty_classes"):
        lines.append(f"empty    class folder(s) without images: {', '.join(opts['empty_classes'])}")
    skipped = manifest.get("skipped", [])
    if skipped:
        lines.append(f"skipped  {len(skipped)} unreadable file(s):")
        lines += [f"  {s['path']}: {s['reason']}" for s in skipped[:20]]
        if len(skipped) > 20:
            lines.append(f"  ... {len(skipped) - 20} more (phalanx data info --json)")
    return "\n".join(lines)

"""Source readers: turn what the user names with `--data` into a prepared store.

`fashion_mnist` (the built-in default) is looked up in the Debian package's folder, installed with
apt when missing (Debian, root), downloaded with torchvision's downloader as a last resort, and
prepared once into the cache. A folder of idx files (MNIST too), CIFAR binaries and ImageFolder
trees are prepared the same way, by `phalanx.data.prepare`. A prepared store is used as it is.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from phalanx.data.idx import find_idx_files
from phalanx.data.prepare import detect_kind, file_stamp, fingerprint, prepare
from phalanx.data.store import Store, is_store, open_store
from phalanx.errors import DataChoiceError, DataError
from phalanx.parallel.collectives import barrier

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
DEBIAN_PACKAGE = "dataset-fashion-mnist"


BUILTIN_NAMES = ("fashion_mnist", "fashion-mnist")
"""The names `--data` takes for the built-in Fashion-MNIST."""


def cache_dir(configured: str = "") -> Path:
    return Path(configured or os.environ.get("PHALANX_CACHE") or Path.home() / ".cache" / "phalanx")


def _install_debian_package() -> bool:
    """apt-get install the Fashion-MNIST package when this is Debian and we are root."""
    if not Path("/etc/debian_version").exists() or os.geteuid() != 0 or not shutil.which("apt-get"):
        return False
    print(f"phalanx: Fashion-MNIST not found; installing the Debian package {DEBIAN_PACKAGE}", flush=True)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    r = subprocess.run(["apt-get", "install", "-y", "-qq", DEBIAN_PACKAGE], env=env, capture_output=True)
    if r.returncode != 0:
        subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True)
        r = subprocess.run(["apt-get", "install", "-y", "-qq", DEBIAN_PACKAGE], env=env, capture_output=True)
    return r.returncode == 0 and bool(find_idx_files(DEBIAN_DIR))


def _download_torchvision(root: Path) -> Path | None:
    try:
        from torchvision.datasets import FashionMNIST
        FashionMNIST(str(root), train=True, download=True)
        FashionMNIST(str(root), train=False, download=True)
    except Exception:  # no network, mirror down...: the caller explains what to do
        return None
    raw = root / "FashionMNIST" / "raw"
    return raw if find_idx_files(raw) else None


def find_fashion_mnist(auto_install: bool, cache: Path) -> Path:
    """Folder holding the four Fashion-MNIST idx files, installing or downloading them if allowed."""
    candidates = [Path(p) for p in os.environ.get("PHALANX_FASHION_MNIST", "").split(os.pathsep) if p]
    candidates += [DEBIAN_DIR, cache / "downloads" / "FashionMNIST" / "raw"]
    for c in candidates:
        if len(find_idx_files(c)) == 2:
            return c
    if auto_install:
        if _install_debian_package():
            return DEBIAN_DIR
        got = _download_torchvision(cache / "downloads")
        if got:
            return got
    raise DataError(
        "Fashion-MNIST not found. Install it with `sudo apt-get install dataset-fashion-mnist` (Debian/Ubuntu), "
        "or put train/t10k images/labels idx files in a folder and pass --data FOLDER "
        "(files from https://github.com/zalandoresearch/fashion-mnist)")


def _cache_key(folder: Path) -> str:
    """Stable name for the prepared copy of a raw source folder: changes when its files change.

    The `fingerprint` of the top-level files and of the sub-folders (ImageFolder classes, CIFAR's
    cifar-10-batches-bin/), named by their absolute paths: a sub-folder's mtime changes whenever a
    file is added, removed or renamed in it. That costs a directory listing, not a stat per image.
    """
    root = folder.resolve()
    stamps = [file_stamp(p) for p in sorted(root.iterdir()) if p.is_file()]
    seen = set()
    for dirpath, dirnames, _ in os.walk(root, followlinks=True):
        dirnames.sort()
        st = os.stat(dirpath)
        if (st.st_dev, st.st_ino) in seen:  # symlink loop
            dirnames[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        if dirpath != str(root):
            stamps.append((dirpath + os.sep, st.st_size, st.st_mtime_ns))
    return fingerprint(stamps)[:12]


def store_path_for(data_path: str, cache_configured: str = "", auto_install: bool = True, size: int = 0,
                   channels: int = 0) -> tuple[Path, Path | None]:
    """(store path, raw folder to prepare from or None when the store is used as it is).

    size / channels (0: prepare's choice) apply to ImageFolder trees and CIFAR; each choice is cached
    as its own store. Idx files and prepared stores are used as they are.
    """
    cache = cache_dir(cache_configured)
    builtin = data_path in BUILTIN_NAMES
    p = Path(data_path).expanduser()
    if not builtin and not p.exists():
        raise DataError(f"--data {data_path}: no such file or folder (use `fashion_mnist`, a prepared store, "
                        f"or a folder of idx files)")
    kind = "idx" if builtin else detect_kind(p)
    if kind in ("store", "idx") and (size or channels):
        what = f"--data.size {size}" if size else f"--data.channels {channels}"
        fixed = "a prepared store" if kind == "store" else "a folder of idx files"
        raise DataChoiceError(f"{what}: --data {data_path} is {fixed}, used at its own size and channels; "
                              f"leave out --data.size and --data.channels")
    if builtin:
        folder = find_fashion_mnist(auto_install, cache)
        return cache / "stores" / f"fashion_mnist-{_cache_key(folder)}", folder
    if kind == "store":
        return p, None
    if kind == "idx":
        return cache / "stores" / f"{p.name}-{_cache_key(p)}", p
    if kind is None:
        raise DataError(f"--data {data_path}: not a prepared store, an idx folder, CIFAR binaries or an "
                        f"ImageFolder (one sub-folder of images per class)")
    chosen = (f"-{size}px" if size else "") + (f"-c{channels}" if channels else "")
    return cache / "stores" / f"{p.name}-{kind}{chosen}-{_cache_key(p)}", p


def ensure_store(store: Path, raw: Path | None, size: int = 0, channels: int = 0) -> None:
    """Prepare the store from its raw source unless a complete one is there already."""
    if raw is None or is_store(store):
        return
    prepare(raw, store, size=size, channels=channels)


def open_on_node(data_path: str, cache_configured: str, auto_install: bool, local_rank: int, size: int = 0,
                 channels: int = 0) -> Store:
    """Local rank 0 prepares the store once per node while the others wait; every rank maps it."""
    store, raw = store_path_for(data_path, cache_configured, auto_install, size, channels)
    if local_rank == 0:
        ensure_store(store, raw, size, channels)
    barrier()
    return open_store(store)


def load_store(data_path: str, cache_configured: str = "", auto_install: bool = True) -> Store:
    """Single-process convenience: resolve, prepare if needed, open."""
    store, raw = store_path_for(data_path, cache_configured, auto_install)
    ensure_store(store, raw)
    return open_store(store)

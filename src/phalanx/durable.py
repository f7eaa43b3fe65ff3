"""Durable files: checksums and fsync, shared by prepared stores and checkpoints (both atomic writers)."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


def fsync_path(path: Path) -> None:
    """fsync a file or a directory (a directory's fsync makes a rename inside it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def plain_file_name(name) -> bool:
    """True for a file name that stays inside its folder (no separator, not '.', '..' or empty) and
    that the file system can encode. Store manifests and checkpoint markers list only such names."""
    if not (isinstance(name, str) and name not in ("", ".", "..") and os.path.basename(name) == name
            and not {"/", "\\", "\0"} & set(name)):
        return False
    try:
        os.fsencode(name)
    except UnicodeError:  # a lone surrogate: no file can have this name
        return False
    return True

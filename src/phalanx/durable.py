"""Durable files: checksums, fsync, and what their metadata may say (plain file names, JSON field types),
shared by prepared stores and checkpoints (both atomic writers)."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from phalanx.errors import first_line


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
    """True for a file name that stays inside its folder (no separator, not '.', '..' or empty), that
    has no control characters (a name that would break a one-line message) and that the file system
    can encode. Store manifests and checkpoint markers list only such names."""
    if not (isinstance(name, str) and name not in ("", ".", "..") and os.path.basename(name) == name
            and not {"/", "\\", "\0"} & set(name) and name.isprintable()):
        return False
    try:
        os.fsencode(name)
    except UnicodeError:  # a lone surrogate: no file can have this name
        return False
    return True


def json_type(value: Any) -> str:
    """What a JSON value is, in words, for messages: 'an object', 'a list', 'null', ..."""
    if isinstance(value, bool):
        return "a boolean"
    for kind, words in ((dict, "an object"), (list, "a list"), (str, "a string"), (int, "an integer"),
                        (float, "a number")):
        if isinstance(value, kind):
            return words
    return "null" if value is None else type(value).__name__


def is_count(value: Any) -> bool:
    """A non-negative JSON integer (not a boolean)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def is_numbers(value: Any, n: int) -> bool:
    """A JSON list of `n` finite numbers (not booleans): a mean or std, one per channel."""
    return isinstance(value, list) and len(value) == n and all(
        isinstance(x, (int, float)) and not isinstance(x, bool) and abs(x) < float("inf") for x in value)


def read_json(path: Path, error: type[Exception], what: str) -> Any:
    """The JSON value in `path`; `error` naming the file and what it is when it cannot be read or parsed."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:  # ValueError: bad JSON or not UTF-8
        raise error(f"{path}: unreadable {what} ({first_line(e)})") from None

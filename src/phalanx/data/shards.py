"""Training from tar shards (`phalanx data shard`) on local disk, HTTP(S) or S3, through fsspec.

`--data` names the folder holding `index.json` (file://, http(s)://, s3:// or a local path), or a brace
pattern of shard URLs in such a folder (`s3://b/set/train-{000000..000009}.tar`: those training shards).
S3 goes through s3fs: credentials, region and endpoint come from where the AWS tools find them
(AWS_ACCESS_KEY_ID..., AWS_PROFILE, ~/.aws, AWS_ENDPOINT_URL); none is ever in the run's config.

Order. Epoch e's order is a function of (seed, e) alone (`shard_epoch_order`): the shards are permuted,
their samples laid end to end, and the samples shuffled within consecutive windows of `buffer` samples.
Global batch k is the slice [kB, (k+1)B) of that order and each rank takes its part of every micro-batch,
exactly as `GlobalSampler` does with a store's permutation: 1, 2 or 3 ranks train on the same images per
step, and a resume needs only (epoch, step). Sample ids are the samples' numbers in their split as
`phalanx data prepare` orders them, so sample i's pixels equal image i of a store prepared from the same
folder at the same size (the shards keep the files' bytes; `imageio.decode_chw` decodes both).

Cache. Each node keeps the shards it reads in a local folder with a byte budget (`ShardCache`): a shard is
fetched once, checked against the index (size, SHA-256) before anything reads it, and the least recently
used shards are removed to make room. Fetches that fail for a network reason are retried with backoff; a
missing, truncated or corrupt shard, or refused credentials, is one DataError line naming the shard.
DataLoader workers read and decode (the training loop never does); a thread of each rank fetches the next
shards of the order ahead of the steps.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import re
import threading
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, get_worker_info

from phalanx.data.imageio import decode_chw
from phalanx.data.sampler import GlobalSampler, micro_batch_bounds, mix_seed
from phalanx.data.shard_write import FORMAT, INDEX, label_array, parse_bytes
from phalanx.data.store import channel_stats
from phalanx.data.streaming import STATS_SAMPLE, StreamTrainLoader, _collate_encoded
from phalanx.errors import DataError
from phalanx.parallel.collectives import broadcast_object

URL_SCHEMES = ("file://", "http://", "https://", "s3://")
RETRIES = 5          # tries of a fetch that fails for a network reason
BACKOFF_S = 0.5      # first wait between tries, doubled each time
PREFETCH_AHEAD = 2   # shards fetched ahead of the one the steps are in
CHUNK = 1 << 20


def is_shards(data_path: str) -> bool:
    """Whether `--data` names shards: a URL, or a local folder holding a shard index."""
    if data_path.startswith(URL_SCHEMES):
        return True
    p = Path(data_path).expanduser()
    if (p.name.endswith(".tar") or "{" in p.name) and not p.is_dir():  # a pattern of shards of a local folder
        p = p.parent
    try:
        return p.is_dir() and (p / INDEX).is_file() and json.loads((p / INDEX).read_text()).get("format") == FORMAT
    except (OSError, ValueError):
        return False


def _redact(url: str) -> str:
    """A URL for messages, without any user:password@ part."""
    return re.sub(r"//[^/@]*@", "//", url)


def _fs_and_path(url: str):
    """(fsspec filesystem, path in it); a DataError line when fsspec, s3fs or aiohttp is missing."""
    try:
        import fsspec  # an optional dependency (the `shards` extra): imported where it is needed
        return fsspec.core.url_to_fs(url)
    except ImportError as e:
        raise DataError(f"--data {_redact(url)}: reading shards needs {e.name or 'fsspec'}; install it with "
                        f"pip install 'phalanx[shards]' (fsspec, s3fs, aiohttp)") from None
    except ValueError as e:
        raise DataError(f"--data {_redact(url)}: {e}") from None


def expand_braces(pattern: str) -> list[str]:
    """`a-{000..002}.tar` -> a-000.tar, a-001.tar, a-002.tar (zero-padded as written); `{x,y}` alternatives."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if not m:
        return [pattern]
    head, tail, body = pattern[:m.start()], pattern[m.end():], m.group(1)
    r = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if r:
        lo, hi, width = int(r.group(1)), int(r.group(2)), len(r.group(1))
        items = [f"{i:0{width}d}" for i in range(lo, hi + 1)]
    else:
        items = body.split(",")
    return [x for item in items for x in expand_braces(head + item + tail)]


def _fetch_error(url: str, e: BaseException) -> DataError | None:
    """The one line for an error no retry mends (missing shard, refused credentials), else None."""
    if _network_cause(e):  # fsspec's HTTP reads report a refused connection as FileNotFoundError
        return None
    if isinstance(e, FileNotFoundError):
        return DataError(f"shard {_redact(url)}: not found; upload it again (the shard folder's index lists it) "
                         f"or rewrite the shards with `phalanx data shard`")
    if isinstance(e, PermissionError) or "AccessDenied" in str(e) or "InvalidAccessKeyId" in str(e) \
            or "SignatureDoesNotMatch" in str(e) or " 403" in str(e) or "Forbidden" in str(e):
        return DataError(f"{_redact(url)}: access refused ({_short(e)}); check the credentials the AWS tools find "
                         f"(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, AWS_PROFILE, ~/.aws/credentials)")
    return None


def _network_cause(e: BaseException) -> bool:
    """Whether a connection failure (refused, reset, timed out) lies behind `e`: worth a retry."""
    seen = 0
    while e is not None and seen < 10:
        if isinstance(e, (ConnectionError, TimeoutError)) or type(e).__name__ in (
                "ClientConnectorError", "ServerDisconnectedError", "ClientPayloadError", "ClientOSError",
                "EndpointConnectionError", "ConnectionClosedError", "ReadTimeoutError", "ConnectTimeoutError"):
            return True
        e, seen = e.__cause__ or e.__context__, seen + 1
    return False


def _short(e: BaseException) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return f"{type(e).__name__}: {text}"[:200]


def read_url(url: str, retries: int = RETRIES, backoff: float = BACKOFF_S) -> bytes:
    """A small file (the index) through fsspec, retried with backoff on network errors."""
    fs, path = _fs_and_path(url)
    for attempt in range(retries):
        try:
            with fs.open(path, "rb") as f:
                return f.read()
        except Exception as e:  # noqa: BLE001 - sorted below into one line or a retry
            if isinstance(e, FileNotFoundError) and not _network_cause(e):
                raise DataError(f"{_redact(url)}: not found; point --data at the folder `phalanx data shard` wrote "
                                f"(it holds {INDEX}), or upload that folder there") from None
            final = _fetch_error(url, e)
            if final is not None:
                raise final from None
            if attempt == retries - 1:
                raise DataError(f"{_redact(url)}: cannot read it after {retries} tries ({_short(e)}); check that "
                                f"the server is up and reachable, then run again") from None
            time.sleep(backoff * 2 ** attempt)
    raise AssertionError("unreachable")


_THREAD_LOCKS: dict[str, threading.Lock] = {}
_THREAD_LOCKS_GUARD = threading.Lock()


def _reset_thread_locks() -> None:  # a forked worker must not inherit a lock its parent's thread held
    global _THREAD_LOCKS, _THREAD_LOCKS_GUARD
    _THREAD_LOCKS, _THREAD_LOCKS_GUARD = {}, threading.Lock()


os.register_at_fork(after_in_child=_reset_thread_locks)


class _Locked:
    """An exclusive lock on a file across processes (POSIX record lock: not inherited by forked DataLoader
    workers) and across this process's threads (record locks do not exclude those)."""

    def __init__(self, path: Path):
        self.path = path
        with _THREAD_LOCKS_GUARD:
            self.thread_lock = _THREAD_LOCKS.setdefault(str(path), threading.Lock())

    def __enter__(self):
        self.thread_lock.acquire()
        try:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            fcntl.lockf(self.fd, fcntl.LOCK_EX)
        except BaseException:
            self.thread_lock.release()
            raise
        return self

    def __exit__(self, *exc):
        os.close(self.fd)  # releases the record lock
        self.thread_lock.release()


class ShardCache:
    """A node's local copies of shards within `budget` bytes, least recently used out.

    `local(shard)` returns the path of a verified copy, fetching it first when it is not there. Processes
    (ranks, workers) share the folder: a per-shard lock makes each shard fetched once; the folder's lock
    makes room (removing the least recently used shards, by access time stamp) before a fetch starts, so
    the shards plus the fetches in flight never exceed the budget. `fetched.log` records every fetch.
    """

    def __init__(self, root: Path, budget: int, retries: int = RETRIES, backoff: float = BACKOFF_S,
                 wait_s: float = 120.0):
        self.root, self.budget, self.retries, self.backoff, self.wait_s = Path(root), budget, retries, backoff, wait_s
        self.root.mkdir(parents=True, exist_ok=True)

    def _entries(self) -> tuple[list[tuple[float, int, Path]], int]:
        """(complete shards as (last use, bytes, path), bytes reserved by fetches in flight)."""
        done, reserved = [], 0
        for p in self.root.iterdir():
            m = re.fullmatch(r"\.(.+)\.part-(\d+)-(\d+)", p.name)
            if m:
                if _alive(int(m.group(3))):
                    reserved += int(m.group(2))
                else:
                    p.unlink(missing_ok=True)  # a fetch whose process died
            elif p.name.endswith(".tar"):
                try:
                    st = p.stat()
                except FileNotFoundError:
                    continue
                done.append((st.st_mtime, st.st_size, p))
        return done, reserved

    def used(self) -> int:
        done, reserved = self._entries()
        return sum(b for _, b, _ in done) + reserved

    def _reserve(self, shard: dict) -> Path | None:
        """Make room for `shard` and claim it with a part file; None when it arrived meanwhile."""
        deadline = time.monotonic() + self.wait_s
        while True:
            with _Locked(self.root / ".lock"):
                if (self.root / shard["name"]).exists():
                    return None
                done, reserved = self._entries()
                total = sum(b for _, b, _ in done) + reserved
                for _, b, p in sorted(done):
                    if total + shard["bytes"] <= self.budget:
                        break
                    p.unlink(missing_ok=True)
                    total -= b
                if total + shard["bytes"] <= self.budget:
                    part = self.root / f".{shard['name']}.part-{shard['bytes']}-{os.getpid()}"
                    part.touch()
                    return part
            if time.monotonic() > deadline:
                raise DataError(f"shard cache {self.root}: {shard['name']} ({shard['bytes']:,d} bytes) does not fit "
                                f"in --data.shard_cache {self.budget:,d} bytes beside the fetches in flight; "
                                f"raise --data.shard_cache")
            time.sleep(0.2)

    def local(self, url: str, shard: dict) -> Path:
        path = self.root / shard["name"]
        for _ in range(3):
            with _Locked(self.root / f".{shard['name']}.lock"):
                if not path.exists():
                    part = self._reserve(shard)
                    if part is not None:
                        try:
                            self._fetch(url, shard, part)
                        finally:
                            part.unlink(missing_ok=True)
            try:
                os.utime(path)  # last use, for least-recently-used removal
                return path
            except FileNotFoundError:  # removed by another process to make room: fetch it again
                continue
        raise DataError(f"shard cache {self.root}: {shard['name']} is removed as soon as it is fetched; raise "
                        f"--data.shard_cache")

    def _fetch(self, url: str, shard: dict, part: Path) -> None:
        fs, path = _fs_and_path(url)
        for attempt in range(self.retries):
            digest, n = hashlib.sha256(), 0
            try:
                with fs.open(path, "rb", block_size=CHUNK) as src, open(part, "wb") as dst:
                    while n <= shard["bytes"]:
                        chunk = src.read(CHUNK)
                        if not chunk:
                            break
                        digest.update(chunk)
                        dst.write(chunk)
                        n += len(chunk)
                break
            except Exception as e:  # noqa: BLE001 - sorted below into one line or a retry
                final = _fetch_error(url, e)
                if final is not None:
                    raise final from None
                if attempt == self.retries - 1:
                    raise DataError(f"shard {_redact(url)}: cannot fetch it after {self.retries} tries "
                                    f"({_short(e)}); check that the server is up and reachable, then resume the "
                                    f"run (`phalanx train --resume RUN_DIR`)") from None
                time.sleep(self.backoff * 2 ** attempt)
        if n != shard["bytes"]:
            what = "truncated" if n < shard["bytes"] else "longer than the index says"
            raise DataError(f"shard {_redact(url)}: {what} ({n:,d} bytes, the index says {shard['bytes']:,d}); "
                            f"upload it again from the folder `phalanx data shard` wrote")
        if digest.hexdigest() != shard["sha256"]:
            raise DataError(f"shard {_redact(url)}: corrupt (SHA-256 {digest.hexdigest()[:12]}..., the index says "
                            f"{shard['sha256'][:12]}...); upload it again from the folder `phalanx data shard` wrote")
        os.replace(part, self.root / shard["name"])
        with _Locked(self.root / ".lock"), open(self.root / "fetched.log", "a") as log:
            log.write(f"{shard['name']} {n}\n")

    def fetched(self) -> int:
        """Bytes fetched into this cache folder so far (all processes)."""
        log = self.root / "fetched.log"
        if not log.exists():
            return 0
        return sum(int(line.split()[1]) for line in log.read_text().splitlines() if line.strip())


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError as e:
        return e.errno == errno.EPERM
    return True


def _tar_members(path: Path) -> dict[str, tuple[int, int]]:
    """{member name: (data offset, size)} of a tar file."""
    import tarfile  # only workers reading shards need it
    with tarfile.open(path, "r:") as tar:
        return {m.name: (m.offset_data, m.size) for m in tar.getmembers() if m.isfile()}


def shard_epoch_order(keys: list[np.ndarray], seed: int, epoch: int, buffer: int) -> torch.Tensor:
    """Sample ids of epoch `epoch` in training order: shards permuted, samples shuffled within windows of
    `buffer` consecutive samples. A function of (seed, epoch) and the index alone."""
    g = torch.Generator().manual_seed(mix_seed(seed, epoch, 0x5A4D))
    order = torch.randperm(len(keys), generator=g).tolist()
    seq = torch.from_numpy(np.concatenate([keys[k] for k in order]))
    n = len(seq)
    window = torch.arange(n, dtype=torch.float64).div_(max(1, buffer)).floor_()
    return seq[torch.argsort(window + torch.rand(n, generator=g, dtype=torch.float64))]


class ShardSampler(GlobalSampler):
    """GlobalSampler whose epoch order is `shard_epoch_order` instead of a permutation of the whole set."""

    def __init__(self, keys: list[np.ndarray], buffer: int, global_batch: int, seed: int, world: int = 1,
                 rank: int = 0, accum: int = 1):
        super().__init__(int(sum(len(k) for k in keys)), global_batch, seed, world, rank, accum)
        self.keys, self.buffer = keys, buffer

    def order(self, epoch: int) -> torch.Tensor:
        return shard_epoch_order(self.keys, self.seed, epoch, self.buffer)

    def shard_sequence(self, epoch: int) -> list[int]:
        """Shards in the order the epoch reads them."""
        g = torch.Generator().manual_seed(mix_seed(self.seed, epoch, 0x5A4D))
        return torch.randperm(len(self.keys), generator=g).tolist()

    def epoch(self, epoch: int, start_step: int = 0):
        perm = self.order(epoch)
        for step in range(start_step, self.steps):
            for micro in range(self.accum):
                start, lo, length = micro_batch_bounds(step, micro, self.global_batch, self.accum, self.world,
                                                       self.rank)
                yield step, micro, perm[start + lo: start + lo + length]


class ShardSplit(Dataset):
    """One split of the shards as a dataset: item i is sample i (uint8 (channels, size, size), label).

    Like ImageFolderStream: a DataLoader fetches whole batches through `__getitems__` (collate_fn=pass_batch);
    `encoded=True` gives the encoded bytes instead, for decoding on the GPU.
    """

    def __init__(self, source: "ShardSource", split: str, size: int, channels: int, encoded: bool = False,
                 shards: list[int] | None = None):
        info = source.index["splits"][split]
        self.source, self.split, self.size, self.channels, self.encoded = source, split, size, channels, encoded
        chosen = range(len(info["shards"])) if shards is None else shards
        self.shards = [info["shards"][k] for k in chosen]
        self.keys = [np.asarray(s["keys"], dtype=np.int64) for s in self.shards]
        n = info["samples"]
        self.where = np.full((n, 2), -1, dtype=np.int64)  # sample id -> (shard, position)
        for k, keys in enumerate(self.keys):
            self.where[keys, 0], self.where[keys, 1] = k, np.arange(len(keys))
        self.labels = torch.from_numpy(label_array(source.index, split))
        self._members: dict[str, dict[str, tuple[int, int]]] = {}

    def __len__(self) -> int:
        """Samples in the shards this split reads (all of the index's, unless a pattern picked some)."""
        return int(sum(len(k) for k in self.keys))

    @property
    def files(self) -> list[str]:
        """Member names as 'KEY.ext' (`streaming.decodes_on_device` decides from the extensions)."""
        return [f"{k:08d}.{self.source.ext}" for keys in self.keys for k in keys.tolist()]

    def _read(self, ids: list[int]) -> list[bytes]:
        out: list[bytes] = [b""] * len(ids)
        by_shard: dict[int, list[int]] = {}
        for j, i in enumerate(ids):
            k = int(self.where[i, 0])
            if k < 0:
                raise DataError(f"sample {i} of {self.split}: not in the shards --data names")
            by_shard.setdefault(k, []).append(j)
        for k, js in by_shard.items():
            shard = self.shards[k]
            for attempt in range(3):  # the copy can be removed for room between fetching and opening it
                path = self.source.cache.local(self.source.url_of(shard["name"]), shard)
                try:
                    fd = os.open(path, os.O_RDONLY)
                    break
                except FileNotFoundError:
                    if attempt == 2:
                        raise DataError(f"shard cache {path.parent}: {shard['name']} is removed as soon as it is "
                                        f"fetched; raise --data.shard_cache") from None
            try:
                members = self._members.get(shard["name"])
                if members is None:
                    members = self._members[shard["name"]] = _tar_members(path)
                for j in js:
                    key = f"{ids[j]:08d}"
                    name = next((n for n in (f"{key}.{e}" for e in self.source.exts) if n in members), None)
                    if name is None:
                        raise DataError(f"shard {shard['name']}: holds no image {key} though the index lists it; "
                                        f"rewrite the shards with `phalanx data shard`")
                    offset, length = members[name]
                    out[j] = os.pread(fd, length, offset)
            finally:
                os.close(fd)
        return out

    def __getitem__(self, i: int):
        return self.__getitems__([i])[0][0], int(self.labels[i])

    def __getitems__(self, indices: list[int]):
        data = self._read([int(i) for i in indices])
        if self.encoded:
            return _collate_encoded([(torch.frombuffer(bytearray(d), dtype=torch.uint8), int(self.labels[i]))
                                     for d, i in zip(data, indices)])
        x = torch.empty((len(indices), self.channels, self.size, self.size), dtype=torch.uint8)
        if get_worker_info() is not None:  # in a worker: fill shared memory, not a copy made when sending
            x.share_memory_()
        for k, (d, i) in enumerate(zip(data, indices)):
            try:
                x[k] = decode_chw(d, self.size, self.channels)
            except DataError as e:
                raise DataError(f"sample {int(i):08d} of {self.split}: {e}") from None
        return x, self.labels[indices]

    def sample(self, n: int) -> torch.Tensor:
        """Up to n images of the first shard(s) (training samples are shuffled across shards when written):
        statistics without fetching the whole split."""
        ids: list[int] = []
        for keys in self.keys:
            ids += keys[: n - len(ids)].tolist()
            if len(ids) >= n:
                break
        return self.__getitems__(ids)[0]


class ShardSource:
    """The shards `--data` names, in the place of a prepared Store: splits, shape, classes, mean, std."""

    def __init__(self, data_path: str, size: int, channels: int, cache_root: Path, budget: int,
                 retries: int = RETRIES, backoff: float = BACKOFF_S):
        self.given = data_path
        self.base, chosen = _base_and_selection(data_path)
        raw = read_url(self.base + INDEX, retries, backoff)
        try:
            self.index = json.loads(raw)
            assert self.index.get("format") == FORMAT
        except (ValueError, AssertionError):
            raise DataError(f"{_redact(self.base + INDEX)}: not a shard index written by `phalanx data shard`; "
                            f"point --data at the folder that holds the shards' index.json") from None
        self.manifest = {"source": self.index.get("source", ""), "options": {"kind": "shards"}}
        self.path = _UrlName(_redact(data_path))
        self.classes = self.index["classes"]
        size = size or self.index.get("size") or 0
        if not size:
            raise DataError(f"--data {_redact(data_path)}: these shards keep the images' own sizes; give the side "
                            f"to train at with --data.size N")
        channels = channels or self.index.get("channels") or 3
        self.shape = (size, size, channels)
        self.ext = "png" if self.index.get("size") else "jpg"
        self.exts = ("jpg", "png", "bmp", "gif", "webp", "tif", "ppm")
        self.cache = ShardCache(cache_root, budget, retries, backoff)
        largest = max(s["bytes"] for sp in self.index["splits"].values() for s in sp["shards"])
        if budget < 3 * largest:
            raise DataError(f"--data.shard_cache {budget:,d} bytes: smaller than 3 of these shards (the largest is "
                            f"{largest:,d} bytes), which training reads side by side; give at least {3 * largest:,d}")
        self.splits = {}
        for split in self.index["splits"]:
            sel = None
            if split == "train" and chosen is not None:
                names = {s["name"]: k for k, s in enumerate(self.index["splits"]["train"]["shards"])}
                missing = [c for c in chosen if c not in names]
                if missing:
                    raise DataError(f"--data {_redact(data_path)}: {missing[0]} is not a training shard of "
                                    f"{_redact(self.base + INDEX)}")
                sel = [names[c] for c in chosen]
            self.splits[split] = ShardSplit(self, split, size, channels, shards=sel)
        self.ahead = max(0, min(PREFETCH_AHEAD, budget // largest - 3))
        self.mean: list[float] = []
        self.std: list[float] = []

    def url_of(self, name: str) -> str:
        return self.base + name

    def __getitem__(self, name: str) -> ShardSplit:
        return self.splits[name]

    def sampler(self, global_batch: int, seed: int, world: int, rank: int, accum: int, buffer: int = 0
                ) -> ShardSampler:
        train = self.splits["train"]
        per_shard = max(1, round(np.mean([len(k) for k in train.keys])))
        return ShardSampler(train.keys, buffer or per_shard, global_batch, seed, world, rank, accum)

    def compute_stats(self) -> tuple[list[float], list[float]]:
        x = self.splits["train"].sample(STATS_SAMPLE)
        return channel_stats(x.permute(0, 2, 3, 1).numpy())


class _UrlName(str):
    """A URL standing where a store's Path is used in messages (`.name`: its last part)."""

    @property
    def name(self) -> str:
        return self.rstrip("/").rsplit("/", 1)[-1]


def _base_and_selection(data_path: str) -> tuple[str, list[str] | None]:
    """(URL of the folder holding index.json, ending in '/'; names of the training shards a pattern picks)."""
    url = data_path if data_path.startswith(URL_SCHEMES) else Path(data_path).expanduser().resolve().as_uri()
    if url.endswith(INDEX):
        return url[: -len(INDEX)], None
    if url.endswith(".tar") or "{" in url:
        names = expand_braces(url)
        bases = {n.rsplit("/", 1)[0] + "/" for n in names}
        if len(bases) != 1:
            raise DataError(f"--data {_redact(data_path)}: a pattern of shards must name shards of one folder")
        return bases.pop(), [n.rsplit("/", 1)[1] for n in names]
    return url.rstrip("/") + "/", None


def cache_root_for(cache_dir: Path, data_path: str) -> Path:
    """The node's cache folder of the shards at `data_path`: one per shard folder."""
    base, _ = _base_and_selection(data_path)
    return cache_dir / "shards" / hashlib.sha256(base.encode()).hexdigest()[:16]


class _Prefetcher(threading.Thread):
    """Fetches the shards of the order ahead of the step the training loop is at (a daemon thread)."""

    def __init__(self, split: ShardSplit, sequence: list[int], sampler: GlobalSampler, ahead: int):
        super().__init__(daemon=True, name="phalanx-shard-prefetch")
        self.split, self.sequence, self.ahead = split, sequence, ahead
        counts = np.cumsum([len(split.keys[k]) for k in sequence])
        self.ends, self.global_batch = counts, sampler.global_batch
        self.step, self.stop, self.moved = 0, threading.Event(), threading.Event()

    def at(self, step: int) -> None:
        self.step = step
        self.moved.set()

    def run(self) -> None:
        done: set[int] = set()
        while not self.stop.is_set():
            first = int(np.searchsorted(self.ends, self.step * self.global_batch, side="right"))
            for k in self.sequence[first: first + 1 + self.ahead]:
                if self.stop.is_set() or k in done:
                    continue
                shard = self.split.shards[k]
                try:
                    self.split.source.cache.local(self.split.source.url_of(shard["name"]), shard)
                except Exception:  # noqa: BLE001 - the workers fetch it again and report what is wrong
                    return
                done.add(k)
            self.moved.wait(1.0)
            self.moved.clear()


class ShardTrainLoader(StreamTrainLoader):
    """StreamTrainLoader over a ShardSplit, with a thread fetching the next shards ahead of the steps."""

    def __init__(self, dataset: ShardSplit, sampler: ShardSampler, *args, **kw):
        super().__init__(dataset, sampler, *args, **kw)
        self.ahead = dataset.source.ahead
        self._prefetch: _Prefetcher | None = None

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator:
        if self._prefetch is not None:
            self._prefetch.stop.set()
        self._prefetch = p = _Prefetcher(self.dataset, self.sampler.shard_sequence(epoch), self.sampler, self.ahead)
        p.at(start_step)
        p.start()
        try:
            for batch in super().epoch(epoch, start_step):
                p.at(batch.step)
                yield batch
        finally:
            p.stop.set()
            p.moved.set()


def open_shards(data_path: str, size: int, channels: int, cache_dir: Path, shard_cache: str, is_main: bool,
                retries: int = RETRIES, backoff: float = BACKOFF_S) -> ShardSource:
    """Read the index (every rank), fetch the first training shard and compute mean/std there (rank 0,
    broadcast to the others)."""
    budget = parse_bytes(shard_cache, "--data.shard_cache")
    source = ShardSource(data_path, size, channels, cache_root_for(cache_dir, data_path), budget, retries, backoff)
    stats = source.compute_stats() if is_main else None
    source.mean, source.std = broadcast_object(stats)
    return source

"""Streaming path for users who do not prepare: an ImageFolder decoded batch by batch.

CPU: DataLoader worker processes decode with torchvision.io (PIL where it cannot) through the same
`imageio.decode_chw` as `phalanx data prepare`, so a streamed image has exactly the pixels its
prepared copy would have. The loader yields uint8 (B, C, size, size) batches, a quarter of the
bytes of float ones through the worker queues and the host-to-device copy; flips, crops and
normalisation then run batched on the device (phalanx.data.augment), as for a prepared store.

CUDA: the workers only read the encoded files and whole batches of JPEGs are decoded on the GPU
with `torchvision.io.decode_jpeg(list, device="cuda")` (nvJPEG; `decode_jpeg_batch_cuda`, used by
`CudaJpegLoader` and by training, `StreamTrainLoader`, when every training file is a JPEG); other
formats are decoded on the CPU and copied. GPU-decoded pixels can differ from the CPU decoder's by a
few levels (different IDCT, float resize), and EXIF orientation is not applied there.

The file list and the held-out test split are those of `phalanx data prepare` (list_imagefolder).

Training (`phalanx train --data FOLDER --data.stream true --data.size N`): `open_folder_stream`
stands in for the prepared store, `StreamTrainLoader` for TrainLoader (same global order, same
augmentation draws, so a streamed run trains on exactly what a prepared run of the same folder
would), and `StreamSplit` for SplitOnDevice in evaluation. Each DataLoader fetch is a whole
micro-batch (`__getitems__`): one worker decodes it into one uint8 tensor, no per-image collate.
"""
from __future__ import annotations

import copy
import math
import re
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, get_worker_info

from phalanx import runtime
from phalanx.config import AugmentConfig
from phalanx.data.augment import Normalize
from phalanx.data.imageio import declared_size, decode_chw, fit, read_encoded, sniff, too_many_pixels
from phalanx.data.loader import Batch, augmented, check_mix_layout
from phalanx.data.prepare import FolderListing, detect_kind, list_imagefolder, trainable_listing
from phalanx.data.sampler import GlobalSampler
from phalanx.data.store import channel_stats
from phalanx.errors import DataChoiceError, DataError
from phalanx.parallel.collectives import broadcast_object
from phalanx.runtime.cpu import usable_cores

# Images decoded to compute the normalisation's mean/std of a streamed folder (all when fewer).
STATS_SAMPLE = 1000


class ImageFolderStream(Dataset):
    """An ImageFolder split decoded on the fly: item i is (uint8 tensor (channels, size, size), label).

    `split`: "train", "val"/"test" (as `phalanx data prepare` would split the tree) or "all".
    With `encoded=True` items are (the file's bytes as a 1-D uint8 tensor, label), for GPU decoding.
    A DataLoader fetches whole batches through `__getitems__`, already collated: give it
    `collate_fn=pass_batch` (streaming_loader, StreamTrainLoader and StreamSplit do).
    An unreadable file raises DataError naming it (prepare with --skip-bad to train around them).
    """

    def __init__(self, root: str | Path, size: int, channels: int = 3, split: str = "train",
                 encoded: bool = False, listing: FolderListing | None = None):
        if size < 1:
            raise DataError(f"size {size}: the streaming path needs a fixed image size >= 1")
        if channels not in (1, 3):
            raise DataError(f"channels {channels}: must be 1 or 3")
        self.root = Path(root)
        listing = listing or list_imagefolder(self.root)
        if split == "all":  # every file of the tree, whatever split it belongs to
            entries = sorted((e for es in listing.splits.values() for e in es), key=lambda e: (e[1], e[0]))
        elif split in listing.splits:
            entries = listing.splits[split]
        else:
            raise DataError(f"{root}: no split {split!r} (has: {', '.join(listing.splits)}, all)")
        self.classes = listing.classes
        self.files = [str(self.root / rel) for rel, _ in entries]
        self.labels = torch.tensor([lab for _, lab in entries], dtype=torch.int64)
        self.size, self.channels, self.encoded = size, channels, encoded

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        if self.encoded:
            data, _ = read_encoded(self.files[i])
            return data, int(self.labels[i])
        return decode_chw(self.files[i], self.size, self.channels), int(self.labels[i])

    def __getitems__(self, indices: list[int]):
        """A whole batch in one DataLoader fetch: (uint8 (B, channels, size, size), int64 labels), or
        (list of encoded files, labels) when `encoded`. Use with `collate_fn=pass_batch`."""
        if self.encoded:
            return _collate_encoded([self[i] for i in indices])
        x = torch.empty((len(indices), self.channels, self.size, self.size), dtype=torch.uint8)
        if get_worker_info() is not None:  # in a worker: fill shared memory, not a copy made when sending
            x.share_memory_()
        for k, i in enumerate(indices):
            x[k] = decode_chw(self.files[i], self.size, self.channels)
        return x, self.labels[indices]


def pass_batch(batch):
    """collate_fn for datasets whose `__getitems__` returns a finished batch."""
    return batch


def loader_kw(workers: int, pin: bool = False, prefetch_factor: int = 2, persistent: bool = True) -> dict:
    """DataLoader arguments for `workers` processes, each prefetching `prefetch_factor` batches, kept
    between epochs when `persistent`; pinned batches when `pin` (bound for a CUDA device)."""
    kw = dict(num_workers=workers, pin_memory=pin)
    if workers > 0:
        kw.update(persistent_workers=persistent, prefetch_factor=prefetch_factor)
    return kw


class RankOrder:
    """This rank's sample indices of an epoch in the global order, as a DataLoader sampler.

    Batches of `micro_batch_size(...)` drawn from it are exactly this rank's micro-batches of
    GlobalSampler: the same samples per step for any world size. Call `set_epoch` before each epoch
    (and with `start_step` when resuming).
    """

    def __init__(self, sampler: GlobalSampler):
        self.sampler, self.epoch, self.start_step = sampler, 0, 0

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.epoch, self.start_step = epoch, start_step

    @property
    def batch_size(self) -> int:
        """This rank's part of one micro-batch (the DataLoader batch size that keeps steps aligned)."""
        s = self.sampler
        micro = s.global_batch // s.accum
        return (s.rank + 1) * micro // s.world - s.rank * micro // s.world

    def __iter__(self) -> Iterator[int]:
        for _, _, idx in self.sampler.epoch(self.epoch, self.start_step):
            yield from idx.tolist()

    def __len__(self) -> int:
        return (self.sampler.steps - self.start_step) * self.sampler.accum * self.batch_size


class RankBatches(RankOrder):
    """RankOrder as a DataLoader batch_sampler: one list per micro-batch of this rank, so a worker
    decodes a whole micro-batch per fetch and the n-th batch is micro-step n of the epoch."""

    def __iter__(self) -> Iterator[list[int]]:
        for _, _, idx in self.sampler.epoch(self.epoch, self.start_step):
            yield idx.tolist()

    def __len__(self) -> int:
        return (self.sampler.steps - self.start_step) * self.sampler.accum


def _collate_encoded(items: list[tuple[torch.Tensor, int]]) -> tuple[list[torch.Tensor], torch.Tensor]:
    return [d for d, _ in items], torch.tensor([y for _, y in items], dtype=torch.int64)


def streaming_loader(root: str | Path, size: int, channels: int, batch: int, workers: int,
                     sampler_indices: Iterable[int] | None = None, split: str = "train",
                     device: torch.device | str | None = None, prefetch_factor: int = 4,
                     dataset: ImageFolderStream | None = None) -> DataLoader:
    """DataLoader of uint8 (B, channels, size, size) batches and int64 labels from an ImageFolder.

    sampler_indices: the sample order (e.g. `RankOrder(global_sampler)`; it is iterated again each
    epoch), default: the split in file order. Workers are persistent and prefetch `prefetch_factor`
    batches each; batches are pinned when `device` is CUDA.
    """
    ds = dataset or ImageFolderStream(root, size, channels, split)
    pin = device is not None and runtime.of(torch.device(device)).overlaps_copies
    return DataLoader(ds, batch_size=batch, sampler=sampler_indices, collate_fn=pass_batch,
                      **loader_kw(workers, pin, prefetch_factor))


FIT_STACK_VALUES = 2**27  # 512 MiB of fp32 in a resize: ~145 images of 3 x 640 x 480 at a time


def fit_by_shape(images: Sequence[tuple[int, torch.Tensor]], size: int, channels: int
                 ) -> Iterator[tuple[int, torch.Tensor]]:
    """(index, fit(image)) for each (index, image), computed a stack of same-shape images at a time: one resize
    for all the images of a shape instead of one per image (each a few kernels and ~0.1 ms of Python on a GPU:
    the batch's cost after nvJPEG's). The same pixels as `fit` of each image alone."""
    groups: dict[tuple[int, ...], list[tuple[int, torch.Tensor]]] = {}
    for i, img in images:
        groups.setdefault(tuple(img.shape), []).append((i, img))
    for shape, group in groups.items():
        # at most FIT_STACK_VALUES values a stack: the resize works in fp32 on the GPU (4 bytes a value)
        per_stack = max(1, FIT_STACK_VALUES // max(1, math.prod(shape)))
        for lo in range(0, len(group), per_stack):
            part = group[lo:lo + per_stack]
            fitted = fit(torch.stack([img for _, img in part]), size, channels)
            yield from ((i, fitted[k]) for k, (i, _) in enumerate(part))


def decode_jpeg_batch_cuda(encoded: Sequence[torch.Tensor], size: int, channels: int,
                           device: torch.device | str = "cuda") -> torch.Tensor:
    """Decode encoded images to uint8 (B, channels, size, size) on a CUDA device.

    JPEGs are decoded together by nvJPEG (`torchvision.io.decode_jpeg(list, device=...)`); any other
    format, or a JPEG nvJPEG refuses (CMYK, progressive on old versions), is decoded on the CPU and
    copied. Each image is then resized and centre-cropped on the device like `imageio.fit`.
    """
    from torchvision.io import ImageReadMode, decode_jpeg
    device = torch.device(device)
    if not runtime.of(device).decodes_jpeg or not runtime.of(device).is_available():
        raise RuntimeError("decode_jpeg_batch_cuda needs a CUDA device; use ImageFolderStream on the CPU")
    out = torch.empty((len(encoded), channels, size, size), dtype=torch.uint8, device=device)
    # A JPEG declaring more than max_pixels() goes to the CPU decoder, which refuses it before decoding.
    jpeg = [i for i, d in enumerate(encoded) if sniff(d[:4].numpy().tobytes()) == "jpeg"
            and not too_many_pixels(declared_size(memoryview(d.numpy()), "jpeg"))]
    done = set()
    if jpeg:
        try:
            imgs = decode_jpeg([encoded[i] for i in jpeg], mode=ImageReadMode.RGB, device=device)
        except RuntimeError:  # one bad or unsupported file fails the whole call: retry one by one below
            imgs = []
            for i in jpeg:
                try:
                    imgs.append(decode_jpeg(encoded[i], mode=ImageReadMode.RGB, device=device))
                except RuntimeError:
                    imgs.append(None)
        decoded = [(i, img) for i, img in zip(jpeg, imgs) if img is not None]
        for i, img in fit_by_shape(decoded, size, channels):
            out[i] = img
        done.update(i for i, _ in decoded)
    for i, data in enumerate(encoded):
        if i not in done:  # CPU decoder (raises DataError naming the problem when unreadable)
            out[i].copy_(decode_chw(data, size, channels).pin_memory(), non_blocking=True)
    return out


class CudaJpegLoader:
    """Workers read encoded files; each batch is decoded on the GPU. Yields (uint8 images, labels) on
    `device`. Same arguments as `streaming_loader`."""

    def __init__(self, root: str | Path, size: int, channels: int, batch: int, workers: int,
                 sampler_indices: Iterable[int] | None = None, split: str = "train",
                 device: torch.device | str = "cuda", prefetch_factor: int = 4):
        self.dataset = ImageFolderStream(root, size, channels, split, encoded=True)
        self.size, self.channels, self.device = size, channels, torch.device(device)
        # Encoded files are few bytes: pinning them buys little, and nvJPEG reads them from host memory.
        self.loader = DataLoader(self.dataset, batch_size=batch, sampler=sampler_indices, collate_fn=pass_batch,
                                 **loader_kw(workers, pin=False, prefetch_factor=prefetch_factor))

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for encoded, labels in self.loader:
            x = decode_jpeg_batch_cuda(encoded, self.size, self.channels, self.device)
            yield x, labels.pin_memory().to(self.device, non_blocking=True)


# ----------------------------------------------------------------------------- training on a streamed folder

def stream_root(data_path: str) -> Path:
    """The ImageFolder `--data` names, or DataError saying why it cannot be streamed."""
    p = Path(data_path).expanduser()
    if not p.is_dir():
        raise DataError(f"--data {data_path}: --data.stream reads an ImageFolder (one sub-folder of images per "
                        f"class); no such folder")
    kind = detect_kind(p)
    if kind != "imagefolder":
        what = f"{kind} binaries" if kind in ("cifar10", "cifar100") else "not an ImageFolder"
        raise DataChoiceError(f"--data {data_path}: --data.stream reads an ImageFolder (one sub-folder of images "
                              f"per class); this is {what}: train on it without --data.stream")
    return p


class FolderStream:
    """A streamed ImageFolder in the place of a prepared Store: splits, shape, classes, mean, std."""

    def __init__(self, root: Path, size: int, channels: int, listing: FolderListing,
                 mean: list[float], std: list[float]):
        self.path, self.shape, self.classes = root, (size, size, channels), listing.classes
        self.splits = {name: ImageFolderStream(root, size, channels, name, listing=listing)
                       for name in listing.splits}
        self.mean, self.std = mean, std

    def __getitem__(self, name: str) -> ImageFolderStream:
        return self.splits[name]


def _worker_error(e: DataError) -> DataError:
    # DataLoader re-raises a worker's error with its traceback in the message; keep the last line,
    # which names the file.
    last = str(e).strip().splitlines()[-1]
    return DataError(re.sub(r"^[\w.]*Error: ", "", last, count=1))


def sample_stats(dataset: ImageFolderStream, workers: int, sample: int = STATS_SAMPLE
                 ) -> tuple[list[float], list[float]]:
    """Mean/std (as a prepared store's manifest has them) over `sample` evenly spaced images of the
    split: over all of it when it is no larger, and then equal to the prepared store's."""
    n = len(dataset)
    idx = list(range(n)) if n <= sample else np.linspace(0, n - 1, sample).round().astype(int).tolist()
    order = [idx[i:i + 64] for i in range(0, len(idx), 64)]
    loader = DataLoader(dataset, batch_sampler=order, collate_fn=pass_batch,
                        **loader_kw(workers, persistent=False))  # one pass: workers end with it
    try:
        x = torch.cat([b for b, _ in loader])
    except DataError as e:
        raise _worker_error(e) from None
    return channel_stats(x.permute(0, 2, 3, 1).numpy())


def stream_workers(configured: int, local_world: int) -> int:
    """DataLoader workers per rank: as configured, else this node's cores divided among its ranks."""
    return configured or max(1, usable_cores() // max(1, local_world))


def open_folder_stream(data_path: str, size: int, channels: int, workers: int, is_main: bool = True
                       ) -> FolderStream:
    """List the folder (every rank) and compute mean/std of its training split (rank 0, broadcast).

    channels 0 means 3: choosing from the images, as prepare does, would read every file's header.
    """
    root = stream_root(data_path)
    listing = trainable_listing(root, "remove them, or prepare with `phalanx data prepare --skip-bad`")
    channels = channels or 3
    stats = None
    if is_main:
        stats = sample_stats(ImageFolderStream(root, size, channels, "train", listing=listing), workers)
    mean, std = broadcast_object(stats)
    return FolderStream(root, size, channels, listing, mean, std)


JPEG_SUFFIXES = (".jpg", ".jpeg", ".jpe", ".jfif")


def decodes_on_device(dataset: ImageFolderStream, device: torch.device) -> bool:
    """Whether training decodes `dataset` on `device` (nvJPEG): where the device decodes JPEGs and every file
    is one by its name. A folder with other formats stays with the CPU workers, which decode in parallel
    (the device path decodes those one by one in the training process)."""
    return (runtime.of(device).decodes_jpeg and len(dataset) > 0
            and all(f.lower().endswith(JPEG_SUFFIXES) for f in dataset.files))


class StreamTrainLoader:
    """TrainLoader over an ImageFolderStream: `.epoch(epoch, start_step)` yields the same Batches.

    Workers decode this rank's part of each micro-batch of the global order (RankBatches); the
    device then translates, flips and normalises with the draws of the whole global batch, as
    TrainLoader does. So for the same folder and size a streamed run and a prepared one train on
    the same pixels in the same order, for any world size, and a resume needs only (epoch, step).
    On CUDA, a folder of JPEGs is decoded on the GPU instead (`decodes_on_device`): the workers only read
    the files, and each micro-batch is decoded by nvJPEG in one call (pixels within a few levels of the
    CPU decoder's); order and augmentation draws are the same.
    """

    def __init__(self, dataset: ImageFolderStream, sampler: GlobalSampler, augment: AugmentConfig,
                 normalize: Normalize, device: torch.device, seed: int, workers: int, prefetch_factor: int = 2):
        self.dataset, self.sampler, self.augment, self.normalize = dataset, sampler, augment, normalize
        self.device, self.seed = device, seed
        self.h = self.w = dataset.size
        self.on_device = decodes_on_device(dataset, device)
        if self.on_device:  # the same files and labels, read as bytes
            dataset = copy.copy(dataset)
            dataset.encoded = True
        check_mix_layout(augment, sampler)
        self.batches = RankBatches(sampler)
        self.loader = DataLoader(dataset, batch_sampler=self.batches, collate_fn=pass_batch,
                                 **loader_kw(workers, runtime.of(device).overlaps_copies, prefetch_factor))

    def __len__(self) -> int:
        return self.sampler.steps

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[Batch]:
        """This rank's augmented micro-batches of `epoch`, from `start_step` on."""
        self.batches.set_epoch(epoch, start_step)
        yield from augmented(self._decoded(epoch, start_step), self.sampler, self.augment, self.normalize,
                             self.h, self.w, self.seed, epoch)

    def _decoded(self, epoch: int, start_step: int):
        decoded = iter(self.loader)  # the n-th batch is micro-step n of the epoch (RankBatches)
        for step, micro, idx in self.sampler.epoch(epoch, start_step):
            try:
                x, y = next(decoded)
            except DataError as e:
                raise _worker_error(e) from None
            if self.on_device:  # a list of encoded files: one nvJPEG call decodes the micro-batch on the device
                x = decode_jpeg_batch_cuda(x, self.dataset.size, self.dataset.channels, self.device)
            yield step, micro, idx, x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)


class _Batches:
    """A batch_sampler whose batches are set before each pass."""

    def __init__(self):
        self.batches: list[list[int]] = []

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class StreamSplit:
    """SplitOnDevice over an ImageFolderStream, for evaluation: `gather(idx)` decodes those images with
    DataLoader workers and returns (uint8 (B, H, W, C) view, labels) on the device, like a store."""

    def __init__(self, dataset: ImageFolderStream, device: torch.device, workers: int, batch: int = 64):
        self.split, self.device, self.batch = dataset, device, batch
        self._batches = _Batches()
        self.loader = DataLoader(dataset, batch_sampler=self._batches, collate_fn=pass_batch,
                                 **loader_kw(workers, runtime.of(device).overlaps_copies))

    def gather(self, idx: torch.Tensor, pin: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        ids = idx.tolist()
        self._batches.batches = [ids[i:i + self.batch] for i in range(0, len(ids), self.batch)]
        try:
            got = list(self.loader)
        except DataError as e:
            raise _worker_error(e) from None
        accel = runtime.of(self.device)  # pinned where that makes the copies asynchronous
        x = accel.pin(torch.cat([b for b, _ in got])).to(self.device, non_blocking=True)
        y = accel.pin(torch.cat([b for _, b in got])).to(self.device, non_blocking=True)
        return x.permute(0, 2, 3, 1), y

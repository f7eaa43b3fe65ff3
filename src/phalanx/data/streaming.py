"""Streaming path for users who do not prepare: an ImageFolder decoded batch by batch.

CPU: DataLoader worker processes decode with torchvision.io (PIL where it cannot) through the same
`imageio.decode_chw` as `phalanx data prepare`, so a streamed image has exactly the pixels its
prepared copy would have. The loader yields uint8 (B, C, size, size) batches, a quarter of the
bytes of float ones through the worker queues and the host-to-device copy; flips, crops and
normalisation then run batched on the device (phalanx.data.augment), as for a prepared store.

CUDA: `CudaJpegLoader` has the workers only read the encoded files and decodes whole batches of
JPEGs on the GPU with `torchvision.io.decode_jpeg(list, device="cuda")` (nvJPEG); other formats
are decoded on the CPU and copied. GPU-decoded pixels can differ from the CPU decoder's by a few
levels (different IDCT, float resize), and EXIF orientation is not applied there.

The file list and the held-out test split are those of `phalanx data prepare` (list_imagefolder).
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from phalanx.data.idx import DataError
from phalanx.data.imageio import decode_chw, fit, read_encoded, sniff
from phalanx.data.prepare import list_imagefolder
from phalanx.data.sampler import GlobalSampler


class ImageFolderStream(Dataset):
    """An ImageFolder split decoded on the fly: item i is (uint8 tensor (channels, size, size), label).

    `split`: "train", "val"/"test" (as `phalanx data prepare` would split the tree) or "all".
    With `encoded=True` items are (the file's bytes as a 1-D uint8 tensor, label), for GPU decoding.
    An unreadable file raises DataError naming it (prepare with --skip-bad to train around them).
    """

    def __init__(self, root: str | Path, size: int, channels: int = 3, split: str = "train",
                 encoded: bool = False):
        if size < 1:
            raise DataError(f"size {size}: the streaming path needs a fixed image size >= 1")
        if channels not in (1, 3):
            raise DataError(f"channels {channels}: must be 1 or 3")
        self.root = Path(root)
        listing = list_imagefolder(self.root)
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
    dev = torch.device(device) if device is not None else torch.device("cpu")
    kw = {}
    if workers > 0:
        kw = dict(persistent_workers=True, prefetch_factor=prefetch_factor)
    return DataLoader(ds, batch_size=batch, sampler=sampler_indices, shuffle=False, num_workers=workers,
                      pin_memory=dev.type == "cuda", drop_last=False, **kw)


def decode_jpeg_batch_cuda(encoded: Sequence[torch.Tensor], size: int, channels: int,
                           device: torch.device | str = "cuda") -> torch.Tensor:
    """Decode encoded images to uint8 (B, channels, size, size) on a CUDA device.

    JPEGs are decoded together by nvJPEG (`torchvision.io.decode_jpeg(list, device=...)`); any other
    format, or a JPEG nvJPEG refuses (CMYK, progressive on old versions), is decoded on the CPU and
    copied. Each image is then resized and centre-cropped on the device like `imageio.fit`.
    """
    from torchvision.io import ImageReadMode, decode_jpeg
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        raise RuntimeError("decode_jpeg_batch_cuda needs a CUDA device; use ImageFolderStream on the CPU")
    out = torch.empty((len(encoded), channels, size, size), dtype=torch.uint8, device=device)
    jpeg = [i for i, d in enumerate(encoded) if sniff(d[:4].numpy().tobytes()) == "jpeg"]
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
        for i, img in zip(jpeg, imgs):
            if img is not None:
                out[i] = fit(img, size, channels)
                done.add(i)
    for i, data in enumerate(encoded):
        if i not in done:  # CPU decoder (raises DataError naming the problem when unreadable)
            out[i].copy_(decode_chw(data, size, channels), non_blocking=True)
    return out


class CudaJpegLoader:
    """Workers read encoded files; each batch is decoded on the GPU. Yields (uint8 images, labels) on
    `device`. Same arguments as `streaming_loader`."""

    def __init__(self, root: str | Path, size: int, channels: int, batch: int, workers: int,
                 sampler_indices: Iterable[int] | None = None, split: str = "train",
                 device: torch.device | str = "cuda", prefetch_factor: int = 4):
        self.dataset = ImageFolderStream(root, size, channels, split, encoded=True)
        self.size, self.channels, self.device = size, channels, torch.device(device)
        kw = dict(persistent_workers=True, prefetch_factor=prefetch_factor) if workers > 0 else {}
        # Encoded files are few bytes: pinning them buys little, and nvJPEG reads them from host memory.
        self.loader = DataLoader(self.dataset, batch_size=batch, sampler=sampler_indices, num_workers=workers,
                                 collate_fn=_collate_encoded, **kw)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for encoded, labels in self.loader:
            x = decode_jpeg_batch_cuda(encoded, self.size, self.channels, self.device)
            yield x, labels.to(self.device, non_blocking=True)

"""Loader: this rank's indices -> gathered uint8 batch -> device -> augmented, normalised tensor.

Per step only a gather from the memory-mapped store (or from a copy resident on the device), one
host-to-device copy and batched tensor ops remain. On CUDA the next batch is gathered into pinned
memory and copied on a side stream by a background thread while the current step computes. On
CPU the gather costs microseconds per batch and a thread would only steal the rank's core, so it
runs inline.
"""
from __future__ import annotations

import queue
import threading
import warnings
from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np
import torch

from phalanx import runtime
from phalanx.config import AugmentConfig
from phalanx.data.augment import Normalize, augment_extra, augment_uint8, draw_extra, draw_params, draws_to, uses_extra
from phalanx.data.mix import mix_layout_error
from phalanx.data.sampler import GlobalSampler, micro_batch_bounds
from phalanx.data.store import Split
from phalanx.errors import ConfigError
from phalanx.observe.profile import region


@dataclass
class Batch:
    step: int
    micro: int
    x: torch.Tensor   # float, normalised, on the device
    y: torch.Tensor   # int64 labels on the device
    idx: torch.Tensor  # dataset indices of these images (CPU), for audits
    y_b: torch.Tensor | None = None  # mixup/CutMix: the partner's labels; the target is lam*y + (1-lam)*y_b
    lam: torch.Tensor | None = None  # (B,) float weight of y (None: plain labels)


def to_nchw(images_nhwc: torch.Tensor) -> torch.Tensor:
    """(B, H, W, C) -> (B, C, H, W) as a view: the result has channels-last strides."""
    return images_nhwc.permute(0, 3, 1, 2)


def evenly_spaced(split, n: int) -> torch.Tensor:
    """uint8 (n, C, H, W) images spread evenly over a split: a store's split, or a streamed folder's
    dataset (decoded here). Sorted class folders then contribute alike."""
    idx = np.linspace(0, len(split) - 1, min(n, len(split))).round().astype(np.int64)
    if isinstance(getattr(split, "images", None), np.ndarray):
        return to_nchw(torch.from_numpy(np.take(split.images, idx, axis=0)))
    return split.__getitems__(idx.tolist())[0]


def resident_copy(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """A copy of `array` (a store's read-only memmap) on `device`, without torch's warning that the array is
    not writable (it printed on every GPU run's console): the tensor that wraps it is only read, by the copy."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable", category=UserWarning)
        host = torch.from_numpy(np.ascontiguousarray(array))
    return host.to(device)


class SplitOnDevice:
    """Gathers batches of a split, from its memmap or from a copy resident on the device."""

    def __init__(self, split: Split, device: torch.device, resident: bool):
        self.split, self.device = split, device
        self.accel = runtime.of(device)
        self.images = self.labels = None
        if resident:
            self.images, self.labels = resident_copy(split.images, device), resident_copy(split.labels, device)

    def gather(self, idx: torch.Tensor, pin: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """(images, labels) of `idx` on the device, spread over the devices this rank drives (XLA SPMD).
        `pin`: copy from page-locked memory where the device has it (CUDA): a non_blocking copy from pageable
        memory is not asynchronous."""
        if self.images is not None:
            i = (self.accel.pin(idx) if pin else idx).to(self.device, non_blocking=True)
            x, y = self.images.index_select(0, i), self.labels.index_select(0, i)
        else:
            ids = idx.numpy()
            x = torch.from_numpy(np.take(self.split.images, ids, axis=0))
            y = torch.from_numpy(np.take(self.split.labels, ids, axis=0))
            if pin:
                x, y = self.accel.pin(x), self.accel.pin(y)
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        return self.accel.shard_batch(x), self.accel.shard_batch(y)


class TrainLoader:
    def __init__(self, split: Split, sampler: GlobalSampler, augment: AugmentConfig, normalize: Normalize,
                 device: torch.device, seed: int, prefetch: bool = True, resident: bool | None = None):
        if resident is None:  # keep small datasets on the GPU: no per-step host-to-device copy at all
            resident = device.type != "cpu" and split.images.nbytes < 2 << 30
        self.source = SplitOnDevice(split, device, resident)
        self.sampler, self.augment, self.normalize = sampler, augment, normalize
        self.device, self.seed = device, seed
        self.prefetch = prefetch and self.source.accel.overlaps_copies and not resident
        self.h, self.w = split.images.shape[1:3]
        check_mix_layout(augment, sampler)

    def __len__(self) -> int:
        return self.sampler.steps

    def _raw(self, epoch: int, start_step: int
             ) -> Iterator[tuple[int, int, torch.Tensor, torch.Tensor, torch.Tensor]]:
        for step, micro, idx in self.sampler.epoch(epoch, start_step):
            x, y = self.source.gather(idx)
            yield step, micro, idx, x, y

    def _prefetched(self, epoch: int, start_step: int):
        """Gathers and copies on a side thread and stream, two batches ahead of the step."""
        q: queue.Queue = queue.Queue(maxsize=2)
        stop = threading.Event()

        def put(obj) -> bool:
            # Every put gives up once the consumer has gone (an epoch cut short by max_steps or an
            # error): a plain put on a full queue would block this thread forever.
            while not stop.is_set():
                try:
                    q.put(obj, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def work():
            try:
                with self.source.accel.side_stream(self.device) as copies:
                    for item in self._raw(epoch, start_step):
                        if not put((item, copies, copies.mark())):
                            return
                put(None)
            except BaseException as e:  # surface loader errors in the training thread
                put(e)

        t = threading.Thread(target=work, daemon=True, name="phalanx-prefetch")
        t.start()
        try:
            while (got := q.get()) is not None:
                if isinstance(got, BaseException):
                    raise got
                item, copies, mark = got
                copies.hand_over(mark, item[3:])  # x, y (idx stays on the host)
                yield item
        finally:
            stop.set()

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[Batch]:
        """This rank's augmented micro-batches of `epoch`, from `start_step` on."""
        raw = self._prefetched(epoch, start_step) if self.prefetch else self._raw(epoch, start_step)
        parts = ((step, micro, idx, to_nchw(x), y) for step, micro, idx, x, y in raw)
        yield from augmented(parts, self.sampler, self.augment, self.normalize, self.h, self.w, self.seed, epoch)


def augmented(parts: Iterable[tuple[int, int, torch.Tensor, torch.Tensor, torch.Tensor]], sampler: GlobalSampler,
              augment: AugmentConfig, normalize: Normalize, h: int, w: int, seed: int, epoch: int
              ) -> Iterator[Batch]:
    """(step, micro, idx, uint8 NCHW images, labels) of this rank, on the device -> augmented Batches.

    Draws are made once per global batch (seed, epoch, step) and each part applies its slice, so a
    sample's augmentation does not depend on the world size or on gradient accumulation.
    """
    s = sampler
    params, params_step = None, -1
    extra = uses_extra(augment)
    for step, micro, idx, x, y in parts:
        start, lo, length = micro_batch_bounds(step, micro, s.global_batch, s.accum, s.world, s.rank)
        if step != params_step:
            params, params_step = draw_params(augment, s.global_batch, h, w, seed, epoch, step), step
            if extra:
                extra_params = draw_extra(augment, s.global_batch, h, w, seed, epoch, step)
        off = start - step * s.global_batch + lo  # this part's position within the global batch
        with region("augment"):
            if not extra:  # the default path: one gather
                # this part's draws, copied to the device from pinned memory (asynchronously)
                x = normalize(augment_uint8(x, augment, draws_to(params.slice(off, off + length), x.device)))
                y_b = lam = None
            else:
                x, y_b, lam = augment_extra(x, y, augment, params.slice(off, off + length),
                                            extra_params.slice(off, off + length), normalize)
        yield Batch(step, micro, x, y, idx, y_b, lam)


def check_mix_layout(augment: AugmentConfig, sampler: GlobalSampler) -> None:
    """ConfigError when mixup/CutMix are on and a rank's part of a micro-batch would split a pair."""
    if augment.mixup > 0 or augment.cutmix > 0:
        why = mix_layout_error(sampler.global_batch, sampler.accum, sampler.world)
        if why:
            raise ConfigError(why)


def eval_chunks(n: int, chunk: int, world: int, rank: int) -> list[tuple[int, int, int]]:
    """(chunk id, start, end) of the evaluation chunks this rank owns: contiguous, no padding.

    Chunks, not ranks, decide which samples share a forward pass, so every sample's logits are
    computed in the same batch for any world size and the summed results are bit-identical.
    """
    n_chunks = (n + chunk - 1) // chunk
    lo, hi = rank * n_chunks // world, (rank + 1) * n_chunks // world
    return [(c, c * chunk, min(n, (c + 1) * chunk)) for c in range(lo, hi)]

"""CUDA ranks: one GPU each, NCCL, bf16 (fp16 with a scaler on GPUs without bf16), pinned async copies."""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from phalanx.runtime.base import Accelerator, CopyStream


class CUDAAccelerator(Accelerator):
    kind = "cuda"
    backend = "nccl"
    start_method = "spawn"  # CUDA cannot be used in a process forked after the parent initialised it
    overlaps_copies = True

    @classmethod
    def is_available(cls) -> bool:
        return torch.cuda.is_available()

    def device_count(self) -> int:
        return torch.cuda.device_count()

    def auto_nproc(self, global_batch: int) -> tuple[int, str]:
        n = self.device_count()
        return n, f"one rank per GPU ({n} GPUs)"

    def bind(self, local_rank: int) -> torch.device:
        idx = local_rank % self.device_count()
        torch.cuda.set_device(idx)
        return torch.device("cuda", idx)

    def auto_dtype(self) -> torch.dtype | None:
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16

    def grad_scaler(self, dtype: torch.dtype | None):
        return torch.amp.GradScaler("cuda") if dtype is torch.float16 else None

    def rng_state(self) -> dict:
        st = super().rng_state()
        if torch.cuda.is_initialized():
            st["cuda"] = torch.cuda.get_rng_state()
        return st

    def set_rng_state(self, state: dict) -> None:
        super().set_rng_state(state)
        if "cuda" in state:
            torch.cuda.set_rng_state(state["cuda"])

    def peak_memory_mb(self, device: torch.device) -> float | None:
        return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)

    def pin(self, t: torch.Tensor) -> torch.Tensor:
        return t.pin_memory()

    def synchronize(self, device: torch.device) -> None:
        torch.cuda.synchronize(device)

    @contextlib.contextmanager
    def side_stream(self, device: torch.device) -> Iterator[CopyStream]:
        stream = torch.cuda.Stream(device)
        with torch.cuda.stream(stream):
            yield _CudaCopyStream(stream, device)


class _CudaCopyStream(CopyStream):
    def __init__(self, stream: torch.cuda.Stream, device: torch.device):
        self.stream, self.device = stream, device

    def mark(self):
        ev = torch.cuda.Event()
        ev.record(self.stream)
        return ev

    def hand_over(self, mark, tensors) -> None:
        cur = torch.cuda.current_stream(self.device)
        cur.wait_event(mark)
        # The tensors were allocated on the side stream: without this, their memory returns to that
        # stream's pool when the step drops them and a later prefetch may overwrite it while kernels
        # queued on the compute stream still read it.
        for t in tensors:
            t.record_stream(cur)

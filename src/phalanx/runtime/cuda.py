"""CUDA ranks: one GPU each, NCCL, bf16 (fp16 with a scaler on GPUs without bf16), pinned async copies.

What a GPU user expects is set here, in one place (`configure_training`): cuDNN autotuning, TF32 for fp32
matmuls and convolutions; `fused_optimizers` makes SGD and AdamW single-kernel (train/schedule.py).
"""
from __future__ import annotations

import contextlib
import logging
import warnings
from pathlib import Path
from typing import Iterator

import torch

from phalanx.runtime.base import Accelerator, CopyStream

FLIGHT_RECORDER_ENTRIES = 2000
"""Collectives NCCL's flight recorder keeps per rank (a bounded ring buffer: a few hundred bytes each, with stacks)."""


class CUDAAccelerator(Accelerator):
    kind = "cuda"
    backend = "nccl"
    start_method = "spawn"  # CUDA cannot be used in a process forked after the parent initialised it
    fork_safe = False
    overlaps_copies = True
    host_reads_sync = True  # `.item()` waits for every kernel queued on the stream
    fused_optimizers = True  # SGD and AdamW `fused=True`: one kernel for all parameters (torch >= 2.3)
    decodes_jpeg = True  # torchvision.io.decode_jpeg(list, device="cuda"): nvJPEG, a batch at a time
    profiler_activity = "CUDA"

    compile_modes = True  # reduce-overhead (CUDA graphs) and max-autotune pay on a GPU

    @classmethod
    def is_available(cls) -> bool:
        return torch.cuda.is_available()

    @classmethod
    def bf16_supported(cls) -> bool | None:
        return torch.cuda.is_bf16_supported() if torch.cuda.is_available() else None

    @classmethod
    def inventory(cls, problems: list[str], notes: list[str]) -> list[dict] | None:
        if not torch.cuda.is_available():
            if Path("/proc/driver/nvidia/version").exists():
                problems.append(f"an NVIDIA driver is loaded but torch {torch.__version__} sees no GPU "
                                f"(torch.version.cuda={torch.version.cuda}): install a CUDA build of torch that fits "
                                f"the driver (https://pytorch.org/get-started/locally/)")
            return []
        gpus = []
        for i in range(torch.cuda.device_count()):
            prop = torch.cuda.get_device_properties(i)
            gpus.append({"index": i, "name": prop.name, "memory_gib": round(prop.total_memory / 2**30, 1),
                         "capability": f"{prop.major}.{prop.minor}"})
        return gpus

    def describe(self) -> str:
        return f"{torch.cuda.get_device_name(0)} x {torch.cuda.device_count()}"

    def configure_training(self, deterministic: bool, tf32: bool) -> None:
        """cuDNN autotuning (unless --deterministic: the fastest algorithm may differ from run to run) and
        TF32 tensor cores for fp32 matmuls and convolutions (--tf32; autocast bf16/fp16 ops are unaffected)."""
        torch.backends.cudnn.benchmark = not deterministic
        with warnings.catch_warnings():
            # torch 2.9-2.11 announce `fp32_precision` as the successor of these settings; inductor still reads
            # these ones, and mixing the two APIs raises, so the old ones are set.
            warnings.simplefilter("ignore", UserWarning)
            torch.set_float32_matmul_precision("high" if tf32 else "highest")
            torch.backends.cudnn.allow_tf32 = tf32
        logging.getLogger("phalanx").info(
            f"cuda: cudnn.benchmark {torch.backends.cudnn.benchmark}, TF32 for fp32 matmuls and convolutions {tf32}")

    def flight_recorder(self, logs: Path) -> list[tuple[tuple[str, ...], str]]:
        """NCCL's flight recorder: the last FLIGHT_RECORDER_ENTRIES collectives of each rank (a ring buffer kept by
        ProcessGroupNCCL), dumped by its watchdog when a collective times out (every rank dumps: the one that
        timed out tells the others through the store) into logs/flight-recorder/rank-K, which `torchfrtrace
        LOGS/flight-recorder -p rank-` reads. torch >= 2.7 reads the TORCH_FR_* names, earlier ones the
        TORCH_NCCL_* ones: both are set."""
        prefix = str(Path(logs) / "flight-recorder" / "rank-")
        return [(("TORCH_FR_BUFFER_SIZE", "TORCH_NCCL_TRACE_BUFFER_SIZE"), str(FLIGHT_RECORDER_ENTRIES)),
                (("TORCH_NCCL_DUMP_ON_TIMEOUT",), "1"),
                (("TORCH_FR_DUMP_TEMP_FILE", "TORCH_NCCL_DEBUG_INFO_TEMP_FILE"), prefix)]

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

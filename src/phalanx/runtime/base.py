"""What every device kind provides. A new kind (xla.py) is one subclass and one entry in KINDS."""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

import torch


class Accelerator:
    kind: str = ""
    backend: str = ""
    """Default process-group backend."""
    start_method: str = "spawn"
    """How the elastic agent starts this kind's ranks when --parallel.start_method is auto."""
    fork_safe: bool = True
    """Whether ranks may be forked from the launcher (--parallel.start_method fork)."""
    overlaps_copies: bool = False
    """Whether host-to-device copies can run beside compute (pinned memory, a side stream)."""
    host_reads_sync: bool = False
    """Whether reading a device value on the host (`.item()`, `bool(t)`) waits for all queued work (CUDA, XLA):
    the loop then reads flags and losses only every few steps. On CPU a read costs nothing."""
    fused_optimizers: bool = False
    """Whether torch's fused (single-kernel) SGD and AdamW are worth taking here."""
    decodes_jpeg: bool = False
    """Whether batches of JPEG files are decoded on this device (nvJPEG through torchvision) when streaming."""
    profiler_activity: str = ""
    """`torch.profiler.ProfilerActivity` member that records this device's kernels (`--log.profile`); empty
    where the host's activity covers the work (CPU)."""

    tuned: bool = True
    """Whether `phalanx tune` measures layouts, precision and memory format for this kind (XLA compiles and
    lays out its own graphs)."""
    compile_modes: bool = False
    """Whether torch.compile's modes (`--model.compile_mode`, e.g. CUDA graphs) are timed and used here."""

    @classmethod
    def is_available(cls) -> bool:
        raise NotImplementedError

    @classmethod
    def bf16_supported(cls) -> bool | None:
        """Whether bf16 is native here (None: this kind is absent)."""
        return None

    @classmethod
    def inventory(cls, problems: list[str], notes: list[str]) -> list[dict] | None:
        """This kind's devices on this node, for `phalanx doctor` (None where the kind is not installed); a line
        in `problems` where it is installed but unusable, in `notes` for what a user may want to know."""
        return None

    def describe(self) -> str:
        """The devices ranks are bound to, in a few words ('' where ranks share the host's cores): part of what
        a tuner's measurement holds for."""
        return ""

    def tunes_precision(self) -> bool:
        """Whether `--precision auto` is measured here (bf16 against fp32) rather than decided by a rule."""
        return False

    @classmethod
    def unavailable(cls) -> Exception:
        """The error for `--device KIND` where this kind is absent (one line: what is missing, how to get it)."""
        return RuntimeError(f"device={cls.kind} asked for, but torch sees no {cls.kind.upper()} device")

    def device_count(self) -> int:
        """Devices on this node; 0 when ranks are not bound to devices (CPU)."""
        return 0

    def auto_nproc(self, global_batch: int) -> tuple[int, str]:
        """(ranks per node, why) for `--nproc auto`."""
        raise NotImplementedError

    def bind(self, local_rank: int) -> torch.device:
        """The device of this rank, made current."""
        raise NotImplementedError

    def configure_training(self, deterministic: bool, tf32: bool) -> None:
        """Process-wide settings for training on this kind (cuDNN autotuning, TF32); logged where any are made."""

    def flight_recorder(self, logs: Path) -> list[tuple[tuple[str, ...], str]]:
        """Environment for the process-group backend's own record of collectives, dumped into `logs` when one
        times out: ((variable names, new first), value) pairs, set before the group is created unless a user set
        one of the names (runtime/dist.init). None on this kind."""
        return []

    # ---- the step (hooks a traced, lazily executed device needs; nothing to do on CPU and CUDA)
    def step_barrier(self) -> None:
        """End of one training step's work: a device that traces ops lazily (XLA) compiles and runs it here."""

    def shard_batch(self, t: torch.Tensor) -> torch.Tensor:
        """A batch on this rank's device, spread over the devices the rank drives (dimension 0); `t` itself."""
        return t

    def compiled_graphs(self) -> int | None:
        """Distinct graphs compiled so far, on a device that compiles them (XLA); None elsewhere."""
        return None

    # ---- numerics
    def autocast_dtype(self, pref: str) -> torch.dtype | None:
        """Autocast dtype for `--precision pref`; None is plain fp32."""
        if pref == "fp32":
            return None
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(pref) or self.auto_dtype()

    def auto_dtype(self) -> torch.dtype | None:
        return None

    def autocast(self, dtype: torch.dtype | None):
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.kind, dtype=dtype)

    def grad_scaler(self, dtype: torch.dtype | None):
        """A GradScaler where the dtype needs one here, else None."""
        return None

    # ---- state
    def rng_state(self) -> dict:
        return {"torch": torch.get_rng_state()}

    def set_rng_state(self, state: dict) -> None:
        torch.set_rng_state(state["torch"])

    def peak_memory_mb(self, device: torch.device) -> float | None:
        """This process's peak device memory, when the kind tracks it."""
        return None

    # ---- data movement
    def pin(self, t: torch.Tensor) -> torch.Tensor:
        """Page-locked host memory where that makes copies asynchronous, else `t`."""
        return t

    def synchronize(self, device: torch.device) -> None:
        pass

    @contextlib.contextmanager
    def side_stream(self, device: torch.device) -> Iterator["CopyStream"]:
        raise NotImplementedError(f"{self.kind} has no side stream for copies")
        yield  # pragma: no cover


class CopyStream:
    """Copies issued on a side stream, handed to the compute stream with an event (see TrainLoader)."""

    def mark(self):
        """An event after everything issued so far on the side stream."""
        raise NotImplementedError

    def hand_over(self, mark, tensors) -> None:
        """Make the compute stream wait for `mark`, and keep `tensors` alive for its kernels."""
        raise NotImplementedError

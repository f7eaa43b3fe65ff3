"""XLA devices (TPUs; PJRT's CPU client in tests) through PyTorch/XLA, as one SPMD program per host.

One process drives every XLA device it sees. Each batch is annotated as split along its first dimension
over a one-axis mesh of those devices (`shard_batch`); the parameters stay replicated; GSPMD partitions the
traced step and inserts the gradient all-reduce. To the rest of Phalanx such a process is one rank of a
world of one: the global batch, the data order, the evaluation chunks and even the BatchNorm statistics (taken
over the whole sharded batch) do not depend on how many devices there are, and no torch.distributed process
group is needed. On a multi-host pod slice every host runs the same command; the mesh spans the slice.

Why not one process per device (`torch_xla.launch`, the `xla://` process group, DDP over it): PJRT's CPU
client, the only XLA backend here, cannot run collectives between devices that way in torch_xla 2.9.0. In one
process with a thread per device (CPU_NUM_DEVICES=2) each thread compiles its own copy of every graph, and
XLA:CPU keys an all-reduce without a channel id by the compiled module's id, so the two threads wait at
different rendezvous until XLA aborts; in separate processes the CPU client has no cross-process collectives
at all. SPMD runs here, on 2 virtual CPU devices, exactly as it runs on a TPU.

The step stays on the device: `step_barrier` (torch_xla.sync) cuts each traced step into one graph, and the
host reads values only at the loop's log and evaluation cadence. `compiled_graphs` reports how many distinct
graphs PyTorch/XLA compiled: after the first steps and the first evaluation it stays constant.

Nothing here imports torch_xla until an XLA run asks for it: the main environment (newer torch) has none.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
from typing import Iterator

import torch

from phalanx.errors import ConfigError
from phalanx.runtime.base import Accelerator, CopyStream

INSTALL = ("pip install 'phalanx[xla]' in an environment of its own (it pins torch 2.9.0, which torch_xla "
           "2.9.0 needs exactly), or `make setup-xla`; see the README's TPU section")


def has_torch_xla() -> bool:
    return importlib.util.find_spec("torch_xla") is not None


# torch_xla's import sets PJRT_DEVICE=CPU where it finds no TPU: what the user named is read before that.
_PJRT_DEVICE_AT_START = os.environ.get("PJRT_DEVICE", "")


def named_device() -> str:
    """PJRT_DEVICE as the user set it (TPU, CPU...), or ''."""
    return _PJRT_DEVICE_AT_START if "torch_xla" in sys.modules else os.environ.get("PJRT_DEVICE", "")


def tpu_chips() -> int:
    """TPU chips on this host's PCI bus (read from /sys; starts no XLA runtime)."""
    from torch_xla._internal import tpu
    try:
        return tpu.num_available_chips()
    except (OSError, ValueError):
        return 0


_MESH = None


def mesh():
    """The one-axis ('data') mesh of every XLA device of the run (SPMD mode on)."""
    global _MESH
    if _MESH is None:
        import numpy as np
        import torch_xla.distributed.spmd as xs
        import torch_xla.runtime as xr
        n = xr.global_runtime_device_count()
        _MESH = xs.Mesh(np.arange(n), (n,), ("data",))
    return _MESH


class XLAAccelerator(Accelerator):
    kind = "xla"
    backend = "gloo"  # never used for training: an XLA run is one process per host (world 1)
    start_method = "spawn"
    # Batches that are not resident on the device are gathered and sent by the loader's background thread
    # while the step runs (what torch_xla's MpDeviceLoader does).
    overlaps_copies = True
    host_reads_sync = True  # a read runs the traced graph so far
    tuned = False  # one SPMD process per host: no layout of ranks to choose, and XLA lays out its own graphs

    @classmethod
    def is_available(cls) -> bool:
        """torch_xla is installed and a device is named (PJRT_DEVICE, e.g. CPU for tests) or a TPU is present."""
        return has_torch_xla() and (bool(named_device()) or tpu_chips() > 0)

    @classmethod
    def inventory(cls, problems: list[str], notes: list[str]) -> list[dict] | None:
        if not has_torch_xla():
            return None
        try:
            import torch_xla.core.xla_model as xm
            return [{"device": str(d)} for d in xm.get_xla_supported_devices()]
        except Exception as e:  # a TPU runtime that is absent or busy
            notes.append(f"torch_xla is installed but lists no devices ({type(e).__name__}: {str(e)[:120]})")
            return []

    @classmethod
    def unavailable(cls) -> Exception:
        if not has_torch_xla():
            return ConfigError(f"device=xla: PyTorch/XLA (torch_xla) is not installed here; {INSTALL}")
        return ConfigError("device=xla: no TPU on this host; to run on PJRT's CPU client instead (tests, "
                           "debugging), set PJRT_DEVICE=CPU (and CPU_NUM_DEVICES=N for N devices)")

    def device_count(self) -> int:
        import torch_xla.runtime as xr
        return xr.global_runtime_device_count()

    def auto_nproc(self, global_batch: int) -> tuple[int, str]:
        return 1, "one process per host drives all its XLA devices as one SPMD mesh"

    def bind(self, local_rank: int) -> torch.device:
        import torch_xla
        import torch_xla.runtime as xr
        xr.use_spmd()  # before any XLA tensor exists
        device = torch_xla.device()
        mesh()
        return device

    # ---- the step
    def step_barrier(self) -> None:
        import torch_xla
        torch_xla.sync()

    def shard_batch(self, t: torch.Tensor) -> torch.Tensor:
        import torch_xla.distributed.spmd as xs
        xs.mark_sharding(t, mesh(), ("data",) + (None,) * (t.dim() - 1))
        return t

    def compiled_graphs(self) -> int | None:
        import torch_xla.debug.metrics as met
        return int(met.counter_value("UncachedCompile") or 0)

    # ---- numerics
    def autocast_dtype(self, pref: str) -> torch.dtype | None:
        if pref == "fp16":
            raise ConfigError("precision=fp16: XLA devices compute in bfloat16, not float16; use --precision bf16 "
                              "(or auto: bf16 on a TPU)")
        return super().autocast_dtype(pref)

    def auto_dtype(self) -> torch.dtype | None:
        import torch_xla.runtime as xr
        return torch.bfloat16 if xr.device_type() == "TPU" else None  # XLA:CPU only emulates bf16

    # ---- state
    def rng_state(self) -> dict:
        import torch_xla.core.xla_model as xm
        seed = xm.get_rng_state().to_bytes(8, "little")  # the XLA generator's state: one unsigned 64-bit seed
        return {"torch": torch.get_rng_state(), "xla": torch.frombuffer(bytearray(seed), dtype=torch.uint8)}

    def set_rng_state(self, state: dict) -> None:
        super().set_rng_state(state)
        if "xla" in state:  # absent from a CPU or GPU checkpoint
            import torch_xla.core.xla_model as xm
            xm.set_rng_state(int.from_bytes(bytes(state["xla"].tolist()), "little"))

    def peak_memory_mb(self, device: torch.device) -> float | None:
        import torch_xla.core.xla_model as xm
        try:
            peak = xm.get_memory_info(device).get("peak_bytes_used")
        except (RuntimeError, AttributeError):  # the CPU client keeps no figures
            return None
        return round(peak / 2**20, 1) if peak else None

    # ---- data movement
    def synchronize(self, device: torch.device) -> None:
        import torch_xla.core.xla_model as xm
        xm.wait_device_ops()

    @contextlib.contextmanager
    def side_stream(self, device: torch.device) -> Iterator[CopyStream]:
        yield _XlaTransfers()


class _XlaTransfers(CopyStream):
    """Host-to-device transfers need no hand-over: the lazy tensor the loader thread made waits for its data."""

    def mark(self):
        return None

    def hand_over(self, mark, tensors) -> None:
        pass

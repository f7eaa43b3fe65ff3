"""Where ranks run: one module per device kind (cpu.py, cuda.py, xla.py),
process groups (dist.py) and the elastic launcher (launch.py).

Only the accelerator modules name a device kind. Everything else asks `accelerator(...)` or
`of(device)` for the device, its count, the process-group backend, autocast support, RNG state,
host-to-device copies and memory figures.
"""
from __future__ import annotations

import torch

from phalanx.errors import ConfigError, first_line
from phalanx.runtime.base import Accelerator
from phalanx.runtime.cpu import CPUAccelerator
from phalanx.runtime.cuda import CUDAAccelerator
from phalanx.runtime.xla import XLAAccelerator  # imports torch_xla only when used

KINDS: dict[str, type[Accelerator]] = {"cuda": CUDAAccelerator, "xla": XLAAccelerator, "cpu": CPUAccelerator}
"""In the order `--device auto` tries them."""


def accelerator(pref: str = "auto") -> Accelerator:
    """The accelerator for `--device pref`: `auto` takes the first kind present, in KINDS order."""
    if pref == "auto":
        return next(cls() for cls in KINDS.values() if cls.is_available())
    if pref not in KINDS:
        raise ConfigError(f"device={pref!r}: choose one of auto, {', '.join(KINDS)}")
    cls = KINDS[pref]
    if not cls.is_available():
        why = cls.unavailable()
        if isinstance(why, ConfigError):
            raise why
        # A user's choice this machine cannot honour: one line and exit 2, with the way out.
        raise ConfigError(f"{first_line(why)}; use --device auto (or cpu) here, or run where {pref} is present")
    return cls()


def for_backend(backend: str) -> type[Accelerator]:
    """The kind whose ranks a process-group backend connects (gloo: CPU ranks; nccl: one GPU each)."""
    return {"gloo": CPUAccelerator, "nccl": CUDAAccelerator}[backend]


def of(device: torch.device) -> Accelerator:
    """The accelerator a tensor's device belongs to."""
    return KINDS[device.type]()


__all__ = ["Accelerator", "CPUAccelerator", "CUDAAccelerator", "XLAAccelerator", "KINDS", "accelerator", "for_backend", "of"]

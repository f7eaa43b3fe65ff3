"""Precision policy: the autocast dtype, and the gradient scaler when that dtype needs one.

The loop calls `backward`, `step` and `unscale_` and never asks whether a scaler exists.
"""
from __future__ import annotations

import torch

from phalanx.runtime import Accelerator


class Precision:
    def __init__(self, accel: Accelerator, dtype: torch.dtype | None):
        self.accel, self.dtype = accel, dtype
        self.scaler = accel.grad_scaler(dtype)

    @classmethod
    def from_config(cls, pref: str, accel: Accelerator) -> "Precision":
        """`--precision auto|fp32|bf16|fp16` on this accelerator (auto: bf16 where it is native)."""
        return cls(accel, accel.autocast_dtype(pref))

    @property
    def name(self) -> str:
        return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.dtype]

    def autocast(self):
        """The forward pass's context (nothing for fp32)."""
        return self.accel.autocast(self.dtype)

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        """Gradients in true units (before clipping)."""
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.scaler is not None:
            self.scaler.step(optimizer)
            self.scaler.update()
        else:
            optimizer.step()

    def state_dict(self) -> dict | None:
        return self.scaler.state_dict() if self.scaler is not None else None

    def load_state_dict(self, state: dict | None) -> None:
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)

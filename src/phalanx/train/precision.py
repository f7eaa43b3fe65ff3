"""Precision policy: which autocast dtype a device gets, and whether a gradient scaler is needed."""
from __future__ import annotations

import contextlib

import torch


def cpu_has_bf16() -> bool:
    """True when oneDNN has native bf16 kernels here (AVX-512 BF16 or AMX)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def autocast_dtype(pref: str, device: torch.device) -> torch.dtype | None:
    """None means plain fp32."""
    if pref == "fp32":
        return None
    if pref == "bf16":
        return torch.bfloat16
    if pref == "fp16":
        return torch.float16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_bf16() else None


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def grad_scaler(device: torch.device, dtype: torch.dtype | None):
    """A GradScaler for fp16 on CUDA (bf16 and fp32 need none), else None."""
    if dtype is torch.float16 and device.type == "cuda":
        return torch.amp.GradScaler("cuda")
    return None


def name(dtype: torch.dtype | None) -> str:
    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]

"""Device kinds: the only modules that name one."""
import pytest
import torch

from phalanx import runtime
from phalanx.runtime import CPUAccelerator, CUDAAccelerator


def test_auto_takes_the_first_kind_present():
    acc = runtime.accelerator("auto")
    assert acc.kind == ("cuda" if torch.cuda.is_available() else "cpu")
    assert runtime.accelerator("cpu").kind == "cpu"


def test_a_missing_or_unknown_device_is_one_clear_error(monkeypatch):
    from phalanx.errors import ConfigError
    # A machine without CUDA, wherever the test runs: a user's mistake (exit 2, one line), not a RuntimeError.
    monkeypatch.setattr(CUDAAccelerator, "is_available", classmethod(lambda cls: False))
    with pytest.raises(ConfigError, match="device=cuda asked for, but torch sees no CUDA device; use --device auto"):
        runtime.accelerator("cuda")
    with pytest.raises(ConfigError, match="device='tpu': choose one of auto, cuda, xla, cpu"):
        runtime.accelerator("tpu")


def test_cpu_defaults():
    acc = CPUAccelerator()
    assert (acc.backend, acc.start_method, acc.overlaps_copies) == ("gloo", "fork", False)
    assert acc.bind(3) == torch.device("cpu") and acc.device_count() == 0
    assert acc.autocast_dtype("fp32") is None and acc.autocast_dtype("bf16") is torch.bfloat16
    assert acc.grad_scaler(torch.float16) is None and acc.peak_memory_mb(torch.device("cpu")) is None
    t = torch.ones(3)
    assert acc.pin(t) is t
    assert runtime.of(torch.device("cpu")).kind == "cpu"


def test_cpu_auto_nproc_is_one_rank_per_core_with_at_least_32_images_each():
    from phalanx.runtime.cpu import usable_cores
    n, why = CPUAccelerator().auto_nproc(512)
    assert n == min(usable_cores(), 16) and "core" in why
    assert CPUAccelerator().auto_nproc(32)[0] == 1


def test_rng_state_round_trip():
    acc = CPUAccelerator()
    st = acc.rng_state()
    a = torch.rand(3)
    acc.set_rng_state(st)
    assert torch.equal(torch.rand(3), a)


def test_cuda_is_nccl_spawned_with_copies_overlapped():
    assert (CUDAAccelerator.backend, CUDAAccelerator.start_method, CUDAAccelerator.overlaps_copies) == \
        ("nccl", "spawn", True)
    assert CUDAAccelerator().grad_scaler(torch.bfloat16) is None

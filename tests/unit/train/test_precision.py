"""The precision policy owns autocast and the gradient scaler; the loop never asks which it has."""
import pytest
import torch

from phalanx.runtime import CPUAccelerator
from phalanx.train.precision import Precision


class _ScalingAccelerator(CPUAccelerator):
    """A CPU accelerator that hands out a scaler for fp16 (as CUDA does), to test the scaler path here."""

    def grad_scaler(self, dtype):
        return torch.amp.GradScaler("cpu", init_scale=1024.0) if dtype is torch.float16 else None


def _model_and_opt():
    torch.manual_seed(0)
    m = torch.nn.Linear(4, 2)
    return m, torch.optim.SGD(m.parameters(), lr=0.1)


def test_fp32_is_plain_autograd_and_the_optimizer_step():
    p = Precision.from_config("fp32", CPUAccelerator())
    assert p.dtype is None and p.scaler is None and p.name == "fp32" and p.state_dict() is None
    m, opt = _model_and_opt()
    x = torch.randn(8, 4)
    with p.autocast():
        y = m(x)
    assert y.dtype == torch.float32
    p.backward(y.sum())
    g = m.weight.grad.clone()
    w = m.weight.detach().clone()
    p.step(opt)
    torch.testing.assert_close(m.weight.detach(), w - 0.1 * g)


def test_bf16_autocasts_the_forward_on_cpu():
    p = Precision.from_config("bf16", CPUAccelerator())
    m, _ = _model_and_opt()
    with p.autocast():
        assert m(torch.randn(2, 4)).dtype == torch.bfloat16
    assert p.name == "bf16" and p.scaler is None


def test_auto_on_cpu_is_bf16_only_where_the_cpu_has_native_bf16():
    from phalanx.runtime.cpu import cpu_has_bf16
    assert Precision.from_config("auto", CPUAccelerator()).dtype == (torch.bfloat16 if cpu_has_bf16() else None)


def test_a_scaler_scales_the_loss_and_unscales_before_the_step():
    p = Precision.from_config("fp16", _ScalingAccelerator())
    assert p.scaler is not None and p.name == "fp16"
    m, opt = _model_and_opt()
    ref, ref_opt = _model_and_opt()
    x = torch.randn(8, 4)
    p.backward(m(x).sum())
    assert m.weight.grad.abs().sum() > 500  # scaled by 1024
    p.unscale_(opt)
    ref(x).sum().backward()
    torch.testing.assert_close(m.weight.grad, ref.weight.grad)
    p.step(opt)
    ref_opt.step()
    torch.testing.assert_close(m.weight, ref.weight)
    state = p.state_dict()
    assert state["scale"] == pytest.approx(1024.0)
    q = Precision.from_config("fp16", _ScalingAccelerator())
    q.load_state_dict(dict(state, scale=64.0))
    assert q.scaler.get_scale() == 64.0

"""The EMA's update over lists cached once, with number factors after the first update, gives bit for bit what the
update before it gave (lists rebuilt each step, factors chosen on the device each step) and what a per-tensor loop
of the same arithmetic gives."""
import copy

import torch
from torch.optim.swa_utils import AveragedModel

from phalanx.models import build_model
from phalanx.parallel.model_state import DeviceEMA


class BeforeEMA(AveragedModel):
    """DeviceEMA's update as it was before the lists were cached (commit dd7434b), verbatim but for `_local`."""

    def __init__(self, model, decay):
        super().__init__(model, use_buffers=True)
        self.decay = decay

    @torch.no_grad()
    def update_parameters(self, model, steps=1):
        decay = self.decay ** steps
        ema = [*self.module.parameters(), *self.module.buffers()]
        cur = [t.detach() for t in (*model.parameters(), *model.buffers())]
        first = self.n_averaged == 0
        keep = torch.where(first, 0.0, decay)
        take = torch.where(first, 1.0, 1.0 - decay)
        floats = [(e, c) for e, c in zip(ema, cur) if e.is_floating_point()]
        if floats:
            es = [e for e, _ in floats]
            torch._foreach_mul_(es, keep)
            torch._foreach_add_(es, torch._foreach_mul([c for _, c in floats], take))
        ints = [(e, c) for e, c in zip(ema, cur) if not e.is_floating_point()]
        if ints:
            es = [e for e, _ in ints]
            mixed = torch._foreach_add(torch._foreach_mul(es, keep), torch._foreach_mul([c for _, c in ints], take))
            torch._foreach_copy_(es, mixed)
        self.n_averaged += 1


def per_tensor(ema: dict, model, decay: float, first: bool) -> None:
    """The same arithmetic, one tensor at a time (ema * keep + model * take, in the ema's float type)."""
    keep, take = (0.0, 1.0) if first else (decay, 1.0 - decay)
    for name, t in (*model.named_parameters(), *model.named_buffers()):
        e = ema[name]
        if e.is_floating_point():
            e.mul_(torch.tensor(keep)).add_(t.detach() * torch.tensor(take))
        else:
            e.copy_(e * torch.tensor(keep) + t * torch.tensor(take))


def test_fused_ema_equals_the_update_before_it_and_a_per_tensor_loop_bit_for_bit():
    torch.manual_seed(0)
    model = build_model("phalanx_cnn", 10, 1, 28, 8)  # BatchNorm: float statistics and an integer batch count
    fused, before = DeviceEMA(model, 0.97), BeforeEMA(model, 0.97)
    loop = {k: v.detach().clone() for k, v in (*model.named_parameters(), *model.named_buffers())}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    first = True
    for i, steps in enumerate([1, 1, 3, 1, 2, 1, 1]):
        model.train()
        out = model(torch.randn(16, 1, 28, 28))  # moves the BatchNorm statistics and counts
        out.square().mean().backward()
        opt.step()
        opt.zero_grad()
        if i == 4:  # a resume: the count loaded back to 0 (a checkpoint before the first update) takes a copy again
            for ema in (fused, before):
                ema.load_state_dict(dict(ema.state_dict(), n_averaged=torch.tensor(0)))
            first = True
        fused.update_parameters(model, steps=steps)
        before.update_parameters(model, steps=steps)
        per_tensor(loop, model, 0.97 ** steps, first)
        first = False
        a, b = fused.module.state_dict(), before.module.state_dict()
        assert a.keys() == b.keys() == loop.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (i, k)
            assert torch.equal(a[k], loop[k]), (i, k)
        assert int(fused.n_averaged) == int(before.n_averaged)
    assert any(not t.is_floating_point() for t in a.values())  # the integer path was taken


def test_the_lists_follow_another_model():
    torch.manual_seed(0)
    a = build_model("phalanx_cnn", 10, 1, 28, 8)
    b = copy.deepcopy(a)
    for p in b.parameters():
        p.data.add_(1.0)
    ema = DeviceEMA(a, 0.5)
    ema.update_parameters(a)
    ema.update_parameters(b)  # not a's cached tensors: b's
    want = {k: 0.5 * v + 0.5 * (v + 1.0) for k, v in a.named_parameters()}
    for k, v in ema.module.named_parameters():
        assert torch.allclose(v, want[k])

"""The learning-rate schedule and the optimizer's parameter groups."""
import pytest
import torch

from phalanx.config import OptimConfig, ScheduleConfig
from phalanx.train.schedule import build_optimizer, build_scheduler, lr_factor


def test_onecycle_warms_up_linearly_then_decays_to_final_frac():
    cfg = ScheduleConfig(name="onecycle", warmup=0.2, final_frac=0.02)
    f = [lr_factor(cfg, s, 100, 10) for s in range(100)]
    assert f[0] == pytest.approx(1 / 20) and f[19] == pytest.approx(1.0)  # 20 warm-up steps
    assert all(a < b for a, b in zip(f[:19], f[1:20]))
    assert all(a > b for a, b in zip(f[20:], f[21:]))  # strictly decreasing after the peak
    assert f[-1] == pytest.approx(0.02 + 0.98 / 80)  # one step short of the end
    assert lr_factor(cfg, 100, 100, 10) == pytest.approx(0.02)


def test_cosine_ends_at_final_frac_and_is_half_way_in_the_middle():
    cfg = ScheduleConfig(name="cosine", warmup=0.0, final_frac=0.1)
    assert lr_factor(cfg, 0, 100, 10) == pytest.approx(1.0)
    assert lr_factor(cfg, 50, 100, 10) == pytest.approx(0.55)
    assert lr_factor(cfg, 100, 100, 10) == pytest.approx(0.1)


def test_step_schedule_multiplies_by_gamma_every_step_epochs():
    cfg = ScheduleConfig(name="step", gamma=0.5, step_epochs=2)
    assert [lr_factor(cfg, s, 100, 10) for s in (0, 19, 20, 39, 40)] == [1.0, 1.0, 0.5, 0.5, 0.25]
    assert lr_factor(ScheduleConfig(name="constant"), 77, 100, 10) == 1.0


def test_scheduler_applies_the_factor_to_the_peak_lr():
    model = torch.nn.Linear(3, 2)
    opt = build_optimizer(model, OptimConfig(name="sgd", lr=0.4, momentum=0.9))
    sched = build_scheduler(opt, ScheduleConfig(name="onecycle", warmup=0.5, final_frac=0.0), 4, 4)
    lrs = []
    for _ in range(4):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.2, 0.4, 0.4, 0.2])


def test_weight_decay_only_on_weights_and_frozen_parameters_left_out():
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Linear(4, 2))
    model[0].weight.requires_grad_(False)  # a frozen stem
    opt = build_optimizer(model, OptimConfig(name="sgd", lr=0.1, weight_decay=5e-4))
    decay, rest = opt.param_groups
    assert decay["weight_decay"] == 5e-4 and rest["weight_decay"] == 0.0
    assert {id(p) for p in decay["params"]} == {id(model[2].weight)}
    assert {id(p) for p in rest["params"]} == {id(model[0].bias), id(model[1].weight), id(model[1].bias),
                                               id(model[2].bias)}
    assert isinstance(build_optimizer(model, OptimConfig(name="adamw", lr=1e-3)), torch.optim.AdamW)

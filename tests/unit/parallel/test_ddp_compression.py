"""--parallel.grad_compression as one process sees it: PyTorch's hooks chosen, the combinations refused in one line,
and the resume's plain word about PowerSGD's state. Bytes sent and training with 2 ranks: tests/dist."""
import logging

import pytest
import torch
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook

from phalanx.config import Config, build_config
from phalanx.errors import ConfigError
from phalanx.parallel.ddp import DDPStrategy, comm_hook
from phalanx.runtime.dist import DistEnv
from phalanx.tools.checks import check_config


def test_hooks_are_pytorchs_own():
    state, hook = comm_hook("bf16")
    assert state is None and hook is default_hooks.bf16_compress_hook
    state, hook = comm_hook("powersgd", rank=4, start=10, seed=7)
    assert hook is powerSGD_hook.powerSGD_hook
    assert (state.matrix_approximation_rank, state.start_powerSGD_iter) == (4, 10)
    assert state.use_error_feedback and state.warm_start
    with pytest.raises(ValueError, match="none, bf16 or powersgd"):
        comm_hook("fp8")


@pytest.mark.parametrize("pairs, says", [
    ([("parallel.strategy", "fsdp")], "parallel.grad_compression='bf16': compresses DDP's all-reduce; FSDP"),
    ([("parallel.invariant", "true")], "--parallel.invariant true sums gradients in a fixed order"),
])
def test_compression_is_refused_with_fsdp_and_invariant_training_in_one_line(pairs, says):
    cfg = build_config(None, [("parallel.grad_compression", "bf16"), ("parallel.nproc", "2"), *pairs])
    with pytest.raises(ConfigError) as e:
        check_config(cfg)
    assert says in str(e.value) and "--parallel.grad_compression none" in str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("key, value, says", [("parallel.powersgd_rank", "0", "1..1048576"),
                                              ("parallel.powersgd_start", "1", "must be >= 2")])
def test_powersgd_settings_are_checked(key, value, says):
    with pytest.raises(ConfigError, match=says):
        check_config(build_config(None, [("parallel.grad_compression", "powersgd"), (key, value)]))


def test_the_defaults_and_ddp_pass():
    assert check_config(build_config(None, [("parallel.grad_compression", "powersgd")])).parallel.powersgd_rank == 1
    assert Config().parallel.grad_compression == "none"


def test_resume_says_powersgd_restarts_its_memories(caplog, tmp_path, monkeypatch):
    cfg = build_config(None, [("parallel.grad_compression", "powersgd"), ("parallel.powersgd_start", "5")])
    s = DDPStrategy(cfg, DistEnv(world=2))
    monkeypatch.setattr(DistEnv, "distributed", property(lambda self: True))  # a resume as a rank of 2 sees it
    net = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    with caplog.at_level(logging.INFO, logger="phalanx"):
        s.load_optim_state(opt, opt.state_dict(), tmp_path / "optim.safetensors")
    assert any("PowerSGD's error-feedback memories and warm-start factors are not checkpointed; they restart "
               "from zero, and the first 5 steps after the resume use plain all-reduce again" in r.message
               for r in caplog.records)
    caplog.clear()
    plain = DDPStrategy(build_config(None, []), DistEnv(world=2))
    with caplog.at_level(logging.INFO, logger="phalanx"):
        plain.load_optim_state(opt, opt.state_dict(), tmp_path / "optim.safetensors")
    assert not any("PowerSGD" in r.message for r in caplog.records)

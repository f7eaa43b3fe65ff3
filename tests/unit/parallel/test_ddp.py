"""The DDP strategy as one process sees it (real multi-rank runs are in tests/dist)."""
import pytest
import torch

from phalanx.config import Config
from phalanx.errors import CheckpointError
from phalanx.models import build_model
from phalanx.parallel.collectives import norm_statistics, ranks_holding, state_digest
from phalanx.parallel.ddp import DDPStrategy
from phalanx.parallel.strategy import build_strategy
from phalanx.runtime.dist import DistEnv


def _net():
    torch.manual_seed(0)
    return build_model("phalanx_cnn", 10, 1, 28, 8, "batch", "relu")


def test_one_process_trains_the_plain_model_channels_last():
    cfg = Config()
    s = build_strategy(cfg, DistEnv())
    assert isinstance(s, DDPStrategy) and s.name == "ddp"
    model = s.wrap(_net())
    assert model is s.plain  # no wrapper without a process group
    conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    with s.no_sync(False):
        pass
    s.after_step()  # nothing to agree on alone
    assert set(s.model_state()) == set(_net().state_dict())


def test_norm_statistics_are_the_running_buffers_of_batchnorm_only():
    net = torch.nn.Sequential(torch.nn.BatchNorm2d(3), torch.nn.GroupNorm(1, 3), torch.nn.Conv2d(3, 3, 1))
    stats = norm_statistics(net)
    assert [t.shape for t in stats] == [(3,), (3,)]  # running mean and var; num_batches_tracked is an int


def test_digest_changes_with_any_buffer():
    net = _net()
    d = state_digest(net)
    assert ranks_holding(net) == [d]
    with torch.no_grad():
        norm_statistics(net)[0][0] += 1e-7
    assert state_digest(net) != d


def test_optimizer_state_of_another_model_is_refused_in_one_line(tmp_path):
    s = DDPStrategy(Config(), DistEnv())
    model = s.wrap(_net())
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    other = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1, momentum=0.9)
    with pytest.raises(CheckpointError, match="optim.safetensors: optimizer state does not match"):
        s.load_optim_state(opt, other.state_dict(), tmp_path / "optim.safetensors")

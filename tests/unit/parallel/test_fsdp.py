"""The FSDP strategy's per-model shard policy and what it shares with DDP, in one process (the
sharded runs themselves are real launches in tests/dist/test_fsdp.py)."""
import pytest
import torch

from phalanx.config import Config
from phalanx.models import build_model
from phalanx.parallel.fsdp import FSDPStrategy, shard_units
from phalanx.parallel.model_state import averaged_model, local_bytes, optim_state_by_name
from phalanx.parallel.strategy import build_strategy
from phalanx.runtime.dist import DistEnv
from phalanx.train.schedule import build_optimizer


@pytest.mark.parametrize("name,count,what", [
    ("phalanx_cnn", 6, "the stem and each conv block"),
    ("phalanx_resnet", 6, "each conv block and residual pair"),
    ("mnist_net", 1, "the first fully connected layer"),
    ("resnet18", 8, "8 BasicBlocks"),
    ("resnet50", 16, "16 Bottlenecks"),
    ("convnext_tiny", 18, "18 CNBlocks"),
])
def test_each_known_model_is_sharded_per_block(name, count, what):
    with torch.device("meta"):
        net = build_model(name, 10, 1 if name != "convnext_tiny" else 3, 32, 16)
    units, words = shard_units(net)
    assert len(units) == count and what in words
    # units are disjoint and leave the root something or nothing, never a parameter twice
    ids = [id(p) for u in units for p in u.parameters()]
    assert len(ids) == len(set(ids))


def test_unknown_model_falls_back_to_the_root():
    assert shard_units(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU())) == ([], "")


def test_one_rank_trains_the_plain_model_and_refuses_what_fsdp_cannot_do():
    s = build_strategy(Config(parallel=Config().parallel.__class__(strategy="fsdp")), DistEnv())
    assert isinstance(s, FSDPStrategy) and not s.sharded and not s.lockstep
    net = build_model("phalanx_cnn", 10, 1, 28, 8)
    assert s.wrap(net) is net is s.plain
    cfg = Config()
    cfg.parallel.strategy, cfg.parallel.sync_bn = "fsdp", True
    from phalanx.errors import ConfigError
    with pytest.raises(ConfigError, match="sync_bn"):
        FSDPStrategy(cfg, DistEnv()).wrap(build_model("phalanx_cnn", 10, 1, 28, 8))


def test_shard_size_must_be_given_with_fsdp_only():
    from phalanx.errors import ConfigError
    cfg = Config()
    cfg.parallel.shard_size = 2
    with pytest.raises(ConfigError, match="needs --parallel.strategy fsdp"):
        cfg.validate()
    cfg.parallel.strategy = "fsdp"
    cfg.validate()


def test_optimizer_state_by_name_round_trip():
    torch.manual_seed(0)
    net = build_model("phalanx_cnn", 10, 1, 28, 8)
    net.stem[0].weight.requires_grad_(False)  # a frozen whitening stem is not in the optimizer
    opt = build_optimizer(net, Config().optim)
    net(torch.randn(4, 1, 28, 28)).sum().backward()
    opt.step()
    by_name = optim_state_by_name(net, opt, opt.state_dict(), "x")
    names = dict(net.named_parameters())
    assert "stem.0.weight" not in by_name["state"]
    for name, st in by_name["state"].items():
        assert torch.equal(st["momentum_buffer"], opt.state[names[name]]["momentum_buffer"])
    assert [len(g["params"]) for g in by_name["param_groups"]] == [len(g["params"]) for g in opt.param_groups]


def test_memory_counts_parameters_gradients_and_optimizer_state():
    net = build_model("mnist_net", 10, 1, 28)
    opt = build_optimizer(net, Config().optim)
    n = sum(p.numel() for p in net.parameters())
    assert local_bytes(net, opt) == {"param_bytes": 4 * n, "grad_bytes": 4 * n, "optim_bytes": 0}
    net(torch.randn(2, 1, 28, 28)).sum().backward()
    opt.step()
    assert local_bytes(net, opt)["optim_bytes"] == 4 * n  # SGD momentum


def test_ema_matches_torchs_averaged_model_with_buffers():
    """DeviceEMA against torch's own EMA (AveragedModel with get_ema_multi_avg_fn and its buffers): parameters,
    running statistics and BatchNorm's integer batch counts, over updates between which the model changes."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    from phalanx.models.cnn import PhalanxCNN
    torch.manual_seed(0)
    net = PhalanxCNN(width=8)
    mine = averaged_model(net, 0.9)
    torchs = AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=True)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    for _ in range(4):
        net(torch.randn(8, 1, 28, 28)).logsumexp(1).mean().backward()  # also moves the running statistics
        opt.step()
        opt.zero_grad()
        mine.update_parameters(net)
        torchs.update_parameters(net)
    got, want = mine.module.state_dict(), torchs.module.state_dict()
    assert [k for k in got if k.endswith("num_batches_tracked")] and got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=1e-7, msg=k)
    assert int(mine.n_averaged) == int(torchs.n_averaged) == 4


def test_ema_update_is_the_usual_lerp():
    net = torch.nn.Linear(3, 2)
    ema = averaged_model(net, 0.9)
    start = net.weight.detach().clone()
    ema.update_parameters(net)
    with torch.no_grad():
        net.weight.add_(1.0)
    ema.update_parameters(net)
    torch.testing.assert_close(ema.module.weight, 0.9 * start + 0.1 * (start + 1.0))


def test_an_ema_update_of_k_steps_is_k_updates_with_the_same_weights():
    """--ema_every k: one update with decay**k takes the model in as k updates of the same weights would."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    once, thrice = averaged_model(net, 0.9), averaged_model(net, 0.9)
    for ema in (once, thrice):
        ema.update_parameters(net)  # the first update copies
    with torch.no_grad():
        net[0].weight.add_(1.0)
    net(torch.randn(8, 3))  # moves the running statistics and the batch count
    once.update_parameters(net, steps=3)
    for _ in range(3):
        thrice.update_parameters(net)
    got, want = once.module.state_dict(), thrice.module.state_dict()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=1e-7, msg=k)
    assert not torch.allclose(got["0.weight"], net[0].weight)  # an average, not a copy

"""The house CNN's frozen whitening stem: filters that decorrelate patches, identical on every rank."""
import torch
import torch.nn.functional as F

from phalanx.config import OptimConfig
from phalanx.models import build_model
from phalanx.models.cnn import patch_whitening
from phalanx.train.schedule import build_optimizer


def images(n=256, c=1, size=28, seed=0):
    """Correlated images: smoothed noise, so neighbouring pixels (and patch entries) correlate."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, size, size, generator=g)
    return F.avg_pool2d(x, 3, stride=1, padding=1) * 3 + 0.5


def test_filters_decorrelate_the_patches_they_see():
    x = images()
    net = build_model("phalanx_cnn", 10, 1, 28, width=32)
    conv = net.stem[0]
    w = patch_whitening(x, conv, eps=1e-6)
    half = conv.out_channels // 2
    assert torch.equal(w[half:], -w[:half])  # each direction once with each sign
    out = F.conv2d(x.double(), w[:half].double(), stride=conv.stride, padding=conv.padding)
    z = out.permute(1, 0, 2, 3).reshape(half, -1)
    cov = torch.cov(z)
    # unit variance along each principal direction, no correlation between them
    assert torch.allclose(cov, torch.eye(half, dtype=cov.dtype), atol=2e-3), cov
    # the raw patches were strongly correlated, so this is not true of random filters
    raw = F.conv2d(x.double(), conv.weight.detach().double()[:half], stride=conv.stride, padding=conv.padding)
    assert (torch.corrcoef(raw.permute(1, 0, 2, 3).reshape(half, -1)) - torch.eye(half)).abs().max() > 0.3


def test_filters_are_the_same_bits_for_any_thread_count():
    x = images(512)
    conv = build_model("phalanx_cnn", 10, 1, 28, width=32).stem[0]
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = patch_whitening(x, conv)
        torch.set_num_threads(2)
        two = patch_whitening(x, conv)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)
    assert torch.allclose(patch_whitening(x.flip(0), conv), one, atol=1e-5)


def test_more_filters_than_directions_repeat_the_pairs_and_rgb_works():
    x = images(64, c=3, size=32)
    net = build_model("phalanx_cnn", 10, 3, 32, width=128)  # 64 stem filters, 3*4*4 = 48 directions
    conv = net.stem[0]
    w = patch_whitening(x, conv)
    assert w.shape == conv.weight.shape == (64, 3, 4, 4)
    assert torch.equal(w[32:], -w[:32])
    assert torch.isfinite(w).all()


def test_whitened_stem_is_frozen_and_left_out_of_the_optimizer():
    torch.manual_seed(0)
    net = build_model("phalanx_cnn", 10, 1, 28, width=16)
    x = images(64)
    net.whiten_stem(x)
    stem = net.stem[0].weight.detach().clone()
    assert not net.stem[0].weight.requires_grad
    opt = build_optimizer(net, OptimConfig(lr=0.5))
    assert all(p is not net.stem[0].weight for g in opt.param_groups for p in g["params"])
    other = net.stage1[0][0].weight.detach().clone()
    F.cross_entropy(net(x), torch.arange(64) % 10).backward()
    opt.step()
    assert torch.equal(net.stem[0].weight, stem)
    assert not torch.equal(net.stage1[0][0].weight, other)

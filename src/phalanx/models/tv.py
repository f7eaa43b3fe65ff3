"""torchvision classification models by name, randomly initialised, adapted to the store's channels and,
with `small_input`, to 32x32-class images (a 3x3 stride-1 stem and no max-pool)."""
from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn as nn

# Shown by `phalanx models` (with parameter counts); any name of `torchvision_names()` works.
CURATED = ("resnet18", "resnet34", "resnet50", "wide_resnet50_2", "resnext50_32x4d", "mobilenet_v3_small",
           "efficientnet_b0", "convnext_tiny", "regnet_y_400mf", "densenet121")


@lru_cache(maxsize=1)
def torchvision_names() -> tuple[str, ...]:
    """torchvision's image-classification models (not its detection, segmentation or video ones)."""
    import torchvision
    return tuple(torchvision.models.list_models(module=torchvision.models))


def family(name: str) -> str:
    """The torchvision module a model comes from: `resnet` (ResNet, ResNeXt, Wide ResNet), `densenet`, ..."""
    from torchvision.models import get_model_builder
    return get_model_builder(name).__module__.rsplit(".", 1)[-1]


class _RepeatChannels(nn.Module):
    """Feeds grayscale images to a 3-channel network (weights stay standard torchvision)."""

    def __init__(self, net: nn.Module, in_channels: int):
        super().__init__()
        self.net = net
        self.repeat = 3 // in_channels if in_channels in (1, 3) else 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.expand(-1, 3, -1, -1) if self.repeat == 3 else x)


def _stride_one(conv: nn.Conv2d) -> None:
    conv.stride = (1, 1)


def _conv3x3_like(c: nn.Conv2d) -> nn.Conv2d:
    """A 3x3 stride-1 conv with `c`'s channels, initialised as torchvision initialises its ResNet/DenseNet convs."""
    conv = nn.Conv2d(c.in_channels, c.out_channels, 3, stride=1, padding=1, bias=False)
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    return conv


def _small_resnet(net: nn.Module) -> None:
    # The CIFAR stem of most CIFAR ResNet code (e.g. kuangliu/pytorch-cifar's ResNet-18): the 7x7/2 conv and the
    # 3x3/2 max-pool would leave a 32x32 image 8x8 before the first block and 1x1 after the last.
    net.conv1 = _conv3x3_like(net.conv1)
    net.maxpool = nn.Identity()


def _small_densenet(net: nn.Module) -> None:
    net.features.conv0 = _conv3x3_like(net.features.conv0)
    net.features.pool0 = nn.Identity()


# family -> how its stem becomes 3x3 (or already is) with stride 1 and no pooling; the others are refused.
# Each leaves 1/8 of the side before the last stage (4x4 for 32x32 images), as the CIFAR ResNets do.
SMALL_INPUT = {
    "resnet": _small_resnet,                                       # conv1 7x7/2 + max-pool -> 3x3/1
    "densenet": _small_densenet,                                   # conv0 7x7/2 + pool0 -> 3x3/1
    "regnet": lambda net: _stride_one(net.stem[0]),                # 3x3/2 stem conv -> 3x3/1
    "mobilenetv2": lambda net: _stride_one(net.features[0][0]),    # 3x3/2 first conv -> 3x3/1
    "mobilenetv3": lambda net: _stride_one(net.features[0][0]),
    "efficientnet": lambda net: _stride_one(net.features[0][0]),
}


def small_input_refusal(name: str) -> str | None:
    """Why `name` cannot take --model.small_input (None when it can)."""
    fam = family(name)
    if fam in SMALL_INPUT:
        return None
    return (f"{name} ({fam}) has no small-image stem here; small_input adapts the ResNet, ResNeXt, Wide ResNet, "
            f"DenseNet, RegNet, MobileNet and EfficientNet families")


def zero_init_refusal(name: str) -> str | None:
    """Why `name` cannot take --model.zero_init_residual (None when its builder has the argument)."""
    if family(name) == "resnet":
        return None
    return f"{name}: only torchvision's ResNet builders (resnet*, resnext*, wide_resnet*) take zero_init_residual"


def torchvision_model(name: str, num_classes: int, in_channels: int, small_input: bool = False,
                      zero_init_residual: bool = False) -> nn.Module:
    from torchvision.models import get_model
    kwargs = {"zero_init_residual": True} if zero_init_residual else {}
    net = get_model(name, weights=None, num_classes=num_classes, **kwargs)
    if small_input:
        SMALL_INPUT[family(name)](net)
    if in_channels == 3:
        return net
    if in_channels == 1:
        return _RepeatChannels(net, 1)
    raise ValueError(f"{name}: {in_channels}-channel input is not supported (use 1 or 3 channels)")

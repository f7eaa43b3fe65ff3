"""torchvision classification models, randomly initialised, adapted to the store's channels."""
from __future__ import annotations

import torch
import torch.nn as nn

TORCHVISION_MODELS = ("resnet18", "resnet34", "resnet50", "mobilenet_v3_small", "efficientnet_b0",
                      "convnext_tiny", "regnet_y_400mf")


class _RepeatChannels(nn.Module):
    """Feeds grayscale images to a 3-channel network (weights stay standard torchvision)."""

    def __init__(self, net: nn.Module, in_channels: int):
        super().__init__()
        self.net = net
        self.repeat = 3 // in_channels if in_channels in (1, 3) else 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.expand(-1, 3, -1, -1) if self.repeat == 3 else x)


def torchvision_model(name: str, num_classes: int, in_channels: int) -> nn.Module:
    from torchvision.models import get_model
    net = get_model(name, weights=None, num_classes=num_classes)
    if in_channels == 3:
        return net
    if in_channels == 1:
        return _RepeatChannels(net, 1)
    raise ValueError(f"{name}: {in_channels}-channel input is not supported (use 1 or 3 channels)")

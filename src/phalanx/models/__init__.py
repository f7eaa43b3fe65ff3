"""Model registry: name -> builder(num_classes, in_channels, image_size, width, norm, act) -> nn.Module."""
from __future__ import annotations

from typing import Callable

import torch.nn as nn

from phalanx.models.cnn import MnistNet, PhalanxCNN, PhalanxResNet
from phalanx.models.tv import TORCHVISION_MODELS, torchvision_model

Builder = Callable[[int, int, int, int, str, str], nn.Module]

MODELS: dict[str, Builder] = {
    "mnist_net": lambda nc, ic, size, width, norm, act: MnistNet(nc, ic, size),
    "phalanx_cnn": lambda nc, ic, size, width, norm, act: PhalanxCNN(nc, ic, width, norm, act),
    "phalanx_resnet": lambda nc, ic, size, width, norm, act: PhalanxResNet(nc, ic, width, norm, act),
}
MODELS.update({name: (lambda n: lambda nc, ic, size, width, norm, act: torchvision_model(n, nc, ic))(name)
               for name in TORCHVISION_MODELS})

DESCRIPTIONS = {
    "mnist_net": "pytorch/examples MNIST network (2 conv + 2 FC, dropout): the reference",
    "phalanx_cnn": "house BatchNorm CNN, whitening stem + 5 convs, built for speed on small images (28x28, 32x32)",
    "phalanx_resnet": "house residual BatchNorm CNN, wider and more accurate, ~3x the compute",
}
DESCRIPTIONS.update({n: f"torchvision {n} (random init), input channels adapted" for n in TORCHVISION_MODELS})


def build_model(name: str, num_classes: int, in_channels: int, image_size: int, width: int = 64,
                norm: str = "batch", act: str = "relu") -> nn.Module:
    return MODELS[name](num_classes, in_channels, image_size, width, norm, act)

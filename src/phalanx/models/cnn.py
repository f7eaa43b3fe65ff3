"""House CNNs for small images, and the pytorch/examples MNIST network as the reference."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class MnistNet(nn.Module):
    """The network of pytorch/examples `mnist/main.py`, returning logits."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, image_size: int = 28):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 32, 3, 1)
        self.conv2 = nn.Conv2d(32, 64, 3, 1)
        self.dropout1 = nn.Dropout(0.25)
        self.dropout2 = nn.Dropout(0.5)
        side = (image_size - 4) // 2
        self.fc1 = nn.Linear(64 * side * side, 128)
        self.fc2 = nn.Linear(128, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        x = F.max_pool2d(x, 2)
        x = self.dropout1(x)
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = self.dropout2(x)
        return self.fc2(x)


def norm_layer(kind: str, ch: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(ch)
    if kind == "group":
        return nn.GroupNorm(min(8, ch), ch)
    return nn.Identity()


ACTIVATIONS = {"relu": lambda: nn.ReLU(inplace=True), "gelu": nn.GELU, "silu": lambda: nn.SiLU(inplace=True)}


def conv_bn(cin: int, cout: int, norm: str = "batch", act: str = "relu") -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=norm == "none"), norm_layer(norm, cout),
                         ACTIVATIONS[act]())


def global_max_pool(x: torch.Tensor, training: bool) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, 1, 1), the largest value of each channel.

    Two forms of one result (a maximum is exact either way): adaptive_max_pool2d while training, whose
    backward sends each gradient to one position (~3% faster steps than amax's on a 2-core AMD EPYC,
    width-24 house CNN), and amax otherwise, because torch 2.11's ONNX exporter (the GPU machine's torch;
    2.14's has one) has no translation for adaptive_max_pool2d, and `phalanx export --format onnx` traces
    the eval-mode model.
    """
    return F.adaptive_max_pool2d(x, 1) if training else x.amax(dim=(2, 3), keepdim=True)


class GlobalMaxPool(nn.Module):
    """`global_max_pool` as a module (in place of nn.AdaptiveMaxPool2d(1), for the same reason)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return global_max_pool(x, self.training)


class PhalanxCNN(nn.Module):
    """A strided stem conv to half resolution, two convs there and three at a quarter of it.

    Widths (w/2, w, 2w). Built for time-to-accuracy on small images, where a CPU spends half of
    each step in memory-bound passes (norm, activation, pooling) rather than in convolutions:
    - The stem is a 4x4 conv with stride 2 (a patch embedding with overlap): no full-resolution
      activation, norm or pooling pass at all. On 2 CPU cores this ran ~20% faster per step than a
      3x3 conv + 2x2 max-pool stem, at the same accuracy after 6 epochs (measured in
      benchmarks/README.md).
    - The head is a global max-pool and one linear layer (as in airbench). Concatenating a global
      average pool as well cost ~25% of the step on CPU (its backward mixes memory layouts and
      adds a full pass) for no accuracy gain.
    - The third conv at 7x7 (for 28x28 inputs) is the cheapest depth to add on a CPU.
    - `whiten_stem` (called by the training loop when `model.whiten` is on, the default) fixes the
      stem to whitening filters of the training images' patches: +0.65 points after 6 epochs.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 64, norm: str = "batch",
                 act: str = "relu"):
        super().__init__()
        a, b, c = max(8, width // 2), width, 2 * width
        self.stem = nn.Sequential(nn.Conv2d(in_channels, a, 4, stride=2, padding=1, bias=norm == "none"),
                                  norm_layer(norm, a), ACTIVATIONS[act]())
        self.stage1 = nn.Sequential(conv_bn(a, b, norm, act), conv_bn(b, b, norm, act))
        self.stage2 = nn.Sequential(conv_bn(b, c, norm, act), conv_bn(c, c, norm, act), conv_bn(c, c, norm, act))
        self.head = nn.Linear(c, num_classes, bias=False)
        self.scale = 0.125  # tempers the head's logits early in training, as in airbench

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.stage1(x)
        x = self.stage2(F.max_pool2d(x, 2))
        return self.head(global_max_pool(x, self.training).flatten(1)) * self.scale

    @torch.no_grad()
    def whiten_stem(self, images: torch.Tensor) -> None:
        """Fix the stem's filters to whitening filters of the patches of `images` (see patch_whitening)."""
        conv = self.stem[0]
        conv.weight.copy_(patch_whitening(images, conv).to(conv.weight))
        conv.weight.requires_grad_(False)


@torch.no_grad()
def patch_whitening(images: torch.Tensor, conv: nn.Conv2d, eps: float = 5e-3,
                    max_patches: int = 400_000) -> torch.Tensor:
    """Filters for `conv` that whiten its input patches: PCA of the patches of `images` (normalised
    NCHW floats), each principal direction scaled by 1/sqrt(variance + eps), once with each sign.

    From airbench (Keller Jordan, 2024): a frozen whitening stem lets the rest of the network
    learn from the first step. With the ReLU after it, the +/- pair keeps both halves of each
    direction. Measured here on Fashion-MNIST (house CNN, 6 epochs): 93.28% against 92.63% with a
    learned stem, and 92.81% with 16 one-signed directions. With more filters than twice the patch
    dimension, the pairs repeat. Computed in float64 on one thread, so every rank gets the same bits.
    """
    k, stride, pad = conv.kernel_size, conv.stride, conv.padding
    x = images.detach().to("cpu", torch.float64).contiguous()
    per_image = F.unfold(x[:1], k, padding=pad, stride=stride).shape[2]
    x = x[:max(1, max_patches // per_image)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        p = F.unfold(x, k, padding=pad, stride=stride).transpose(1, 2).reshape(-1, x.shape[1] * k[0] * k[1])
        p = p - p.mean(0)
        var, vec = torch.linalg.eigh(p.T @ p / len(p))  # ascending
    finally:
        torch.set_num_threads(threads)
    var, vec = var.flip(0), vec.flip(1)
    vec = vec * torch.where(vec.gather(0, vec.abs().argmax(0, keepdim=True)) < 0, -1.0, 1.0)  # a fixed sign
    half = (conv.out_channels + 1) // 2
    idx = torch.arange(half) % len(var)
    w = (vec[:, idx] / torch.sqrt(var[idx].clamp_min(0) + eps)).T
    w = torch.cat([w, -w])[:conv.out_channels]
    return w.reshape(conv.out_channels, x.shape[1], k[0], k[1]).float()


class _Residual(nn.Module):
    def __init__(self, ch: int, norm: str, act: str):
        super().__init__()
        self.body = nn.Sequential(conv_bn(ch, ch, norm, act), conv_bn(ch, ch, norm, act))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class PhalanxResNet(nn.Module):
    """ResNet-9 style: conv stages with a residual pair after each pooling; for larger budgets."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 64, norm: str = "batch",
                 act: str = "relu"):
        super().__init__()
        a, b, c = width, 2 * width, 4 * width
        self.net = nn.Sequential(
            conv_bn(in_channels, a, norm, act),
            conv_bn(a, b, norm, act), nn.MaxPool2d(2), _Residual(b, norm, act),
            conv_bn(b, c, norm, act), nn.MaxPool2d(2), _Residual(c, norm, act),
            GlobalMaxPool(), nn.Flatten(), nn.Linear(c, num_classes, bias=False),  # the head stays net.9
        )
        self.scale = 0.125

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x) * self.scale

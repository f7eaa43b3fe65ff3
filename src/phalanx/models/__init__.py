"""Model registry: house CNNs by name, any torchvision classification model by name, and timm's models as
`timm:NAME` when timm is installed.

    build_model(name, num_classes, in_channels, image_size, width, norm, act, small_input, zero_init_residual)

`model_refusal` and `option_refusal` say, in one line, why a name or an option cannot be built (config.py
turns them into ConfigError); `build_model` also runs the model once on the meta device (no memory, no
arithmetic) with an image of the run's size, so an image too small for a network is one line too.
"""
from __future__ import annotations

import difflib
from typing import Callable

import torch
import torch.nn as nn

from phalanx.errors import ConfigError, first_line
from phalanx.models import timm_models as T
from phalanx.models.cnn import MnistNet, PhalanxCNN, PhalanxResNet
from phalanx.models.timm_models import PREFIX as TIMM_PREFIX
from phalanx.models.timm_models import is_timm_name, name_refusal, timm_model
from phalanx.models.tv import CURATED, small_input_refusal, torchvision_model, torchvision_names, zero_init_refusal

Builder = Callable[[int, int, int, int, str, str], nn.Module]

HOUSE: dict[str, Builder] = {
    "mnist_net": lambda nc, ic, size, width, norm, act: MnistNet(nc, ic, size),
    "phalanx_cnn": lambda nc, ic, size, width, norm, act: PhalanxCNN(nc, ic, width, norm, act),
    "phalanx_resnet": lambda nc, ic, size, width, norm, act: PhalanxResNet(nc, ic, width, norm, act),
}

DESCRIPTIONS = {
    "mnist_net": "pytorch/examples MNIST network (2 conv + 2 FC, dropout): the reference",
    "phalanx_cnn": "house BatchNorm CNN, whitening stem + 5 convs, built for speed on small images (28x28, 32x32)",
    "phalanx_resnet": "house residual BatchNorm CNN, Page's DAWNBench ResNet-9 less its last stage; ~3x the compute",
}
DESCRIPTIONS.update({
    "resnet18": "ResNet-18; with --model.small_input the usual CIFAR ResNet-18 (recipe cifar10_resnet's alternative)",
    "resnet34": "ResNet-34",
    "resnet50": "ResNet-50, the ImageNet reference (recipe imagefolder_224)",
    "wide_resnet50_2": "Wide ResNet-50-2: ResNet-50 with twice the bottleneck width",
    "resnext50_32x4d": "ResNeXt-50 32x4d: grouped-convolution ResNet-50",
    "mobilenet_v3_small": "MobileNetV3-Small: built for phones, cheap on CPUs",
    "efficientnet_b0": "EfficientNet-B0 (SiLU, squeeze-excitation)",
    "convnext_tiny": "ConvNeXt-T: LayerNorm and 7x7 depthwise convs, patchify stem (no small_input; 64x64 and up)",
    "regnet_y_400mf": "RegNetY-400MF",
    "densenet121": "DenseNet-121",
})

# The names `phalanx models` lists first; every torchvision classification name and `timm:NAME` work as well.
MODELS = (*HOUSE, *CURATED)


def model_refusal(name: str) -> str | None:
    """Why `name` is no model here, with the closest names (None when it is one)."""
    if name in HOUSE or name in torchvision_names():
        return None
    if is_timm_name(name):
        return name_refusal(name)
    known = (*HOUSE, *torchvision_names())
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.5)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return (f"unknown model{hint}; choose a house model ({', '.join(HOUSE)}), a torchvision classification model "
            f"(resnet50, convnext_tiny, ...) or {TIMM_PREFIX}NAME with timm installed; `phalanx models` lists them")


def option_refusal(name: str, small_input: bool, zero_init_residual: bool) -> tuple[str, str] | None:
    """(field, why) when `name` cannot take the small-input stem or zero_init_residual; None when it can.
    House models are built for small images already, and take neither option."""
    if name in HOUSE:
        if small_input:
            return "model.small_input", f"{name} is built for small images already (no ImageNet stem to replace)"
        if zero_init_residual:
            return "model.zero_init_residual", f"{name} has no zero-initialised residual option (ResNets have)"
        return None
    if is_timm_name(name):  # which timm models take which option shows only when one is built: on meta, free
        try:
            with torch.device("meta"):
                timm_model(name, 10, 3, small_input, zero_init_residual)
        except ConfigError as e:
            key, _, why = str(e).partition(": ")
            return key.split("=")[0], why
        return None
    why = small_input_refusal(name) if small_input else None
    if why:
        return "model.small_input", why
    why = zero_init_refusal(name) if zero_init_residual else None
    return ("model.zero_init_residual", why) if why else None


def _probe(build: Callable[[], nn.Module], name: str, in_channels: int, image_size: int) -> nn.Module:
    """The model, after one forward of one image of the run's size through a copy built on the meta device
    (no memory, no arithmetic): a network whose downsampling leaves nothing of such an image fails here, in
    one line, not mid-step. A builder that computes on tensors (torchvision's RegNets) cannot be built on
    meta: that model itself is probed, in eval mode and without gradients."""
    try:
        with torch.device("meta"):
            probe, net = build(), None
    except (RuntimeError, NotImplementedError):
        probe = net = build()
    x = torch.zeros(1, in_channels, image_size, image_size, device="meta" if net is None else "cpu")
    was_training = probe.training
    try:
        with torch.no_grad():
            probe.eval()(x)
    except (RuntimeError, ValueError, AssertionError, IndexError) as e:
        raise ConfigError(f"model.name={name!r}: does not take {image_size}x{image_size} images "
                          f"({type(e).__name__}: {first_line(e)}); use larger images (--data.size), "
                          f"--model.small_input, or another model") from None
    probe.train(was_training)
    return net if net is not None else build()


def _builder(name: str, num_classes: int, in_channels: int, image_size: int, width: int, norm: str, act: str,
             small_input: bool, zero_init_residual: bool) -> Callable[[], nn.Module]:
    if name in HOUSE:
        return lambda: HOUSE[name](num_classes, in_channels, image_size, width, norm, act)
    if is_timm_name(name):
        return lambda: timm_model(name, num_classes, in_channels, small_input, zero_init_residual)
    if name in torchvision_names():
        return lambda: torchvision_model(name, num_classes, in_channels, small_input, zero_init_residual)
    raise ValueError(model_refusal(name))


def build_model(name: str, num_classes: int, in_channels: int, image_size: int, width: int = 64,
                norm: str = "batch", act: str = "relu", small_input: bool = False,
                zero_init_residual: bool = False) -> nn.Module:
    """The model `name`, randomly initialised (the caller seeds torch's generator)."""
    build = _builder(name, num_classes, in_channels, image_size, width, norm, act, small_input, zero_init_residual)
    if name in HOUSE:  # built for small images: any side the data has
        return build()
    return _probe(build, name, in_channels, image_size)


def parameter_count(name: str, num_classes: int = 10, in_channels: int = 3, image_size: int = 32,
                    width: int = 32) -> int:
    """Parameters of `name` for this data, counted on the meta device (nothing allocated) where it builds there."""
    build = _builder(name, num_classes, in_channels, image_size, width, "batch", "relu", False, False)
    try:
        with torch.device("meta"):
            net = build()
    except (RuntimeError, NotImplementedError):
        net = build()
    return sum(p.numel() for p in net.parameters())


def _millions(n: int) -> str:
    return f"{n / 1e6:7.2f} M"


def listing(pattern: str = "") -> list[str]:
    """What `phalanx models` prints: the house models and the curated torchvision ones with their parameters,
    and a summary of timm's; or, with a wildcard pattern, every torchvision and timm name that matches it."""
    import fnmatch

    has_timm = T.installed()
    if pattern:
        glob = pattern if any(c in pattern for c in "*?[") else f"*{pattern}*"
        tv = [n for n in torchvision_names() if fnmatch.fnmatchcase(n, glob)]
        tm = [TIMM_PREFIX + n for n in T.timm_names(glob)] if has_timm else []
        lines = [f"torchvision ({len(tv)} matching {glob!r}):"] + [f"  {n}" for n in tv]
        lines += ([f"timm ({len(tm)} matching {glob!r}):"] + [f"  {n}" for n in tm] if has_timm
                  else ["timm: not installed (pip install 'phalanx[timm]')"])
        return lines
    lines = ["house models (params for 10 classes, 3 channels, 32x32 images, --model.width 32):"]
    lines += [f"  {n:18s} {_millions(parameter_count(n))}  {DESCRIPTIONS[n]}" for n in HOUSE]
    lines.append(f"torchvision models (a few of its {len(torchvision_names())} classification models; any of them "
                 f"works by name; --model.small_input for 32x32 images):")
    lines += [f"  {n:18s} {_millions(parameter_count(n))}  {DESCRIPTIONS[n]}" for n in CURATED]
    if has_timm:
        import timm
        names = T.timm_names()
        few = [n for n in ("resnet50", "convnext_nano", "efficientnet_b0", "regnety_016", "resnet18d") if n in names]
        lines.append(f"timm {timm.__version__}: {len(names)} models, as --model.name timm:NAME (random init, or "
                     f"--model.pretrained FILE), e.g. {', '.join(TIMM_PREFIX + n for n in few)}")
    else:
        lines.append("timm: not installed; pip install 'phalanx[timm]' adds its models as --model.name timm:NAME")
    lines.append("search all names: phalanx models '*convnext*'")
    return lines

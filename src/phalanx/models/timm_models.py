"""timm's models by name, `timm:NAME` (e.g. `timm:resnet50`, `timm:convnext_nano`), when timm is installed
(`pip install 'phalanx[timm]'`).

`timm:` rather than `timm/`: a `/` would make a sub-folder of the default run directory (named after the
model), and `timm/NAME` is how the Hugging Face hub names timm's pretrained repositories, which Phalanx
never downloads. Always `pretrained=False`; `--model.pretrained PATH` loads local weights instead.
"""
from __future__ import annotations

import importlib.util
from functools import lru_cache

import torch.nn as nn

from phalanx.errors import ConfigError
from phalanx.models.tv import _small_resnet

PREFIX = "timm:"


def is_timm_name(name: str) -> bool:
    return name.startswith(PREFIX)


def installed() -> bool:
    return importlib.util.find_spec("timm") is not None


@lru_cache(maxsize=None)
def timm_names(pattern: str = "") -> tuple[str, ...]:
    """timm's architectures (without pretrained tags), those matching a wildcard pattern such as `*convnext*`."""
    import timm
    return tuple(timm.list_models(pattern or ""))


def name_refusal(name: str) -> str | None:
    """Why `timm:ARCH` cannot be built here (None when it can)."""
    if not installed():
        return "timm is not installed: pip install 'phalanx[timm]' (or pip install timm)"
    import difflib

    import timm
    arch = name[len(PREFIX):]
    if arch and timm.is_model(arch):
        return None
    close = difflib.get_close_matches(arch, timm_names(), n=1, cutoff=0.6)
    hint = f" (did you mean 'timm:{close[0]}'?)" if close else ""
    return f"timm {timm.__version__} has no model {arch!r}{hint}; `phalanx models '*{arch[:12]}*'` searches its names"


def _small_stem(net: nn.Module, name: str) -> None:
    """timm's ResNets with the plain 7x7 stem: a 3x3 stride-1 conv and no max-pool, as for torchvision's."""
    from timm.models.resnet import ResNet

    if not (isinstance(net, ResNet) and isinstance(net.conv1, nn.Conv2d) and isinstance(net.maxpool, nn.MaxPool2d)):
        raise ConfigError(f"model.small_input=True: {name} has no small-image stem here; small_input adapts timm's "
                          f"ResNets with the plain 7x7 stem (timm:resnet18, timm:resnet50, ...)")
    _small_resnet(net)  # the same conv1 and maxpool attributes as torchvision's ResNet


def timm_model(name: str, num_classes: int, in_channels: int, small_input: bool = False,
               zero_init_residual: bool = False) -> nn.Module:
    """`timm.create_model(ARCH, pretrained=False, num_classes, in_chans)`. zero_init_residual asks for timm's
    `zero_init_last` (the last norm of each residual block starts at zero); false leaves timm's default
    (which is on for its ResNets). A model without that argument is one ConfigError line."""
    import timm

    arch = name[len(PREFIX):]
    kwargs = {"zero_init_last": True} if zero_init_residual else {}
    try:
        net = timm.create_model(arch, pretrained=False, num_classes=num_classes, in_chans=in_channels, **kwargs)
    except TypeError as e:
        if "zero_init_last" not in str(e):
            raise
        raise ConfigError(f"model.zero_init_residual=True: {name} has no zero_init_last argument; only residual "
                          f"networks such as timm:resnet50 take it") from None
    if small_input:
        _small_stem(net, name)
    return net

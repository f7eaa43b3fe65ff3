"""`--model.pretrained PATH`: local safetensors weights into a freshly built model (no downloads).

Strict: every tensor of the model must be in the file with its shape, and the file may hold nothing else,
except the classifier head (the last linear layer of `num_classes` outputs), which is kept freshly
initialised when its shape in the file differs (ImageNet's 1,000 classes for 10 here). Anything else is one
ConfigError line naming the file and the first key that does not fit.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn as nn

from phalanx.errors import ConfigError, first_line

log = logging.getLogger("phalanx")


def head_keys(net: nn.Module, num_classes: int) -> set[str]:
    """State-dict keys of the classifier head: the last nn.Linear with `num_classes` outputs."""
    last = None
    for name, m in net.named_modules():
        if isinstance(m, nn.Linear) and m.out_features == num_classes:
            last = name
    if last is None:
        return set()
    prefix = f"{last}." if last else ""
    return {prefix + "weight", prefix + "bias"}


def _aligned(file_sd: dict, own: dict) -> dict:
    """The file's keys as the model names them: weights of a plain torchvision model fit the grayscale-adapted
    one (which holds it as `net.`), and weights saved from that one fit a plain model."""
    if own and all(k.startswith("net.") for k in own) and not any(k.startswith("net.") for k in file_sd):
        return {"net." + k: v for k, v in file_sd.items()}
    if own and not any(k.startswith("net.") for k in own) and file_sd and all(k.startswith("net.") for k in file_sd):
        return {k[4:]: v for k, v in file_sd.items()}
    return file_sd


def load_pretrained(net: nn.Module, path: str, num_classes: int) -> dict:
    """Load `path` into `net` in place; {'loaded': n tensors, 'reinitialised': [head keys kept fresh]}."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    where = f"model.pretrained={path!r}"
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"{where}: no such file (give a local .safetensors file; nothing is downloaded)")
    try:
        file_sd = load_file(str(p))
    except (SafetensorError, OSError, ValueError) as e:
        raise ConfigError(f"{where}: not a safetensors file ({first_line(e)})") from None
    own = net.state_dict()
    file_sd = _aligned(file_sd, own)
    head = head_keys(net, num_classes)
    # BatchNorm's step counter is no weight, and files written before it existed (or stripped of it) lack it:
    # torch's own BatchNorm loading accepts that too.
    missing = [k for k in own if k not in file_sd and not k.endswith("num_batches_tracked")]
    if missing:
        raise ConfigError(f"{where}: has no tensor {missing[0]!r} that this model needs ({len(missing)} missing; "
                          f"weights of another model?)")
    extra = [k for k in file_sd if k not in own]
    if extra:
        raise ConfigError(f"{where}: holds {extra[0]!r}, which this model does not have ({len(extra)} such; weights "
                          f"of another model?)")
    keep, fresh = {}, []
    for k, v in own.items():
        if k not in file_sd:  # a num_batches_tracked counter: keeps its fresh value
            continue
        got = file_sd[k]
        if tuple(got.shape) == tuple(v.shape):
            keep[k] = got
        elif k in head:
            fresh.append(k)
        else:
            raise ConfigError(f"{where}: {k!r} has shape {list(got.shape)} in the file, {list(v.shape)} in this model "
                              f"(another width, channel count or variant?)")
    with torch.no_grad():
        net.load_state_dict(keep, strict=False)
    if fresh:
        log.info(f"model.pretrained: the classifier head ({', '.join(sorted(fresh))}) has "
                 f"{file_sd[sorted(fresh)[-1]].shape[0]} classes in {p.name}, {num_classes} here: re-initialised")
    log.info(f"model.pretrained: loaded {len(keep)} tensors from {p}")
    return {"loaded": len(keep), "reinitialised": sorted(fresh)}

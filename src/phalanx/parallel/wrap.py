"""Wrap the model for data parallelism: SyncBatchNorm, channels-last, DDP with tuned settings, compile."""
from __future__ import annotations

import contextlib
import warnings

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

from phalanx.config import Config
from phalanx.parallel.env import DistEnv


def wrap_model(model: nn.Module, cfg: Config, env: DistEnv) -> nn.Module:
    """Return the module the loop trains; `unwrap` gives back the plain model."""
    model = model.to(env.device)
    if cfg.model.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if env.distributed:
        if cfg.parallel.sync_bn:
            if env.device.type == "cpu":
                from phalanx.config import ConfigError
                raise ConfigError("parallel.sync_bn=True: PyTorch's SyncBatchNorm runs on GPUs only; on CPU use "
                                  "--model.norm=group for statistics independent of the per-rank batch")
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        # No broadcast of rank 0's buffers before each forward: the loop averages the norm statistics
        # over the ranks after each optimizer step instead (collectives.average_across_ranks), so
        # every rank holds the same model, with statistics of every rank's shard, not rank 0's.
        kwargs = {"broadcast_buffers": False}
        with warnings.catch_warnings():  # 2.14 renames broadcast_buffers; 2.11 knows only that name
            warnings.simplefilter("ignore", FutureWarning)
            model = DDP(
                model,
                device_ids=[env.device.index] if env.device.type == "cuda" else None,
                bucket_cap_mb=cfg.parallel.bucket_mb,
                # Gradients alias the all-reduce buckets: one copy less per step and less memory.
                gradient_as_bucket_view=True,
                # static_graph does not combine with skipped syncs (no_sync) in every torch version.
                static_graph=cfg.parallel.static_graph and cfg.grad_accum == 1,
                **kwargs,
            )
    if cfg.model.compile:
        model = torch.compile(model)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model under DDP / torch.compile wrappers (its state_dict has no prefixes)."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, DDP):
            model = model.module
        else:
            return model


def grad_sync(model: nn.Module, sync: bool):
    """Context for one micro-step's backward: skip DDP's all-reduce unless `sync`."""
    inner = model._orig_mod if hasattr(model, "_orig_mod") else model
    if not sync and isinstance(inner, DDP):
        return inner.no_sync()
    return contextlib.nullcontext()

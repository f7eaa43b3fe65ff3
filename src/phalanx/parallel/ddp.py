"""Replicated data parallelism: DDP with tuned settings, norm statistics averaged after each step."""
from __future__ import annotations

import contextlib
import warnings
from pathlib import Path

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.optim.swa_utils import AveragedModel

from phalanx.config import Config
from phalanx.errors import CheckpointError, ConfigError
from phalanx.parallel.collectives import average_across_ranks, norm_statistics
from phalanx.parallel.model_state import averaged_model, load_into, local_bytes
from phalanx.runtime.dist import DistEnv


class DDPStrategy:
    """Every rank holds the whole model; gradients are all-reduced in buckets during backward."""

    name = "ddp"
    sharded = False   # one full copy per rank: rank 0 writes checkpoints alone
    lockstep = False  # a forward needs no other rank

    def __init__(self, cfg: Config, env: DistEnv):
        self.cfg, self.env = cfg, env
        self.plain: nn.Module | None = None
        self.ddp: DDP | None = None
        self._norm_stats: list[torch.Tensor] = []

    def wrap(self, model: nn.Module) -> nn.Module:
        """The module the loop trains: channels-last, SyncBatchNorm when asked, DDP, torch.compile."""
        cfg, env = self.cfg, self.env
        model = model.to(env.device)
        if cfg.model.channels_last:
            model = model.to(memory_format=torch.channels_last)
        if env.distributed and cfg.parallel.sync_bn:
            if env.device.type == "cpu":
                raise ConfigError("parallel.sync_bn=True: PyTorch's SyncBatchNorm runs on GPUs only; on CPU use "
                                  "--model.norm=group for statistics independent of the per-rank batch")
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        self.plain = model
        self._norm_stats = norm_statistics(model)  # each rank updates these from its own shard
        if env.distributed:
            with warnings.catch_warnings():  # 2.14 renames broadcast_buffers; 2.11 knows only that name
                warnings.simplefilter("ignore", FutureWarning)
                model = self.ddp = DDP(
                    model,
                    device_ids=[env.device.index] if env.device.index is not None else None,
                    bucket_cap_mb=cfg.parallel.bucket_mb,
                    # Gradients alias the all-reduce buckets: one copy less per step and less memory.
                    gradient_as_bucket_view=True,
                    # static_graph does not combine with skipped syncs (no_sync) in every torch version.
                    static_graph=cfg.parallel.static_graph and cfg.grad_accum == 1,
                    # No broadcast of rank 0's buffers before each forward: `after_step` averages the
                    # norm statistics instead, so the ranks hold one model with every shard's statistics.
                    broadcast_buffers=False,
                )
        if cfg.model.compile:
            model = torch.compile(model, mode=cfg.model.compile_mode)
        return model

    def averaged(self, decay: float) -> AveragedModel:
        return averaged_model(self.plain, decay)

    def no_sync(self, sync: bool):
        if not sync and self.ddp is not None:
            return self.ddp.no_sync()
        return contextlib.nullcontext()

    def after_step(self) -> None:
        average_across_ranks(self._norm_stats)

    def clip_gradients(self, max_norm: float) -> None:
        nn.utils.clip_grad_norm_(self.plain.parameters(), max_norm)

    def model_state(self) -> dict[str, torch.Tensor]:
        return self.plain.state_dict()

    def full_state(self, module: nn.Module) -> dict[str, torch.Tensor]:
        return module.state_dict()

    def load_full(self, module: nn.Module, sd: dict[str, torch.Tensor], source: Path) -> None:
        load_into(module, sd, source)

    def optim_state(self, optimizer: torch.optim.Optimizer) -> dict:
        return optimizer.state_dict()

    def load_optim_state(self, optimizer: torch.optim.Optimizer, sd: dict, source: Path) -> None:
        try:
            optimizer.load_state_dict(sd)
        except (ValueError, KeyError, RuntimeError) as e:
            raise CheckpointError(f"{source}: optimizer state does not match ({e})") from None

    def memory(self, optimizer: torch.optim.Optimizer) -> dict[str, int]:
        return local_bytes(self.plain, optimizer)

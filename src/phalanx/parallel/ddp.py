"""Replicated data parallelism: DDP with tuned settings, norm statistics averaged after each step."""
from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Callable
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


def comm_hook(compression: str, rank: int = 1, start: int = 2, seed: int = 0) -> tuple[object, Callable]:
    """(state, hook) for `DDP.register_comm_hook`: PyTorch's own gradient-compression hooks. bf16: each bucket
    cast to bfloat16 for the all-reduce (half the bytes of fp32), cast back. powersgd: each n x m layer (a conv
    weight viewed as out x rest) sent as rank-`rank` factors P (n x r) and Q (m x r), with error feedback and warm
    start; 1-D tensors and layers that would not shrink 2x go uncompressed; plain all-reduce for the first
    `start` steps."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook
    if compression == "bf16":
        return None, default_hooks.bf16_compress_hook  # state None: the default process group
    if compression == "powersgd":
        state = powerSGD_hook.PowerSGDState(process_group=None, matrix_approximation_rank=rank,
                                            start_powerSGD_iter=start, use_error_feedback=True, warm_start=True,
                                            random_seed=seed)
        return state, powerSGD_hook.powerSGD_hook
    raise ValueError(f"unknown gradient compression {compression!r}: none, bf16 or powersgd")


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
            if cfg.parallel.grad_compression != "none":
                self.ddp.register_comm_hook(*comm_hook(cfg.parallel.grad_compression, cfg.parallel.powersgd_rank,
                                                       cfg.parallel.powersgd_start, cfg.seed))
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
        if self.cfg.parallel.grad_compression == "powersgd" and self.env.distributed:
            # As timm and torchtitan do: the hook's state is not in the checkpoint. Said, not hidden.
            logging.getLogger("phalanx").info(
                f"resume with --parallel.grad_compression powersgd: PowerSGD's error-feedback memories and "
                f"warm-start factors are not checkpointed; they restart from zero, and the first "
                f"{self.cfg.parallel.powersgd_start} steps after the resume use plain all-reduce again")
        try:
            optimizer.load_state_dict(sd)
        except (ValueError, KeyError, RuntimeError) as e:
            raise CheckpointError(f"{source}: optimizer state does not match ({e})") from None

    def memory(self, optimizer: torch.optim.Optimizer) -> dict[str, int]:
        return local_bytes(self.plain, optimizer)

"""Sharded data parallelism: PyTorch's FSDP2 (`fully_shard`), one shard unit per block of the model.

Each rank holds 1/N of every parameter, of its gradient and of its optimizer state. A unit's
parameters are all-gathered just before its forward (and again before its backward when
`reshard_after_forward`), and its gradients reduce-scattered after its backward. With
`--parallel.shard_size S` the ranks form a 2-D mesh: parameters are sharded within groups of S
ranks and replicated across the groups (HSDP), so the all-gathers stay inside a group.

What this file adds to `fully_shard`:
- the shard units of each model family (`shard_units`), documented in the README;
- norm statistics averaged over the ranks after each step, as under DDP: FSDP2 leaves buffers
  replicated and unsynchronised, and DCP would then save one rank's copy;
- model and optimizer state for checkpoints: sharded (DTensors, for DCP) when saving, and taken
  from full tensors (a DDP checkpoint, any world size) when resuming;
- the full, gathered state_dict for `model.safetensors`.
"""
from __future__ import annotations

import contextlib
import copy
import logging
from pathlib import Path

import torch
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.nn.modules.batchnorm import _BatchNorm
from torch.optim.swa_utils import AveragedModel

from phalanx.config import Config
from phalanx.errors import CheckpointError, ConfigError
from phalanx.models.cnn import MnistNet, PhalanxCNN, PhalanxResNet
from phalanx.models.tv import _RepeatChannels
from phalanx.parallel.collectives import average_across_ranks, norm_statistics
from phalanx.parallel.model_state import averaged_model, check_fits, local_bytes, optim_state_by_name
from phalanx.runtime.dist import DistEnv

log = logging.getLogger("phalanx")


# ----------------------------------------------------------------------------- which modules are shard units

def shard_units(model: nn.Module) -> tuple[list[nn.Module], str]:
    """(the modules to shard on their own, in forward order, not the root; what they are, in words).

    A unit is gathered whole for its forward, so a unit per block keeps one block's full parameters
    in memory at a time and lets the gather of the next block overlap this block's compute. The root
    is sharded last by the caller and holds what no unit took (stems, heads). A model not known here
    gets no units: the root alone is sharded, which saves the same memory at rest but gathers the
    whole model for each forward.
    """
    from torchvision.models.convnext import CNBlock
    from torchvision.models.efficientnet import FusedMBConv, MBConv
    from torchvision.models.mobilenetv3 import InvertedResidual
    from torchvision.models.regnet import ResBottleneckBlock
    from torchvision.models.resnet import BasicBlock, Bottleneck

    net = model.net if isinstance(model, _RepeatChannels) else model
    if isinstance(net, PhalanxCNN):  # stem, then each conv-norm-activation block
        return [net.stem, *net.stage1, *net.stage2], "the stem and each conv block"
    if isinstance(net, PhalanxResNet):
        return [m for m in net.net if any(True for _ in m.parameters())], "each conv block and residual pair"
    if isinstance(net, MnistNet):
        return [net.fc1], "the first fully connected layer (98% of the weights)"
    blocks = (BasicBlock, Bottleneck, CNBlock, MBConv, FusedMBConv, InvertedResidual, ResBottleneckBlock,
              *_timm_blocks(net))
    units = [m for m in net.modules() if isinstance(m, blocks)]
    if units:
        return units, f"each residual block ({len(units)} {type(units[0]).__name__}s)"
    return [], ""


def _timm_blocks(net: nn.Module) -> tuple[type, ...]:
    """timm's residual blocks (its own classes, not torchvision's), for a model timm built; timm is not
    imported for any other model."""
    if not type(net).__module__.startswith("timm."):
        return ()
    from timm.models import _efficientnet_blocks as eff
    from timm.models import convnext, resnet
    return (resnet.BasicBlock, resnet.Bottleneck, convnext.ConvNeXtBlock, eff.DepthwiseSeparableConv,
            eff.InvertedResidual, eff.EdgeResidual)


# ----------------------------------------------------------------------------- the strategy

class FSDPStrategy:
    """Parameters, gradients and optimizer state sharded over the ranks (FSDP2)."""

    name = "fsdp"

    def __init__(self, cfg: Config, env: DistEnv):
        self.cfg, self.env = cfg, env
        self.plain: nn.Module | None = None
        self.sharded = env.distributed
        """Checkpoints hold shards (DCP) rather than one full copy: more than one rank."""
        self.lockstep = env.distributed
        """Every forward is a collective (parameters are gathered): ranks run the same number."""
        self._norm_stats: list[torch.Tensor] = []
        self._mesh = None
        self._mp = None
        self._ema_source: nn.Module | None = None

    # -- wrap

    def wrap(self, model: nn.Module) -> nn.Module:
        """Shard each unit, then the root; compile last when asked. One rank: nothing to shard."""
        cfg, env = self.cfg, self.env
        # Parameters stay contiguous (FSDP2 shards contiguous tensors only); with --model.channels_last the
        # inputs are channels-last, and convolutions follow their input's layout.
        model = model.to(env.device)
        if cfg.parallel.sync_bn:
            raise ConfigError("parallel.sync_bn=True: not supported with --parallel.strategy fsdp; norm statistics "
                              "are averaged over the ranks after each step (or use --model.norm=group)")
        if cfg.ema > 0 and env.distributed:  # the EMA: a copy of the initial weights, sharded like them
            self._ema_source = copy.deepcopy(model)
        self.plain = model
        self._norm_stats = norm_statistics(model)
        if not env.distributed:
            log.info("fsdp with one rank: nothing to shard, the model trains unwrapped")
            return torch.compile(model, mode=cfg.model.compile_mode) if cfg.model.compile else model
        self._mesh = self._device_mesh()
        self._mp = self._mixed_precision()
        units, what = shard_units(model)
        self._shard(model, units)
        if units:
            log.info(f"fsdp: {len(units) + 1} shard units ({what}, then the root) over {self._describe_mesh()}")
        else:
            log.info(f"fsdp: no shard policy for {type(model).__name__}; sharding the root module only (the whole "
                     f"model is gathered for each forward) over {self._describe_mesh()}")
        return torch.compile(model, mode=cfg.model.compile_mode) if cfg.model.compile else model

    def _shard(self, model: nn.Module, units: list[nn.Module]) -> None:
        kw = dict(mesh=self._mesh, mp_policy=self._mp, reshard_after_forward=self.cfg.parallel.reshard_after_forward)
        if self._mp.param_dtype is not None:
            # BatchNorm keeps fp32 parameters beside its fp32 running statistics (the kernels take a bf16
            # input with fp32 statistics and affine parameters, not bf16 ones): a unit of its own each.
            fp32 = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32,
                                        cast_forward_inputs=False)
            for m in model.modules():
                if isinstance(m, _BatchNorm) and any(True for _ in m.parameters()):
                    fully_shard(m, **dict(kw, mp_policy=fp32))
        for unit in units:
            fully_shard(unit, **kw)
        # The root's parameters are needed again at once by backward: keep them gathered (torchtitan does too).
        fully_shard(model, **dict(kw, reshard_after_forward=False))

    def _device_mesh(self):
        world, size = self.env.world, self.cfg.parallel.shard_size or self.env.world
        if world % size:
            raise ConfigError(f"parallel.shard_size={size}: must divide the number of ranks ({world})")
        if size == world:
            return init_device_mesh(self.env.device.type, (world,), mesh_dim_names=("shard",))
        return init_device_mesh(self.env.device.type, (world // size, size), mesh_dim_names=("replicate", "shard"))

    def _describe_mesh(self) -> str:
        shape = tuple(self._mesh.shape)
        if len(shape) == 1:
            return f"{shape[0]} ranks"
        return f"{shape[0]} replica groups of {shape[1]} rank{'s' if shape[1] > 1 else ''} (hybrid sharding)"

    def _mixed_precision(self) -> MixedPrecisionPolicy:
        """bf16 parameters for compute with fp32 gradient reduction, when the precision policy is bf16."""
        dtype = self.env.accel.autocast_dtype(self.cfg.precision)
        if dtype is None:
            return MixedPrecisionPolicy()
        if dtype == torch.float16:
            raise ConfigError("precision=fp16: not supported with --parallel.strategy fsdp (its gradient scaler "
                              "must agree over shards); use --precision bf16")
        return MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)

    def averaged(self, decay: float) -> AveragedModel:
        """The EMA of the weights, sharded like the model (its update is shard-local)."""
        ema = averaged_model(self._ema_source if self._ema_source is not None else self.plain, decay)
        self._ema_source = None
        if self.env.distributed:
            self._shard(ema.module, shard_units(ema.module)[0])
        return ema

    # -- each step

    def no_sync(self, sync: bool):
        """Gradient accumulation: skip the reduce-scatter on all but the last micro-step."""
        if self.env.distributed:
            self.plain.set_requires_gradient_sync(sync)
        return contextlib.nullcontext()

    def after_step(self) -> None:
        average_across_ranks(self._norm_stats)

    def clip_gradients(self, max_norm: float) -> None:
        """torch's clip over the sharded gradients (their norm is all-reduced by DTensor)."""
        nn.utils.clip_grad_norm_(self.plain.parameters(), max_norm)

    # -- state

    def model_state(self) -> dict[str, torch.Tensor]:
        """This rank's shards (DTensors) by parameter name: what DCP writes."""
        return get_model_state_dict(self.plain)

    def optim_state(self, optimizer: torch.optim.Optimizer) -> dict:
        """Optimizer state keyed by parameter name (DTensors): DCP reshards it to any world size."""
        return get_optimizer_state_dict(self.plain, optimizer)

    def full_state(self, module: nn.Module) -> dict[str, torch.Tensor]:
        """The plain, gathered state_dict on CPU (collective; the full tensors on rank 0 only)."""
        if not self.env.distributed:
            return module.state_dict()
        return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def load_full(self, module: nn.Module, sd: dict[str, torch.Tensor], source: Path) -> None:
        """Full tensors (a DDP checkpoint, any world size) into the model or its EMA: each rank keeps its shards."""
        check_fits(module, sd, source)
        set_model_state_dict(module, sd, options=StateDictOptions(full_state_dict=True, strict=True))

    def load_optim_state(self, optimizer: torch.optim.Optimizer, sd: dict, source: Path) -> None:
        """A full optimizer state_dict (torch's, keyed by parameter index) onto this rank's shards."""
        by_name = optim_state_by_name(self.plain, optimizer, sd, source)
        try:
            set_optimizer_state_dict(self.plain, optimizer, by_name, options=StateDictOptions(full_state_dict=True))
        except (ValueError, KeyError, RuntimeError) as e:
            raise CheckpointError(f"{source}: optimizer state does not match ({e})") from None

    def memory(self, optimizer: torch.optim.Optimizer) -> dict[str, int]:
        return local_bytes(self.plain, optimizer)

"""Everything training carries from step to step, with one state_dict / load_state_dict pair that
checkpoint save and resume both use."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.optim.swa_utils import AveragedModel

from phalanx.parallel.strategy import Strategy
from phalanx.runtime import Accelerator
from phalanx.train.precision import Precision


@dataclass
class Position:
    """Where training stands: enough, with the seed, to continue the exact data order."""
    epoch: int = 0
    step: int = 0          # optimizer steps done in `epoch`
    global_step: int = 0   # optimizer steps done in total


@dataclass
class TrainState:
    model: nn.Module                    # the module the loop trains (DDP / compiled wrappers)
    strategy: Strategy
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    precision: Precision
    ema: AveragedModel | None
    accel: Accelerator
    position: Position = field(default_factory=Position)
    history: list[dict] = field(default_factory=list)   # every evaluation so far

    @property
    def plain(self) -> nn.Module:
        """The model itself, under the strategy's wrappers: its state_dict has no prefixes."""
        return self.strategy.plain

    @property
    def eval_model(self) -> nn.Module:
        """What is evaluated, checkpointed as the result and exported: the EMA when there is one."""
        return self.ema if self.ema is not None else self.plain

    @property
    def export_model(self) -> nn.Module:
        return self.ema.module if self.ema is not None else self.plain

    def state_dict(self) -> dict:
        """{'model', 'optim', 'ema', 'state'}: full tensors, or this rank's shards when the strategy shards.
        Collective: it gathers every rank's RNG state."""
        rng = self.accel.rng_state()
        if dist.is_initialized() and dist.get_world_size() > 1:
            rng_all: list = [None] * dist.get_world_size()
            dist.all_gather_object(rng_all, rng)
        else:
            rng_all = [rng]
        return {"model": self.strategy.model_state(), "optim": self.strategy.optim_state(self.optimizer),
                "ema": self.ema.state_dict() if self.ema is not None else None,
                "state": {"position": asdict(self.position), "scheduler": self.scheduler.state_dict(),
                          "scaler": self.precision.state_dict(), "history": self.history,
                          "world": len(rng_all), "rng": {str(r): s for r, s in enumerate(rng_all)}}}

    def load_state_dict(self, sd: dict, source: Path, rank: int) -> None:
        """Back to the state `state_dict` gave (as `checkpoint.load` reads it). This rank's RNG
        continues only when the checkpoint was written by as many ranks."""
        if sd.get("sharded"):  # written by FSDP: DCP fills model, optimizer and EMA, resharding as needed
            from phalanx.train import sharded_checkpoint
            sharded_checkpoint.load_into(source, self.plain, self.optimizer, self.ema)
        else:
            self.strategy.load_full(self.plain, sd["model"], source / "model.safetensors")
            self.strategy.load_optim_state(self.optimizer, sd["optim"], source / "optim.safetensors")
            if self.ema is not None and sd["ema"] is not None:
                self.strategy.load_full(self.ema, sd["ema"], source / "ema.safetensors")
        self.load_progress(sd["state"], rank)

    def load_progress(self, st: dict, rank: int) -> None:
        """Everything but the tensors of model, optimizer and EMA: schedule, scaler, position, history, RNG
        (a checkpoint's state.json, or an in-memory snapshot's, train/snapshot.py)."""
        self.scheduler.load_state_dict(st["scheduler"])
        self.precision.load_state_dict(st.get("scaler"))
        self.position = Position(**st["position"])
        self.history = st.get("history", [])
        rng = st.get("rng") or {}
        world = dist.get_world_size() if dist.is_initialized() else 1
        if st.get("world") == world and str(rank) in rng:
            self.accel.set_rng_state(rng[str(rank)])

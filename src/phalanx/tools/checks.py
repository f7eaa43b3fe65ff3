"""The checks of a config that need torch, the models, the decoder or this machine: what `config.py` (which
imports nothing of Phalanx but errors) cannot know. The launcher runs them after `build_config` and before
anything is written or any rank starts, and a rank that a user's own `torchrun` started runs them too; each
failure is one ConfigError line naming the field, as `Config.validate`'s own are."""
from __future__ import annotations

from pathlib import Path

import torch

from phalanx import config as C
from phalanx import runtime
from phalanx.data.imageio import max_pixels, too_many_pixels
from phalanx.data.mix import mix_layout_error
from phalanx.data.sources import BUILTIN_NAMES
from phalanx.errors import CheckpointError, ConfigError, first_line
from phalanx.models import HOUSE, build_model, model_refusal, option_refusal
from phalanx.observe.sinks import tensorboard_installed
from phalanx.paths import check_path
from phalanx.runtime.cpu import max_processes
from phalanx.train.checkpoint import find_latest, why_no_checkpoint


def checked_config(recipe: str | None, pairs: list[tuple[str, str]]) -> C.Config:
    """`config.build_config` (defaults <- recipe <- pairs, validated), then `check_config`."""
    return check_config(C.build_config(recipe, pairs))


def check_config(cfg: C.Config) -> C.Config:
    """Raise ConfigError (one line naming the field and the fix) for what this machine, its libraries or the
    models rule out; returns `cfg`."""

    def need(ok: bool, key: str, msg: str) -> None:
        if not ok:
            raise ConfigError(f"{key}={C.get_key(cfg, key)!r}: {msg}")

    for key in C.PATH_KEYS:  # a recipe's paths too (the command line's: commands/args.py), before any lookup
        if C.get_key(cfg, key):
            check_path(C.get_key(cfg, key), f"--{key}")
    why = model_refusal(cfg.model.name)
    need(why is None, "model.name", str(why))
    refused = option_refusal(cfg.model.name, cfg.model.small_input, cfg.model.zero_init_residual)
    if refused is not None:  # (field, why)
        need(False, *refused)
    d = cfg.data
    need(not too_many_pixels((d.size, d.size)), "data.size", f"a {d.size}x{d.size} image has more pixels than "
         f"the decoder accepts in any image ({max_pixels():,d}); choose a side such as 64, 224 or 512")
    _check_mix_layout(cfg)
    _check_shard_size(cfg)
    _check_grad_compression(cfg)
    runtime.accelerator(cfg.device)  # `--device cuda` on a machine without CUDA: its one line, before any work
    _check_norm_fits(cfg)
    need(not (d.stream and d.path in BUILTIN_NAMES), "data.stream", f"--data {d.path} is a built-in set, read from "
         f"idx files into a prepared store; --data.stream reads an ImageFolder: leave out --data.stream")
    p = cfg.parallel
    most = max_processes()
    need(p.nproc == "auto" or (len(p.nproc) <= 18 and int(p.nproc) <= most), "parallel.nproc",
         f"more ranks than this node can usefully run (at most {most}); use --nproc auto")
    need(p.threads_per_rank <= most, "parallel.threads_per_rank", f"must be at most {most} (0: cores / ranks)")
    need(d.stream_workers <= most, "data.stream_workers", f"must be at most {most} (0: cores / ranks)")
    need(cfg.log.tensorboard != "true" or tensorboard_installed(), "log.tensorboard",
         "tensorboard is not installed: pip install tensorboard (or --log.tensorboard auto)")
    return cfg


def _check_mix_layout(cfg: C.Config) -> None:
    """With mixup/CutMix and an explicit world size, each rank's part of a micro-batch must hold whole pairs
    (the ranks check again, and `--nproc auto` once it is resolved)."""
    a, nproc = cfg.augment, cfg.parallel.nproc
    world = int(nproc) * cfg.parallel.nnodes if nproc.isdecimal() and len(nproc) <= 6 else 0  # 0: unknown yet
    if (a.mixup > 0 or a.cutmix > 0) and 1 <= world <= 1 << 16:
        why = mix_layout_error(cfg.global_batch, cfg.grad_accum, world)
        if why:
            raise ConfigError(why)


def _check_shard_size(cfg: C.Config) -> None:
    """FSDP's --parallel.shard_size must divide an explicit world size: one line here, before any rank starts
    (parallel/fsdp.py checks again once `--nproc auto` is resolved)."""
    p = cfg.parallel
    world = int(p.nproc) * p.nnodes if p.nproc.isdecimal() and len(p.nproc) <= 6 else 0  # 0: unknown yet
    if p.strategy == "fsdp" and p.shard_size > 0 and 1 <= world <= 1 << 16 and world % p.shard_size:
        raise ConfigError(f"parallel.shard_size={p.shard_size}: must divide the number of ranks ({world}); choose "
                          f"one of {', '.join(str(k) for k in range(1, world + 1) if world % k == 0)} (0: all ranks)")


def _check_grad_compression(cfg: C.Config) -> None:
    """--parallel.grad_compression: PyTorch's DDP comm hooks (parallel/ddp.py), so DDP only, and not with the
    fixed-order gradient sum of invariant training, which replaces DDP's reduction."""
    p = cfg.parallel
    fix = "or --parallel.grad_compression none"
    if p.grad_compression != "none":
        if p.strategy != "ddp":
            raise ConfigError(f"parallel.grad_compression={p.grad_compression!r}: compresses DDP's all-reduce; "
                              f"FSDP reduce-scatters its gradients instead: use --parallel.strategy ddp {fix}")
        if p.invariant:
            raise ConfigError(f"parallel.grad_compression={p.grad_compression!r}: --parallel.invariant true sums "
                              f"gradients in a fixed order of its own (bit-exact), which compression would change: "
                              f"use --parallel.invariant false {fix}")
    if p.powersgd_rank < 1 or p.powersgd_rank > 1 << 20:
        raise ConfigError(f"parallel.powersgd_rank={p.powersgd_rank}: must be in 1..1048576 (1 to 4 are usual)")
    if p.powersgd_start < 2 or p.powersgd_start > 1 << 40:
        raise ConfigError(f"parallel.powersgd_start={p.powersgd_start}: must be >= 2 (DDP rebuilds its buckets "
                          f"after the first step, and PowerSGD's error feedback needs them fixed)")


def _check_norm_fits(cfg: C.Config) -> None:
    """--model.norm group: the house CNNs' GroupNorm needs its groups to divide every layer's channels, which
    follow --model.width; built on the meta device here (nothing allocated) rather than failing in each rank."""
    m = cfg.model
    if m.norm != "group" or m.name not in HOUSE:
        return

    def builds(width: int) -> ValueError | None:
        try:
            with torch.device("meta"):
                build_model(m.name, 10, cfg.data.channels or 1, cfg.data.size or 28, width, m.norm, m.act)
        except ValueError as e:  # GroupNorm: "num_channels must be divisible by num_groups"
            return e
        return None

    why = builds(m.width)
    if why is None:
        return
    fits = [w for w in range(max(1, m.width - 64), m.width + 65) if builds(w) is None]
    near = sorted(fits, key=lambda w: (abs(w - m.width), w))[:2]
    raise ConfigError(f"model.norm='group' at model.width={m.width}: a GroupNorm layer's groups do not divide its "
                      f"channels ({first_line(why)}); use --model.width {' or '.join(map(str, sorted(near)))}, or "
                      f"--model.norm batch")


def checked_resume(cfg: C.Config) -> None:
    """The checkpoint a run resumes from, checked in the launcher before the run prints its start-up lines and
    starts ranks (one CheckpointError line): a --resume without a checkpoint that verifies (none, or each
    damaged), or one written by a run of another model, width or norm (recorded in that run's config.toml)."""
    resume = Path(cfg.ckpt.resume) if cfg.ckpt.resume else None
    found = find_latest(resume or Path(cfg.run_dir)) if resume or cfg.run_dir else None
    if resume is not None and found is None:
        raise CheckpointError(why_no_checkpoint(resume))
    if found is None:  # a new run
        return
    saved_config = (found.parent.parent if found.parent.name == "checkpoints" else found.parent) / "config.toml"
    try:
        saved = C.build_config(str(saved_config), []) if saved_config.is_file() else None
    except (ConfigError, OSError):  # unreadable: the ranks compare the weights themselves
        saved = None
    why = None if saved is None else model_mismatch(saved, cfg)
    if why is not None:
        raise CheckpointError(f"{found}: written by a run of {why}; resume with the options it was trained with")


def model_mismatch(saved: C.Config, cfg: C.Config) -> str | None:
    """Why the weights of a run of config `saved` cannot be loaded into the model `cfg` builds ("--model.width
    16, this run's 24"), or None. Width and norm shape the house CNNs only, small_input the stems of the others;
    the activation holds no weights."""
    keys = ["model.name"] + (["model.width", "model.norm"] if cfg.model.name in HOUSE else ["model.small_input"])
    for key in keys:
        was, now = C.get_key(saved, key), C.get_key(cfg, key)
        if was != now:
            return f"--{key} {was}, this run's {now}"
    return None

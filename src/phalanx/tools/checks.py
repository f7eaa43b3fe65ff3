"""The checks of a config that need torch, the models, the decoder or this machine: what `config.py` (which
imports nothing of Phalanx but errors) cannot know. The launcher runs them after `build_config` and before
anything is written or any rank starts, and a rank that a user's own `torchrun` started runs them too; each
failure is one ConfigError line naming the field, as `Config.validate`'s own are."""
from __future__ import annotations

from phalanx import config as C
from phalanx.data.imageio import max_pixels, too_many_pixels
from phalanx.data.mix import mix_layout_error
from phalanx.errors import ConfigError
from phalanx.models import model_refusal, option_refusal
from phalanx.observe.sinks import tensorboard_installed
from phalanx.runtime.cpu import max_processes


def checked_config(recipe: str | None, pairs: list[tuple[str, str]]) -> C.Config:
    """`config.build_config` (defaults <- recipe <- pairs, validated), then `check_config`."""
    return check_config(C.build_config(recipe, pairs))


def check_config(cfg: C.Config) -> C.Config:
    """Raise ConfigError (one line naming the field and the fix) for what this machine, its libraries or the
    models rule out; returns `cfg`."""

    def need(ok: bool, key: str, msg: str) -> None:
        if not ok:
            raise ConfigError(f"{key}={C.get_key(cfg, key)!r}: {msg}")

    why = model_refusal(cfg.model.name)
    need(why is None, "model.name", str(why))
    refused = option_refusal(cfg.model.name, cfg.model.small_input, cfg.model.zero_init_residual)
    if refused is not None:  # (field, why)
        need(False, *refused)
    d = cfg.data
    need(not too_many_pixels((d.size, d.size)), "data.size", f"a {d.size}x{d.size} image has more pixels than "
         f"the decoder accepts in any image ({max_pixels():,d}); choose a side such as 64, 224 or 512")
    _check_mix_layout(cfg)
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

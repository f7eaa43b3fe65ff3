"""The training loop, readable top to bottom; the parallel pieces are passed in, not hidden in hooks.

    store -> TrainLoader (global order, rank shard, device augment) -> DDP model under autocast
          -> loss (sum / global batch) -> backward (all-reduce on the last micro-step only)
          -> optimizer, schedule, EMA -> exact evaluation -> checkpoints -> final weights
"""
from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from phalanx import config as C
from phalanx import faults
from phalanx.data import streaming
from phalanx.data.augment import Normalize
from phalanx.data.loader import SplitOnDevice, TrainLoader, evenly_spaced
from phalanx.data.sampler import GlobalSampler
from phalanx.data.sources import open_on_node
from phalanx.models import build_model
from phalanx.observe.console import MetricsWriter, Progress, setup_logging
from phalanx.parallel import env as penv
from phalanx.parallel.collectives import (all_reduce_sum, average_across_ranks, barrier, broadcast_object,
                                          norm_statistics, ranks_holding)
from phalanx.parallel.wrap import grad_sync, unwrap, wrap_model
from phalanx.train import checkpoint as ckpt
from phalanx.train import precision
from phalanx.train.evaluate import evaluate


# ----------------------------------------------------------------------------- pieces the loop is built from

def build_optimizer(model: nn.Module, cfg: C.OptimConfig) -> torch.optim.Optimizer:
    """Weight decay on conv/linear weights only: decaying norms and biases only hurts."""
    params = [p for p in model.parameters() if p.requires_grad]  # not a frozen whitening stem
    decay = [p for p in params if p.ndim > 1]
    rest = [p for p in params if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0)
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr)
    return torch.optim.Adadelta(groups, lr=cfg.lr)


def lr_factor(cfg: C.ScheduleConfig, step: int, total: int, steps_per_epoch: int) -> float:
    """Multiplier of the peak learning rate at optimizer step `step` (0-based) of `total`."""
    if cfg.name == "constant":
        return 1.0
    if cfg.name == "step":
        return cfg.gamma ** (step // max(1, steps_per_epoch * cfg.step_epochs))
    warm = int(cfg.warmup * total)
    if step < warm:
        return (step + 1) / warm
    frac = (step - warm) / max(1, total - warm)
    if cfg.name == "onecycle":  # linear warm-up, then linear decay to final_frac
        return 1.0 - (1.0 - cfg.final_frac) * frac
    return cfg.final_frac + (1.0 - cfg.final_frac) * 0.5 * (1.0 + math.cos(math.pi * frac))


@dataclass
class Position:
    """Where training stands: enough, with the seed, to continue the exact data order."""
    epoch: int = 0
    step: int = 0          # optimizer steps done in `epoch`
    global_step: int = 0   # optimizer steps done in total


class Preemption:
    """SIGTERM / SIGUSR1 (SLURM) set a flag; ranks agree on it after each step, checkpoint, exit 0."""

    def __init__(self):
        self.requested = False
        self.signal_name = ""
        self._old = {}
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. an embedding application)
                pass

    def _handle(self, signum, frame) -> None:
        self.requested = True
        self.signal_name = signal.Signals(signum).name

    def agreed(self, device: torch.device) -> bool:
        """True on every rank as soon as any rank got the signal."""
        if not (dist.is_initialized() and dist.get_world_size() > 1):
            return self.requested
        flag = torch.tensor([int(self.requested)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def resolve_run_dir(cfg: C.Config, env: penv.DistEnv) -> Path:
    """Rank 0 picks the run directory, every rank uses that one."""
    if cfg.run_dir:
        name = cfg.run_dir  # all nodes take rank 0's (node 0's launcher) name below
    elif cfg.ckpt.resume:
        found = ckpt.find_latest(Path(cfg.ckpt.resume))
        p = Path(cfg.ckpt.resume)
        name = str(found.parent.parent if found is not None and found.parent.name == "checkpoints" else p)
    elif os.environ.get("TORCHELASTIC_RUN_ID", "none") != "none":
        # Under a bare torchrun the run id is stable across elastic restarts, so a restarted group
        # finds its checkpoints (`phalanx train --nproc` passes an explicit run_dir instead).
        name = str(Path(cfg.out_dir) / f"{cfg.model.name}-{os.environ['TORCHELASTIC_RUN_ID']}")
    else:
        name = cfg.default_run_dir() if env.is_main else ""
    name = broadcast_object(name)
    run_dir = Path(name)
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def _rng_state() -> dict:
    st = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        st["cuda"] = torch.cuda.get_rng_state()
    return st


def export_weights(model: nn.Module, path: Path, meta: dict) -> None:
    """Plain state_dict (no wrapper prefixes) as safetensors, metadata as JSON beside it."""
    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(sd, path, metadata={"phalanx": json.dumps(meta)})
    path.with_suffix(".json").write_text(json.dumps(meta, indent=1))


# ----------------------------------------------------------------------------- the loop

def train(cfg: C.Config) -> dict:
    """Train per `cfg` on this process's rank; returns the final metrics (on every rank)."""
    env = penv.init(cfg.parallel, cfg.device)
    try:
        return _train(cfg, env)
    except RuntimeError as e:  # DistBackendError and gloo's errors are RuntimeErrors
        if env.world > 1 and _looks_like_peer_failure(e):
            import logging
            import re
            detail = re.sub(r"^\[[^\]]*\]\s*", "", str(e).splitlines()[0]).split(". ")[0]
            msg = (f"phalanx: rank {env.rank} stopped while {env.phase}: another rank exited or stalled "
                   f"({detail}). The launcher's report below names the failing rank; every rank's log is in "
                   f"RUN_DIR/logs/rank-K.log")
            log = logging.getLogger("phalanx")
            log.error(msg)  # rank 0's console and every rank's file
            if not env.is_main or not log.handlers:
                print(msg, file=sys.stderr, flush=True)
            # Exit after the peer: the agent names the first rank it sees exit as the root cause, and
            # forked ranks are polled together (it checks every 0.5 s under `phalanx train --nproc`).
            time.sleep(1.0)
            raise SystemExit(1) from None
        raise
    finally:
        penv.teardown()


def _check_ranks_hold_one_model(model: nn.Module, step: int, log) -> None:
    """Every rank must evaluate, save and export the same weights: compare their digests."""
    digests = ranks_holding(model)
    if len(set(digests)) == 1:
        log.debug(f"step {step}: the {len(digests)} rank(s) hold one model (state {digests[0]})")
    else:  # a defect, not a user error: say so loudly, keep training
        log.error(f"step {step}: ranks hold different models (state digests by rank: {digests}); the "
                  f"evaluation mixes them and rank 0's copy is saved. Please report this.")


def _looks_like_peer_failure(e: BaseException) -> bool:
    s = str(e).lower()
    return any(w in s for w in ("connection", "timed out", "timeout", "peer", "broken pipe", "closed", "gloo",
                                "nccl", "socket"))


def _train(cfg: C.Config, env: penv.DistEnv) -> dict:
    env.phase = "preparing the run directory"
    run_dir = resolve_run_dir(cfg, env)
    log = setup_logging(run_dir, env.rank, console=env.is_main)
    metrics = MetricsWriter(run_dir / "metrics.jsonl" if env.is_main else None)
    if env.is_main:
        (run_dir / "config.toml").write_text(C.to_toml(cfg))
    log.info(f"rank {env.rank}/{env.world} pid {os.getpid()} device {env.device} threads {env.threads} "
             f"backend {env.backend} restart {env.restart}")

    # ---- data: local rank 0 prepares the store once per node; every rank maps the same files
    env.phase = "preparing the data"
    if cfg.data.stream:  # no store: DataLoader workers decode the ImageFolder every step
        workers = streaming.stream_workers(cfg.data.stream_workers, env.local_world)
        store = streaming.open_folder_stream(cfg.data.path, cfg.data.size, cfg.data.channels, workers, env.is_main)
        if not cfg.data.channels:  # record the choice, so `phalanx eval RUN_DIR` prepares the same channels
            cfg.data.channels = store.shape[2]
            if env.is_main:
                (run_dir / "config.toml").write_text(C.to_toml(cfg))
    else:
        store = open_on_node(cfg.data.path, cfg.data.cache_dir, cfg.data.auto_install, env.local_rank,
                             cfg.data.size, cfg.data.channels)
    train_split, test_split = store["train"], store["test" if "test" in store.splits else "val"]
    h, w, c = store.shape
    world_batch_ok = cfg.global_batch // cfg.grad_accum >= env.world
    if not world_batch_ok:
        raise C.ConfigError(f"global_batch={cfg.global_batch} with grad_accum={cfg.grad_accum} gives fewer images "
                            f"per micro-step than the {env.world} ranks")
    sampler = GlobalSampler(len(train_split), cfg.global_batch, cfg.seed, env.world, env.rank, cfg.grad_accum)
    normalize = Normalize(store.mean, store.std, env.device, cfg.model.channels_last)
    if cfg.data.stream:
        loader = streaming.StreamTrainLoader(train_split, sampler, cfg.augment, normalize, env.device, cfg.seed,
                                             workers)
        test_data = streaming.StreamSplit(test_split, env.device, workers)
    else:
        loader = TrainLoader(train_split, sampler, cfg.augment, normalize, env.device, cfg.seed, cfg.data.prefetch)
        test_data = SplitOnDevice(test_split, env.device, resident=loader.source.images is not None)

    # ---- model, optimizer, schedule, precision, EMA
    torch.manual_seed(cfg.seed)  # same initial weights on every rank (DDP also broadcasts them)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    net = build_model(cfg.model.name, len(store.classes), c, h, cfg.model.width, cfg.model.norm, cfg.model.act)
    if cfg.model.whiten and hasattr(net, "whiten_stem"):  # before DDP's broadcast; a resume overwrites it
        net.whiten_stem(normalize(evenly_spaced(train_split, 512 if cfg.data.stream else 2048).to(env.device)))
    model = wrap_model(net, cfg, env)
    plain = unwrap(model)
    norm_stats = norm_statistics(plain)  # each rank updates these from its own shard
    optimizer = build_optimizer(plain, cfg.optim)
    steps_per_epoch = sampler.steps
    total_steps = steps_per_epoch * cfg.epochs
    if cfg.max_steps:
        total_steps = min(total_steps, cfg.max_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(cfg.sched, s, max(1, total_steps), steps_per_epoch))
    amp = precision.autocast_dtype(cfg.precision, env.device)
    scaler = precision.grad_scaler(env.device, amp)
    ema = (AveragedModel(plain, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema), use_buffers=True)
           if cfg.ema > 0 else None)
    n_params = sum(p.numel() for p in plain.parameters())
    log.info(f"run {run_dir} | model {cfg.model.name} ({n_params / 1e6:.2f} M params) | data {store.path.name} "
             f"{len(train_split)} train / {len(test_split)} test, {h}x{w}x{c} | world {env.world} x "
             f"{env.threads} threads on {env.device} | precision {precision.name(amp)} | global batch "
             f"{cfg.global_batch} ({steps_per_epoch} steps/epoch)")

    # ---- resume: an explicit --resume, or a checkpoint already in this run directory
    pos = Position()
    history: list[dict] = []
    if cfg.ckpt.resume:
        found = ckpt.find_latest(Path(cfg.ckpt.resume))
        if found is None:  # asked for explicitly: never silently start from scratch
            raise ckpt.CheckpointError(ckpt.why_no_checkpoint(Path(cfg.ckpt.resume)))
    else:
        found = ckpt.find_latest(run_dir)
        if found is None and (run_dir / "checkpoints").is_dir() and any((run_dir / "checkpoints").glob("step-*")):
            log.warning(ckpt.why_no_checkpoint(run_dir) + "; starting from scratch")
    if found is not None:
        env.phase = f"loading checkpoint {found}"
        got = ckpt.load(found)
        ckpt.load_into(plain, got["model"], found / "model.safetensors")
        try:
            optimizer.load_state_dict(got["optim"])
        except (ValueError, KeyError, RuntimeError) as e:
            raise ckpt.CheckpointError(f"{found / 'optim.safetensors'}: optimizer state does not match ({e})") from None
        st = got["state"]
        scheduler.load_state_dict(st["scheduler"])
        if scaler is not None and st.get("scaler"):
            scaler.load_state_dict(st["scaler"])
        if ema is not None and got["ema"] is not None:
            ckpt.load_into(ema, got["ema"], found / "ema.safetensors")
        pos = Position(**st["position"])
        history = st.get("history", [])
        rng = st.get("rng") or {}
        if st.get("world") == env.world and str(env.rank) in rng:
            torch.set_rng_state(rng[str(env.rank)]["torch"])
        if st.get("global_batch") != cfg.global_batch:
            log.warning(f"resuming with global_batch={cfg.global_batch}, checkpoint used {st.get('global_batch')}: "
                        f"the data order will differ from an uninterrupted run")
        log.info(f"resumed from {found} at epoch {pos.epoch + 1}, step {pos.step} (global step {pos.global_step}), "
                 f"written by {st.get('world')} ranks, now {env.world}")
        if pos.step >= steps_per_epoch:
            pos = Position(pos.epoch + 1, 0, pos.global_step)
        if pos.global_step >= total_steps or pos.epoch >= cfg.epochs:
            log.info(f"{found} is the end of this run ({pos.global_step} steps): nothing left to train; "
                     f"re-exporting its weights (raise --epochs, or use another --run_dir, to train more)")

    def save_checkpoint(reason: str) -> Path | None:
        env.phase = f"writing a checkpoint ({reason})"
        rng_all = [None] * env.world
        if env.world > 1:
            dist.all_gather_object(rng_all, _rng_state())
        else:
            rng_all = [_rng_state()]
        path = None
        if env.is_main:
            state = {"position": pos.__dict__, "scheduler": scheduler.state_dict(),
                     "scaler": scaler.state_dict() if scaler is not None else None,
                     "world": env.world, "global_batch": cfg.global_batch, "config": C.to_dict(cfg),
                     "history": history, "reason": reason, "rng": {str(r): s for r, s in enumerate(rng_all)}}
            path = ckpt.save(run_dir / "checkpoints", pos.global_step, plain.state_dict(), optimizer.state_dict(),
                             state, ema.state_dict() if ema is not None else None, cfg.ckpt.keep, env.rank)
            log.info(f"checkpoint {path} ({reason})")
        barrier()
        return path

    # ---- train
    preempt = Preemption()
    progress = Progress(total_steps, min(pos.global_step, total_steps), cfg.progress and env.is_main)
    eval_model = ema if ema is not None else plain
    last_ckpt_time = time.monotonic()
    t_start = time.perf_counter()
    result: dict = {}
    log_every = max(1, min(50, steps_per_epoch // 4))
    loss_acc = torch.zeros(2, dtype=torch.float64, device=env.device)  # (loss sum, images) since last log
    seen, t_window = 0, time.perf_counter()
    stopped_early = False
    samples_log = open(run_dir / "logs" / f"samples-rank-{env.rank}.jsonl", "a") if cfg.log_samples else None
    try:
        for epoch in range(pos.epoch, cfg.epochs):
            if pos.global_step >= total_steps:
                break
            model.train()
            t_epoch, imgs_epoch = time.perf_counter(), 0
            for batch in loader.epoch(epoch, pos.step if epoch == pos.epoch else 0):
                last_micro = batch.micro == cfg.grad_accum - 1
                env.phase = f"training epoch {epoch + 1} step {batch.step + 1} (forward/backward, gradient all-reduce)"
                with grad_sync(model, last_micro):
                    with precision.autocast(env.device, amp):
                        out = model(batch.x)
                    # Sum over this rank's images / global batch x world: DDP's mean over ranks then
                    # gives the global-batch mean, however unevenly the batch was split.
                    loss_sum = F.cross_entropy(out.float(), batch.y, reduction="sum",
                                               label_smoothing=cfg.optim.label_smoothing)
                    loss = loss_sum * (env.world / cfg.global_batch)
                    (scaler.scale(loss) if scaler is not None else loss).backward()
                loss_acc[0] += loss_sum.detach()
                loss_acc[1] += len(batch.y)
                if samples_log is not None:
                    samples_log.write(json.dumps({"epoch": epoch, "step": batch.step, "micro": batch.micro,
                                                  "idx": batch.idx.tolist()}) + "\n")
                if not last_micro:
                    continue
                if cfg.optim.grad_clip > 0:
                    if scaler is not None:
                        scaler.unscale_(optimizer)
                    nn.utils.clip_grad_norm_(plain.parameters(), cfg.optim.grad_clip)
                if scaler is not None:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                average_across_ranks(norm_stats)  # one model on every rank, before the EMA takes it in
                if ema is not None:
                    ema.update_parameters(plain)
                pos.step = batch.step + 1
                pos.global_step += 1
                if pos.global_step == 1:
                    penv.set_collective_timeout(cfg.parallel.timeout_s)
                faults.maybe("step", env.rank, pos.global_step)
                seen += cfg.global_batch
                imgs_epoch += cfg.global_batch
                shown_loss = None
                if pos.global_step % log_every == 0 or pos.step == steps_per_epoch or pos.global_step >= total_steps:
                    env.phase = f"reducing training metrics at step {pos.global_step}"
                    all_reduce_sum(loss_acc)
                    shown_loss = float(loss_acc[0] / loss_acc[1].clamp(min=1))
                    dt = time.perf_counter() - t_window
                    rate = seen / max(dt, 1e-9)
                    metrics.write(event="train", epoch=epoch + 1, step=pos.global_step, loss=round(shown_loss, 5),
                                  lr=scheduler.get_last_lr()[0], img_s=round(rate, 1))
                    loss_acc.zero_()
                    seen, t_window = 0, time.perf_counter()
                    progress.update(epoch, cfg.epochs, shown_loss, rate)
                else:
                    progress.update(epoch, cfg.epochs, None, seen / max(time.perf_counter() - t_window, 1e-9))

                env.phase = f"agreeing on preemption at step {pos.global_step}"
                if preempt.agreed(env.device):
                    path = save_checkpoint(f"preempted by {preempt.signal_name or 'a signal on another rank'}")
                    msg = (f"preempted at epoch {epoch + 1}, step {pos.step}: checkpoint "
                           f"{path or run_dir / 'checkpoints'} written; resume with `phalanx train --resume {run_dir}`"
                           f" (or start the same command again)")
                    log.info(msg)
                    stopped_early = True
                    return {"preempted": True, "run_dir": str(run_dir), "global_step": pos.global_step}
                due_steps = cfg.ckpt.every_steps and pos.global_step % cfg.ckpt.every_steps == 0
                due_time = cfg.ckpt.every_minutes and time.monotonic() - last_ckpt_time >= 60 * cfg.ckpt.every_minutes
                if env.world > 1 and cfg.ckpt.every_minutes:  # ranks must agree, clocks may not
                    due_time = bool(broadcast_object(bool(due_time)))
                if (due_steps or due_time) and pos.step < steps_per_epoch:
                    save_checkpoint("periodic")
                    last_ckpt_time = time.monotonic()
                if pos.global_step >= total_steps:
                    break
            epoch_time = time.perf_counter() - t_epoch
            finished_epoch = pos.step >= steps_per_epoch
            last = epoch == cfg.epochs - 1 or pos.global_step >= total_steps
            if (epoch + 1) % cfg.eval_every == 0 or last:
                env.phase = f"evaluating after epoch {epoch + 1}"
                res = evaluate(eval_model, test_data, normalize, cfg.eval_batch, env.world, env.rank, amp, cfg.tta_flip)
                res.update(epoch=epoch + 1, step=pos.global_step, train_img_s=round(imgs_epoch / max(epoch_time, 1e-9), 1),
                           wall_s=round(time.perf_counter() - t_start, 2))
                if env.device.type == "cuda":  # this rank's peak, training and evaluation included
                    res["peak_mem_mb"] = round(torch.cuda.max_memory_allocated(env.device) / 2**20, 1)
                _check_ranks_hold_one_model(eval_model, pos.global_step, log)
                history.append(res)
                metrics.write(event="eval", **res)
                log.info(f"epoch {epoch + 1}/{cfg.epochs}  test acc {100 * res['acc']:.2f}%  loss {res['loss']:.4f}  "
                         f"{res['train_img_s']:,.0f} img/s  ({res['wall_s']:.1f} s)")
                result = res
            if finished_epoch:
                pos = Position(epoch + 1, 0, pos.global_step)
                if cfg.ckpt.at_epoch_end:  # also after the last epoch: re-running a finished run trains nothing
                    save_checkpoint("end of training" if last else "end of epoch")
                    last_ckpt_time = time.monotonic()
    finally:
        progress.close()
        preempt.restore()
        if samples_log is not None:
            samples_log.close()

    if not result and history:  # a finished run started again: its last evaluation is the result
        result = history[-1]
    # ---- final weights, plain: loadable with load_state_dict into the model class, no prefixes
    if not stopped_early and env.is_main:
        meta = {"model": cfg.model.name, "width": cfg.model.width, "norm": cfg.model.norm, "act": cfg.model.act, "num_classes": len(store.classes),
                "in_channels": c, "image_size": h, "classes": store.classes, "mean": store.mean, "std": store.std,
                "ema": ema is not None}
        final_module = ema.module if ema is not None else plain
        export_weights(final_module, run_dir / "model.safetensors", meta)
        summary = dict(result, run_dir=str(run_dir), global_step=pos.global_step, world=env.world,
                       precision=precision.name(amp), train_s=round(time.perf_counter() - t_start, 2))
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
        try:
            from phalanx.observe.plots import plot_run
            plot_run(run_dir)
        except Exception as e:  # a plot is a nicety; never fail a finished run for it
            log.warning(f"could not draw curves.png: {e}")
        log.info(f"final test accuracy {100 * result.get('acc', float('nan')):.2f}%  run directory {run_dir}")
    barrier()
    return dict(result, run_dir=str(run_dir))

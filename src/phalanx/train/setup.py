"""Run set-up: the run directory, the data, the model with its strategy, and the state (resumed
from a checkpoint when there is one)."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from phalanx import config as C
from phalanx.data import shards, streaming
from phalanx.data.augment import Normalize, eval_crop_of
from phalanx.data.loader import SplitOnDevice, TrainLoader, evenly_spaced
from phalanx.data.sampler import GlobalSampler
from phalanx.data.sources import cache_dir, open_on_node
from phalanx.errors import CheckpointError, ConfigError, DataChoiceError, DataError
from phalanx.models import build_model
from phalanx.observe.console import MetricsWriter, setup_logging
from phalanx.observe.sinks import metric_sinks
from phalanx.parallel.collectives import barrier, broadcast_object
from phalanx.parallel.invariant import micro_steps
from phalanx.parallel.strategy import build_strategy
from phalanx.paths import (
    RunLock,
    check_destination,
    check_run_dir_is_ours,
    inside,
    launcher_run_dir,
    started_by_launcher,
)
from phalanx.runtime import hang
from phalanx.runtime.dist import DistEnv
from phalanx.train import checkpoint as ckpt
from phalanx.train.budget import (
    TUNED_RATE_ENV,
    Budget,
    StepClock,
    command_start,
    estimate_every,
    eval_seconds_guess,
)
from phalanx.train.checkpoint_writer import CheckpointWriter
from phalanx.train.precision import Precision
from phalanx.train.schedule import build_optimizer, build_scheduler
from phalanx.train.snapshot import Snapshots, newest_disk_step, resume_from_snapshot
from phalanx.train.startup import Phases
from phalanx.train.state import Position, TrainState


@dataclass
class Run:
    """What one training run is made of, built by `setup`."""
    cfg: C.Config
    env: DistEnv
    run_dir: Path
    log: logging.Logger
    metrics: MetricsWriter
    store: Any                 # Store or FolderStream: classes, mean, std, shape
    loader: Any                # TrainLoader or StreamTrainLoader: this rank's augmented micro-batches
    test_data: Any             # SplitOnDevice or StreamSplit
    normalize: Normalize
    state: TrainState
    steps_per_epoch: int
    total_steps: int
    memory: dict = field(default_factory=dict)   # bytes this rank holds for training (after its first step)
    budget: Budget | None = None                 # --budget: the deadline, and the steps that fit before it
    horizon: dict = field(default_factory=dict)  # {"total": steps} the LR schedule is laid over
    step_clock: StepClock = field(default_factory=StepClock)   # seconds per step, for the budget
    predicted_s: float | None = None             # the budget's latest estimate of the whole run's wall time
    eval_s: float | None = None                  # the final evaluation's seconds, timed for the budget
    writer: CheckpointWriter = field(default_factory=CheckpointWriter)  # --ckpt.async: writes in the background
    startup: Phases | None = None                # the seconds before the first step, by phase (train/startup.py)
    snapshots: Snapshots | None = None           # --ckpt.snapshot_every: the state in the nodes' shared memory

    @property
    def epochs(self) -> int:
        """Epochs this run trains: --epochs, or under a budget as many as its steps reach."""
        if self.budget is None:
            return self.cfg.epochs
        return -(-self.total_steps // self.steps_per_epoch)

    def set_total_steps(self, total: int) -> None:
        """Train to `total` steps (a budget's new estimate): the loop and the LR schedule both follow."""
        self.total_steps = self.horizon["total"] = total


_TORCHRUN_LOCK: list[RunLock] = []
"""The run directory's lock, held by rank 0 of a user's own torchrun until its process exits."""


def run_dir_for(cfg: C.Config) -> Path:
    """The run directory `phalanx train` runs in: --run_dir; else the run a --resume names (RUN for RUN,
    RUN/checkpoints and RUN/checkpoints/step-N; as `resolve_run_dir` finds it); else a new
    OUT_DIR/<date>-<time>-<model>, with -2, -3... when another run started in the same second."""
    if cfg.run_dir:
        return Path(cfg.run_dir)
    if cfg.ckpt.resume:
        p = Path(cfg.ckpt.resume)
        if p.name == "checkpoints" or (p.name.startswith("step-") and p.parent.name == "checkpoints"):
            return p.parent if p.name == "checkpoints" else p.parent.parent
        return p
    base = Path(cfg.default_run_dir())
    return next(d for d in (base.with_name(f"{base.name}{f'-{k}' if k > 1 else ''}") for k in range(1, 1000))
                if not d.exists())


def resolve_run_dir(cfg: C.Config, env: DistEnv) -> Path:
    """Rank 0 picks the run directory, every rank uses that one."""
    found = ckpt.find_latest(Path(cfg.ckpt.resume)) if cfg.ckpt.resume else None
    if cfg.ckpt.resume and found is None:  # refused before anything is created (every rank sees the same files)
        raise CheckpointError(ckpt.why_no_checkpoint(Path(cfg.ckpt.resume)))
    if cfg.run_dir:
        name = cfg.run_dir  # all nodes take rank 0's (node 0's launcher) name below
    elif launcher_run_dir() is not None:  # one rank in `phalanx train`'s own process: the folder it locked
        name = str(launcher_run_dir())
    elif found is not None:
        p = Path(cfg.ckpt.resume)
        name = str(found.parent.parent if found.parent.name == "checkpoints" else p)
    elif os.environ.get("TORCHELASTIC_RUN_ID", "none") != "none":
        # Under a bare torchrun the run id is stable across elastic restarts, so a restarted group
        # finds its checkpoints (`phalanx train --nproc` passes an explicit run_dir instead).
        name = str(Path(cfg.out_dir) / f"{cfg.model.name}-{os.environ['TORCHELASTIC_RUN_ID']}")
    else:
        name = cfg.default_run_dir() if env.is_main else ""
    name = broadcast_object(name)
    run_dir = Path(name)
    if env.is_main and not started_by_launcher() and ("TORCHELASTIC_RUN_ID" in os.environ
                                                      or getattr(env, "world", 1) > 1):
        # Rank 0 of a user's own torchrun (or of srun's tasks) holds the lock for the life of its process
        # (`phalanx train` holds it for the ranks it starts); the kernel releases it when the process exits, and
        # a restarted group's rank 0 takes it again.
        _TORCHRUN_LOCK.append(RunLock.take(run_dir, "--run_dir"))
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a file in the way, a read-only folder, a full disk: `check_run_dir` tells it sooner
        raise ConfigError(f"run directory {run_dir}: cannot create it ({e.strerror or e}); choose another "
                          f"--run_dir or --out_dir") from None
    return run_dir


def check_run_dir(cfg: C.Config) -> None:
    """One ConfigError line, before anything is written, unless the run directory can be created and
    written (it, or the nearest folder above it that exists, a folder this process may write in; no link loop, no
    name too long, not in /proc), is new, empty or a run directory (never a folder of the user's), and lies
    neither inside the data nor holds it. A --resume of a path that does not exist is one CheckpointError line."""
    key, given = next((k, v) for k, v in (("run_dir", cfg.run_dir), ("ckpt.resume", cfg.ckpt.resume),
                                          ("out_dir", cfg.out_dir)) if v or k == "out_dir")
    fix = f"choose another --{key}"
    if cfg.ckpt.resume and not Path(cfg.ckpt.resume).exists():  # a typo: say so before any rank is started
        raise CheckpointError(ckpt.why_no_checkpoint(Path(cfg.ckpt.resume)))
    check_destination(given, f"--{key}", fix, folder=True)
    run_dir = Path(given) if key == "out_dir" else run_dir_for(cfg)
    if key != "out_dir":
        check_run_dir_is_ours(run_dir, f"--{key}", f"{fix} (a new or empty folder, or a run directory to resume)")
    data = Path(cfg.data.path).expanduser()
    if data.exists() and (inside(run_dir, data) or (key != "out_dir" and inside(data, run_dir))):
        what = "lies inside" if inside(run_dir, data) else "holds"
        raise ConfigError(f"--{key} {given}: {what} the data {data}; a run writes logs/, checkpoints and "
                          f"config.toml into its folder, which the data would then hold (and the next `phalanx "
                          f"data prepare` read as classes); {fix}, outside {data}")


def open_data(cfg: C.Config, env: DistEnv, run_dir: Path):
    """(store, loader, test data, normalize, sampler): local rank 0 prepares the store once per node and
    every rank maps the same files; or, streamed, DataLoader workers decode the ImageFolder every step."""
    from_shards = shards.is_shards(cfg.data.path)
    if from_shards:  # tar shards from a URL or folder: DataLoader workers read them through a node's cache
        workers = streaming.stream_workers(cfg.data.stream_workers, env.local_world)
        store = shards.open_shards(cfg.data.path, cfg.data.size, cfg.data.channels, cache_dir(cfg.data.cache_dir),
                                   cfg.data.shard_cache, env.is_main)
    elif cfg.data.stream:
        workers = streaming.stream_workers(cfg.data.stream_workers, env.local_world)
        store = streaming.open_folder_stream(cfg.data.path, cfg.data.size, cfg.data.channels, workers, env.is_main)
        if not cfg.data.channels:  # recorded in config.toml, so `phalanx eval RUN_DIR` prepares the same channels
            cfg.data.channels = store.shape[2]
    else:
        store = open_on_node(cfg.data.path, cfg.data.cache_dir, cfg.data.auto_install, env.local_rank,
                             cfg.data.size, cfg.data.channels)
    check_data(cfg, store)
    train_split, test_split = store["train"], store["test" if "test" in store.splits else "val"]
    if cfg.global_batch // cfg.grad_accum < env.world:
        raise ConfigError(f"global_batch={cfg.global_batch} with grad_accum={cfg.grad_accum} gives fewer images "
                            f"per micro-step than the {env.world} ranks")
    # Invariant mode: M / W micro-steps per rank, so that each rank's part of a micro-step is one micro-batch.
    accum = micro_steps(cfg, env.world)
    sampler = (store.sampler(cfg.global_batch, cfg.seed, env.world, env.rank, accum, cfg.data.shard_buffer)
               if from_shards else GlobalSampler(len(train_split), cfg.global_batch, cfg.seed, env.world, env.rank,
                                                 accum))
    a = cfg.augment  # evaluation resizes and centre-crops when the model trains on crops
    normalize = Normalize(store.mean, store.std, env.device, cfg.model.channels_last,
                          eval_crop_of(a.crop_size, a.eval_crop, store.shape[0]))
    if from_shards:
        loader = shards.ShardTrainLoader(train_split, sampler, cfg.augment, normalize, env.device, cfg.seed, workers)
        test_data = streaming.StreamSplit(test_split, env.device, workers)
    elif cfg.data.stream:
        loader = streaming.StreamTrainLoader(train_split, sampler, cfg.augment, normalize, env.device, cfg.seed,
                                             workers)
        test_data = streaming.StreamSplit(test_split, env.device, workers)
    else:
        loader = TrainLoader(train_split, sampler, cfg.augment, normalize, env.device, cfg.seed, cfg.data.prefetch)
        test_data = SplitOnDevice(test_split, env.device, resident=loader.source.images is not None)
    return store, loader, test_data, normalize, sampler


# Where each kind of source keeps its test split (see data/prepare.py), to say how to add one.
_HOW_TO_ADD_A_TEST_SPLIT = {
    "idx": "add t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz beside the train-*-ubyte files in {src}",
    "imagefolder": "add a test/ (or val/) folder of class folders beside {src}/train, or give every class folder "
                   "of {src} 2 or more images (10% of each class is then held out for testing)",
    "cifar10": "add test_batch.bin beside the data_batch_*.bin files in {src}",
    "cifar100": "add test.bin beside train.bin in {src}",
}


def check_data(cfg: C.Config, store) -> None:
    """One line, before any training, for data a run cannot learn from or be evaluated on (one class, no
    test images) and for settings these images rule out (a global batch larger than the training split,
    crops and cutouts larger than the images)."""
    manifest = getattr(store, "manifest", None) or {}  # a streamed ImageFolder has none
    kind = manifest.get("options", {}).get("kind", "imagefolder" if manifest == {} else None)
    src = manifest.get("source", store.path)
    train = store["train"]
    if len(train) == 0:
        raise DataError(f"{store.path}: no training images")
    labels = np.asarray(train.labels)
    if labels.min() == labels.max():
        name = store.classes[int(labels[0])]
        hint = (f"; {name!r} looks like a split folder: put the class folders inside {src}/{name} and add "
                f"{src}/test (or val) beside it" if name in ("train", "val", "test") else "")
        raise DataChoiceError(f"{src}: every training image is of one class ({name!r}), so any model is 100% "
                              f"accurate and learns nothing; give the data 2 or more classes{hint}")
    test = next((s for s in ("test", "val") if s in store.splits), None)
    if test is None or len(store[test]) == 0:
        how = _HOW_TO_ADD_A_TEST_SPLIT.get(kind, "prepare it from a source with a test split "
                                                 "(`phalanx data prepare --help` says where each kind keeps one)")
        found = f"its {test!r} split is empty" if test else f"it has only the split(s) {', '.join(store.splits)}"
        raise DataError(f"{src}: no test images to evaluate on ({found}); {how.format(src=src)}")
    if cfg.global_batch > len(train):
        raise ConfigError(f"global_batch={cfg.global_batch} is larger than the {len(train):,d} training images of "
                          f"{src}; use --global_batch {len(train)} or less")
    side = store.shape[0]
    if cfg.augment.crop_pad >= side or cfg.augment.cutout > side:
        key, value = (("augment.crop_pad", cfg.augment.crop_pad) if cfg.augment.crop_pad >= side
                      else ("augment.cutout", cfg.augment.cutout))
        raise ConfigError(f"{key}={value}: too large for the {side}x{side} images of {src}; use at most "
                          f"{side - 1} for crop_pad and {side} for cutout")
    a = cfg.augment
    if a.crop_size > side and not a.rrc:
        raise ConfigError(f"augment.crop_size={a.crop_size}: larger than the {side}x{side} images of {src}, and only "
                          f"RandomResizedCrop enlarges; use at most {side}, or add --augment.rrc true")
    if a.crop_size and a.cutout > a.crop_size:
        raise ConfigError(f"augment.cutout={a.cutout}: larger than the {a.crop_size}x{a.crop_size} crops "
                          f"(augment.crop_size); use at most {a.crop_size}")


def first_estimate(budget: Budget, cfg: C.Config, eval_images: int, global_step: int = 0, log=None) -> int:
    """Steps that fit in the budget at the speed the tuner measured (a synthetic batch: the loop corrects it
    after a few real steps), or at a guess of 1,000 img/s when nothing was measured. A budget already spent
    before training (a few seconds asked of a run whose start-up and final evaluation take longer) is one
    warning line on `log`: the run trains one step and ends late, rather than end without weights."""
    try:
        img_s = float(os.environ.get(TUNED_RATE_ENV, "")) or 1000.0
    except ValueError:
        img_s = 1000.0
    eval_s = eval_seconds_guess(eval_images, cfg.tta_flip, img_s)
    reserve = budget.reserve(eval_s)
    late = budget.late_by(reserve)
    if late > 0 and log is not None:
        log.warning(f"--budget {cfg.budget} is too short for this run: {budget.spent():.1f} s are spent before "
                    f"its first step and the final evaluation and finish need ~{eval_s + budget.FINISH_S:.0f} s "
                    f"more; it trains one step and ends ~{late:.0f} s after the budget")
    return budget.total_steps(global_step, cfg.global_batch / img_s, reserve, cfg.max_steps or None,
                              check_every=budget.every)


def build_state(cfg: C.Config, env: DistEnv, store, normalize: Normalize, total_steps: int | dict,
                steps_per_epoch: int) -> TrainState:
    """Model (same initial weights on every rank), strategy, optimizer, schedule, precision, EMA."""
    h, w, c = store.shape
    torch.manual_seed(cfg.seed)  # same initial weights on every rank (DDP also broadcasts them)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    env.accel.configure_training(cfg.deterministic, cfg.tf32)  # CUDA: cudnn.benchmark, TF32
    side = cfg.augment.crop_size or h  # the model sees crops when augment.crop_size is set
    m = cfg.model
    net = build_model(m.name, len(store.classes), c, side, m.width, m.norm, m.act, m.small_input, m.zero_init_residual)
    if m.pretrained:  # before DDP's broadcast and FSDP's sharding; a resume overwrites it
        from phalanx.models.pretrained import load_pretrained
        load_pretrained(net, m.pretrained, len(store.classes))
    elif cfg.model.whiten and hasattr(net, "whiten_stem"):  # before DDP's broadcast; a resume overwrites it
        train_split = store["train"]
        # shards: the first shard's images (training samples are shuffled across shards), not one of every shard
        sample = (train_split.sample(512) if isinstance(train_split, shards.ShardSplit) else
                  evenly_spaced(train_split, 512 if cfg.data.stream else 2048))
        net.whiten_stem(normalize(sample.to(env.device)))
    strategy = build_strategy(cfg, env)
    model = strategy.wrap(net)
    optimizer = build_optimizer(strategy.plain, cfg.optim, fused=env.accel.fused_optimizers)
    ema = strategy.averaged(cfg.ema) if cfg.ema > 0 else None
    return TrainState(model=model, strategy=strategy, optimizer=optimizer,
                      scheduler=build_scheduler(optimizer, cfg.sched, total_steps, steps_per_epoch),
                      precision=Precision.from_config(cfg.precision, env.accel), ema=ema, accel=env.accel)


def resume(run: Run) -> None:
    """Continue from an explicit --resume, or from a checkpoint already in this run directory."""
    cfg, env, log, state = run.cfg, run.env, run.log, run.state
    # A restarted group resumes from the newest in-memory snapshot every rank can load, when newer than the
    # newest checkpoint on disk (an explicit --resume names a checkpoint: never a snapshot).
    if run.snapshots is not None and not cfg.ckpt.resume and \
            resume_from_snapshot(run, newest_disk_step(run.run_dir / "checkpoints")):
        return
    if cfg.ckpt.resume:
        found = ckpt.find_latest(Path(cfg.ckpt.resume))
        if found is None:  # asked for explicitly: never silently start from scratch
            raise CheckpointError(ckpt.why_no_checkpoint(Path(cfg.ckpt.resume)))
    else:
        skipped: list = []
        found = ckpt.find_latest(run.run_dir, skipped)
        set_aside_newer(run, found, skipped)
        if found is None and skipped:
            log.warning(ckpt.why_no_checkpoint(run.run_dir) + "; starting from scratch")
    if found is None:
        return
    env.phase = f"loading checkpoint {found}"
    got = ckpt.load(found)
    state.load_state_dict(got, found, env.rank)
    st, pos = got["state"], state.position
    if st.get("global_batch") != cfg.global_batch:
        log.warning(f"resuming with global_batch={cfg.global_batch}, checkpoint used {st.get('global_batch')}: "
                    f"the data order will differ from an uninterrupted run")
    log.info(f"resumed from {found} at epoch {pos.epoch + 1}, step {pos.step} (global step {pos.global_step}), "
             f"written by {st.get('world')} ranks, now {env.world}")
    if pos.step >= run.steps_per_epoch:
        state.position = pos = Position(pos.epoch + 1, 0, pos.global_step)
    if run.budget is not None:  # the budget goes on where the checkpoint left it
        run.budget.spent_before = float(st.get("budget_spent_s") or 0.0)
        run.set_total_steps(broadcast_object(first_estimate(run.budget, cfg, len(run.test_data.split),
                                                            pos.global_step, log if env.is_main else None)))
    if pos.global_step >= run.total_steps or pos.epoch >= run.epochs:
        log.info(f"{found} is the end of this run ({pos.global_step} steps): nothing left to train; "
                 f"re-exporting its weights (raise --epochs, or use another --run_dir, to train more)")


def set_aside_newer(run: Run, found: Path | None, skipped: list) -> None:
    """Checkpoints newer than the one resumed from are corrupt: one warning line each, and rank 0 renames
    them to `<name>.corrupt` (kept for inspection; the next save of that step would otherwise replace it).
    Every rank has looked before rank 0 renames anything (first barrier), and waits for it (second)."""
    newer = [(bad, why) for bad, why in skipped if found is None or bad.name > found.name]
    barrier()
    for bad, why in newer:
        kept = ckpt.set_aside(bad).name if run.env.is_main else f"{bad.name}{ckpt.CORRUPT}"
        run.log.warning(f"{why}; resuming from {found.name if found else 'scratch'}, the corrupt checkpoint is "
                        f"kept as {kept}")
    barrier()


def setup(cfg: C.Config, env: DistEnv) -> Run:
    startup = Phases.inherited(command_start())  # the launcher's phases; this rank's follow (train/startup.py)
    startup.mark("launch")
    env.phase = "preparing the run directory"
    run_dir = resolve_run_dir(cfg, env)
    startup.mark("run_dir")
    log = setup_logging(run_dir, env.rank, console=env.is_main)
    hang.arm(env, run_dir / "logs")  # SIGUSR2: stacks into the rank's log; the last collective in rank-K.where
    log.info(f"rank {env.rank}/{env.world} pid {os.getpid()} device {env.device} threads {env.threads} "
             f"backend {env.backend} restart {env.restart}")
    env.phase = "preparing the data"
    store, loader, test_data, normalize, sampler = open_data(cfg, env, run_dir)
    startup.mark("rank_data")
    steps_per_epoch = sampler.steps
    budget = (Budget(C.parse_duration(cfg.budget), command_start(),
                     every=estimate_every(steps_per_epoch, env.accel.host_reads_sync)) if cfg.budget else None)
    total_steps = (steps_per_epoch * cfg.epochs if budget is None else  # rank 0's clock decides for all
                   broadcast_object(first_estimate(budget, cfg, len(test_data.split),
                                                   log=log if env.is_main else None)))
    if cfg.max_steps:
        total_steps = min(total_steps, cfg.max_steps)
    horizon = {"total": total_steps}
    state = build_state(cfg, env, store, normalize, horizon, steps_per_epoch)
    startup.mark("model")
    h, w, c = store.shape
    n_params = sum(p.numel() for p in state.plain.parameters())
    log.info(f"run {run_dir} | model {cfg.model.name} ({n_params / 1e6:.2f} M params) | data {store.path.name} "
             f"{len(store['train'])} train / {len(test_data.split)} test, {h}x{w}x{c} | world {env.world} x "
             f"{env.threads} threads on {env.device} | precision {state.precision.name} | global batch "
             f"{cfg.global_batch} ({steps_per_epoch} steps/epoch)")
    run = Run(cfg, env, run_dir, log, MetricsWriter(run_dir / "metrics.jsonl" if env.is_main else None), store,
              loader, test_data, normalize, state, steps_per_epoch, total_steps, budget=budget, horizon=horizon)
    # Snapshots serve only a group that the elastic agent may restart (`--max-restarts` above 0).
    restarts = os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")
    run.snapshots = Snapshots.for_run(cfg.ckpt.snapshot_every, cfg.ckpt.snapshot_dir, run_dir, env,
                                      state.strategy.sharded, elastic=restarts.isdigit() and int(restarts) > 0)
    resume(run)
    startup.mark("resume")
    if env.is_main:  # only now: a refused resume (another model's run, a corrupt checkpoint) changes no file
        (run_dir / "config.toml").write_text(C.to_toml(cfg))
        run.metrics.sinks = metric_sinks(cfg, run_dir, state.export_model, log)  # TensorBoard, per cfg.log
        startup.mark("sinks")
    run.startup = startup  # the loop marks the first step
    return run

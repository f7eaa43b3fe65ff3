"""Typed run configuration: dataclasses, TOML recipes, command-line overrides, validation.

Every field has a one-line docstring right under it; those docstrings are the `--help` text.
A recipe is a TOML file whose tables mirror the nested dataclasses (`[optim]`, `[data]`...).
Overrides use dotted keys: `--optim.lr=0.1` or `--optim.lr 0.1`. Validation happens here, at the
edge, and fails with one `ConfigError` line; nothing deeper re-checks user input.
"""
from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import keyword
import math
import re
import sys
import textwrap
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from phalanx.errors import ConfigError, first_line

RECIPES_DIR = Path(__file__).resolve().parent / "recipes"
MAX_TIMEOUT_S = 30 * 24 * 3600  # 30 days: any longer is a mistake, and overflows timedelta-based timeouts
PATH_KEYS = ("data.path", "data.cache_dir", "model.pretrained", "ckpt.resume", "run_dir", "out_dir")
"""The fields that name a file or folder: each goes through phalanx.paths.check_path (commands/args.py for the
command line, tools/checks.py for a recipe's values) before anything looks it up."""


@dataclass
class DataConfig:
    path: str = "fashion_mnist"
    """Dataset: `fashion_mnist` (built-in), a prepared store, a folder of idx files, CIFAR binaries or an ImageFolder."""
    cache_dir: str = ""
    """Where prepared stores of raw sources are cached (default: $PHALANX_CACHE or ~/.cache/phalanx)."""
    auto_install: bool = True
    """Install the Debian package dataset-fashion-mnist (or download) when Fashion-MNIST is missing."""
    prefetch: bool = True
    """Prepare the next batch in a background thread while the current one trains."""
    size: int = 0
    """Side an ImageFolder (or CIFAR) is resized and centre-cropped to (0: as `phalanx data prepare` chooses)."""
    channels: int = 0
    """1 (grayscale) or 3 (RGB) for an ImageFolder (0: 1 when every image is gray; 3 when streaming)."""
    stream: bool = False
    """Decode an ImageFolder in DataLoader workers every step instead of preparing a store (needs data.size)."""
    stream_workers: int = 0
    """DataLoader workers per rank when streaming (0: this node's cores divided among its ranks, at least 1)."""
    shard_cache: str = "20GB"
    """Byte budget of each node's local cache of shards (--data URL of `phalanx data shard`'s index): LRU out."""
    shard_buffer: int = 0
    """Samples shuffled together after the shards are shuffled (0: a shard's worth, from the index)."""


@dataclass
class ModelConfig:
    name: str = "phalanx_cnn"
    """A house CNN, any torchvision classification model (resnet50) or timm:NAME with timm (`phalanx models`)."""
    small_input: bool = False
    """For 32x32-class images: a 3x3 stride-1 stem, no max-pool, instead of the ImageNet stem (ResNets and more)."""
    zero_init_residual: bool = False
    """Start each residual block's last norm at zero (torchvision ResNets; timm's zero_init_last, on there)."""
    pretrained: str = ""
    """Local .safetensors weights to start from (a head of another class count is re-initialised; no downloads)."""
    width: int = 32
    """Base channel width of the house CNNs (ignored by fixed-width models)."""
    norm: Literal["batch", "group", "none"] = "batch"
    """Normalisation layers of the house CNNs (group: per-sample statistics, independent of the per-rank batch)."""
    act: Literal["relu", "gelu", "silu"] = "relu"
    """Activation of the house CNNs (relu is the fastest on CPU)."""
    whiten: bool = True
    """Fix the house CNN's stem to whitening filters of the training images' patches (PCA), not learned."""
    channels_last: bool = True
    """Use channels-last memory format (faster convolutions on CPU and tensor cores)."""
    compile: bool = False
    """Wrap the model in torch.compile (pays off on long GPU runs; slow to start on CPU)."""
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = "default"
    """torch.compile's mode with --model.compile (reduce-overhead: CUDA graphs; max-autotune: slower start, faster)."""


@dataclass
class OptimConfig:
    name: Literal["sgd", "adamw", "adadelta"] = "sgd"
    """Optimizer."""
    lr: float = 0.4
    """Peak learning rate for the global batch (not per rank)."""
    momentum: float = 0.9
    """SGD momentum."""
    nesterov: bool = True
    """Nesterov momentum for SGD."""
    weight_decay: float = 5e-4
    """Weight decay (decoupled for AdamW, L2 for SGD; not applied to norms and biases)."""
    label_smoothing: float = 0.1
    """Label smoothing of the cross-entropy loss."""
    grad_clip: float = 0.0
    """Clip the global gradient norm to this value (0: off)."""


@dataclass
class ScheduleConfig:
    name: Literal["onecycle", "cosine", "step", "constant"] = "onecycle"
    """Learning-rate schedule, stepped once per optimizer step."""
    warmup: float = 0.2
    """Fraction of all steps spent warming up (onecycle, cosine)."""
    final_frac: float = 0.02
    """Final learning rate as a fraction of the peak (onecycle, cosine)."""
    gamma: float = 0.7
    """Multiplicative decay per `step_epochs` epochs (step)."""
    step_epochs: int = 1
    """Epochs between decays (step)."""


@dataclass
class AugmentConfig:
    crop_pad: int = 2
    """Random translation by up to this many pixels (random crop of a zero-padded image; 0: off)."""
    flip: bool = True
    """Random horizontal flip."""
    cutout: int = 0
    """Side of a random square zeroed in each image (0: off)."""
    crop_size: int = 0
    """Side of the images the model sees in training and evaluation (0: the store's side, no resizing)."""
    rrc: bool = False
    """RandomResizedCrop to crop_size: boxes of random area and ratio per image (needs crop_size; replaces crop_pad)."""
    rrc_min_scale: float = 0.08
    """Smallest area of a RandomResizedCrop box, as a fraction of the image (torchvision's 0.08)."""
    eval_crop: float = 0.875
    """Evaluation: resize so that the centre crop of this fraction of the side is crop_size, then crop it."""
    trivial_augment: bool = False
    """TrivialAugmentWide-style: one random op (geometric or colour) of random strength per image, on the device."""
    erase: float = 0.0
    """Random erasing: probability that a box (2-33% of the area, fill 0 after normalisation) is erased per image."""
    mixup: float = 0.0
    """Mixup: Beta(alpha, alpha) of the blend of each pair of images (2i, 2i+1) of the global batch (0: off)."""
    cutmix: float = 0.0
    """CutMix: Beta(alpha, alpha) of the kept area of each pair (2i, 2i+1); with mixup, each batch picks one (0: off)."""


@dataclass
class ParallelConfig:
    nproc: str = "auto"
    """Ranks on this node: a number, or `auto` (one per GPU; on CPU the measured-best layout)."""
    nnodes: int = 1
    """Number of nodes taking part in the run."""
    node_rank: int = -1
    """This node's rank (-1: let the c10d rendezvous assign it)."""
    rdzv_endpoint: str = ""
    """host:port of the c10d rendezvous for multi-node runs (empty: a free port on 127.0.0.1)."""
    rdzv_id: str = "phalanx"
    """Rendezvous id shared by all nodes of one run."""
    max_restarts: int = 0
    """Times the elastic agent restarts a failed group (resuming from the latest checkpoint)."""
    start_method: Literal["auto", "fork", "spawn"] = "auto"
    """How `--nproc N` starts ranks: fork (inheriting the imported torch: ~3 s sooner) or spawn; auto: fork on CPU."""
    threads_per_rank: int = 0
    """CPU threads per rank (0: cores of this node divided among its ranks)."""
    keep_cpu_memory: bool = True
    """On CPU, malloc keeps freed tensor memory for the next step instead of returning it to the OS (~8% faster)."""
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    """Process-group backend (auto: NCCL on CUDA, gloo on CPU)."""
    init_timeout_s: float = 300.0
    """Seconds to wait for every rank to join the process group."""
    timeout_s: float = 120.0
    """Seconds a collective may wait for a missing or stalled rank before the run stops."""
    sync_bn: bool = False
    """Convert BatchNorm to SyncBatchNorm (statistics over the global batch)."""
    bucket_mb: float = 25.0
    """DDP gradient bucket size in MiB."""
    static_graph: bool = True
    """Tell DDP the graph is static (lets it skip unused-parameter searches)."""
    strategy: Literal["ddp", "fsdp"] = "ddp"
    """ddp: every rank holds the whole model; fsdp: parameters, gradients and optimizer state sharded (FSDP2)."""
    shard_size: int = 0
    """FSDP: shard within groups of this many ranks and replicate across groups (0: shard over all ranks)."""
    reshard_after_forward: bool = True
    """FSDP: free the gathered parameters after forward and gather again for backward (less memory, more traffic)."""
    invariant: bool = False
    """The same weights, bit for bit, at any world size dividing the micro-batch count (ghost BatchNorm, fixed-order gradient sum, 1 thread per rank)."""
    micro_batch: int = 32
    """With `invariant`: images per micro-batch (its BatchNorm ghost batch); must divide global_batch."""
    grad_compression: Literal["none", "bf16", "powersgd"] = "none"
    """DDP: compress gradients for their all-reduce with PyTorch's comm hooks: bf16 (half the bytes of fp32) or powersgd (rank-r factors per layer, with error feedback)."""
    powersgd_rank: int = 1
    """With `grad_compression powersgd`: the rank r of each layer's approximation ((n+m)*r numbers sent for an n x m layer)."""
    powersgd_start: int = 2
    """With `grad_compression powersgd`: optimizer steps of plain all-reduce before compression starts (>= 2: DDP rebuilds its buckets after step 1)."""


@dataclass
class CheckpointConfig:
    every_steps: int = 0
    """Write a checkpoint every this many optimizer steps (0: off)."""
    every_minutes: float = 0.0
    """Write a checkpoint at least this often in minutes (0: off)."""
    at_epoch_end: bool = True
    """Write a checkpoint at the end of each epoch."""
    keep: int = 2
    """How many checkpoints to keep (oldest are deleted)."""
    resume: str = ""
    """Run directory (or checkpoint directory) to resume from; a run started in a directory with a checkpoint resumes from it."""
    async_: Literal["auto", "true", "false"] = "auto"
    """The step waits only for a copy of the state into host memory and one background thread writes and seals it (auto: on for a replicated model; a sharded one is written synchronously)."""
    snapshot_every: int = 10
    """Keep the training state in each node's shared memory every this many optimizer steps (0: off), in runs the elastic agent may restart (--max-restarts above 0): the restarted group resumes from the newest snapshot instead of the last checkpoint. 10: a snapshot costs about a tenth of a step here, so about 1% (docs/checkpoints.md)."""
    snapshot_dir: str = "/dev/shm"
    """The memory file system on every node where snapshots are kept (two copies of the state per node, four of each rank's shards under FSDP on several nodes)."""


@dataclass
class LogConfig:
    tensorboard: Literal["auto", "true", "false"] = "auto"
    """TensorBoard event files in RUN_DIR/tensorboard from rank 0 (auto: when tensorboard is installed)."""
    profile: int = 0
    """Profile this many optimizer steps with torch.profiler on every rank (0: off): the step split into phases on the console, a timeline and operator table per rank in RUN_DIR/profile."""
    profile_start: int = 10
    """Optimizer steps of this process before the profiled ones (the first steps build kernels and caches)."""


@dataclass
class Config:
    epochs: int = 10
    """Training epochs."""
    global_batch: int = 256
    """Images per optimizer step summed over all ranks (and accumulation micro-steps)."""
    grad_accum: int = 1
    """Micro-steps per optimizer step; gradients are all-reduced only on the last one."""
    eval_batch: int = 1000
    """Evaluation chunk size; chunks, not ranks, fix the arithmetic, so results are world-size independent."""
    eval_every: int = 1
    """Evaluate every this many epochs (the last epoch is always evaluated)."""
    seed: int = 0
    """Seed of the data order, the augmentations and the initial weights."""
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    """Autocast dtype (auto: bf16 where the CPU or GPU has it, else fp32)."""
    ema: float = 0.98
    """Decay of an exponential moving average of the weights, evaluated instead of the raw weights (0: off)."""
    ema_every: int = 1
    """Update the EMA every this many optimizer steps, with decay**ema_every, and at the last step (airbench
    updates its average every 5): a k-th of the update's cost, on a GPU host time in every step. An evaluation
    or checkpoint between two updates sees the average as of the last one (fewer than ema_every steps ago)."""
    tta_flip: bool = True
    """Evaluate on each image and its mirror image and average the logits."""
    deterministic: bool = False
    """Use deterministic algorithms (bit-reproducible runs on CPU)."""
    tf32: bool = True
    """On CUDA, fp32 matmuls and convolutions use TensorFloat-32 tensor cores (false: full fp32)."""
    device: Literal["auto", "cpu", "cuda", "xla"] = "auto"
    """Device to train on (auto: CUDA, else a TPU through PyTorch/XLA, else CPU; xla: one process per host, SPMD)."""
    out_dir: str = "runs"
    """Parent folder of run directories."""
    run_dir: str = ""
    """Run directory (empty: OUT_DIR/<date>-<time>-<model>)."""
    progress: bool = True
    """Show progress on rank 0: a bar on a terminal, else a log line every 30 s (evaluations are logged either way)."""
    max_steps: int = 0
    """Stop after this many optimizer steps in total (0: no limit); used by tests and benchmarks."""
    budget: str = ""
    """Wall-clock budget of the whole command (90s, 5m, 2h): the step count is set from the measured speed (empty: epochs)."""
    tune: bool = True
    """Measure what `auto` leaves open (CPU ranks x threads, bf16 vs fp32, channels-last) here before training, cached."""
    log_samples: bool = False
    """Write the dataset indices each rank trained on to logs/samples-rank-K.jsonl (an audit of the sharding)."""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sched: ScheduleConfig = field(default_factory=ScheduleConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    ckpt: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def default_run_dir(self) -> str:
        """OUT_DIR/<date>-<time>-<model>: the run directory when none is given. Characters other than letters,
        digits, '.', '_' and '-' in the model's name become '-' (`timm:resnet18` -> `timm-resnet18`): TensorBoard's
        `--logdir` reads a colon as NAME:PATH, and Windows refuses it in a folder name."""
        model = re.sub(r"[^A-Za-z0-9._-]", "-", self.model.name)
        return str(Path(self.out_dir) / f"{time.strftime('%Y%m%d-%H%M%S')}-{model}")

    def validate(self) -> "Config":
        """Check every value; raise ConfigError naming the field and how to fix it."""

        def need(ok: bool, key: str, msg: str) -> None:
            if not ok:
                raise ConfigError(f"{key}={get_key(self, key)!r}: {msg}")

        for check in (_check_run, _check_model_and_optim, _check_data, _check_parallel, _check_limits):
            check(self, need)
        return self


UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str) -> float:
    """Seconds of `90s`, `5m`, `1.5h` or a bare number of seconds; ValueError otherwise."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([smh]?)\s*", text or "")
    if not m:
        raise ValueError(f"{text!r} is not a duration like 90s, 5m or 2h")
    seconds = float(m.group(1)) * UNITS[m.group(2) or "s"]
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"{text!r} must be a positive duration")
    return seconds


def _check_run(cfg: Config, need) -> None:
    """Epochs, batches, evaluation, steps, budget, EMA."""
    need(cfg.epochs >= 1, "epochs", "must be >= 1 (to evaluate saved weights: `phalanx eval RUN_DIR`)")
    need(cfg.global_batch >= 1, "global_batch", "must be >= 1")
    need(cfg.grad_accum >= 1, "grad_accum", "must be >= 1")
    need(cfg.global_batch % cfg.grad_accum == 0, "grad_accum", "must divide global_batch")
    need(cfg.eval_batch >= 1, "eval_batch", "must be >= 1")
    need(cfg.eval_every >= 1, "eval_every", "must be >= 1")
    need(cfg.max_steps >= 0, "max_steps", "must be >= 0")
    if cfg.budget:
        try:
            parse_duration(cfg.budget)
        except ValueError as e:
            need(False, "budget", f"{e}")
    need(0.0 <= cfg.ema < 1.0, "ema", "must be in [0, 1)")
    need(cfg.ema_every >= 1, "ema_every", "must be >= 1 (1: update the EMA at every step)")
    need(cfg.log.profile >= 0, "log.profile", "must be >= 0 (the number of steps to profile; 0: off)")
    need(cfg.log.profile_start >= 0, "log.profile_start", "must be >= 0")
    need(not cfg.log.profile or cfg.device != "xla", "log.profile", "torch.profiler sees only the host's tracing "
         "on XLA: profile a TPU with torch_xla.debug.profiler (https://cloud.google.com/tpu/docs/pytorch-xla-"
         "performance-profiling-tpu-vm) and set --log.profile 0")


def _check_model_and_optim(cfg: Config, need) -> None:
    """The model, the optimizer and the schedule (which models exist: tools/checks.py, with the models)."""
    need(not cfg.model.pretrained or _is_file(cfg.model.pretrained), "model.pretrained",
         "no such file (give a local .safetensors file; nothing is downloaded)")
    need(1 <= cfg.model.width <= 1024, "model.width", "must be in 1..1024")
    o = cfg.optim
    # Upper bounds far above any useful value, and below what a float32 optimizer step can hold.
    need(0 < o.lr <= 1000, "optim.lr", "must be a positive number up to 1000, e.g. --optim.lr=0.1")
    need(0.0 <= o.momentum < 1.0, "optim.momentum", "must be in [0, 1)")
    need(0 <= o.weight_decay <= 1000, "optim.weight_decay", "must be in [0, 1000]")
    need(0.0 <= o.label_smoothing < 1.0, "optim.label_smoothing", "must be in [0, 1)")
    need(o.grad_clip >= 0, "optim.grad_clip", "must be >= 0")
    s = cfg.sched
    need(0.0 <= s.warmup < 1.0, "sched.warmup", "must be in [0, 1)")
    need(0.0 <= s.final_frac <= 1.0, "sched.final_frac", "must be in [0, 1]")
    need(0.0 < s.gamma <= 1.0, "sched.gamma", "must be in (0, 1]")
    need(s.step_epochs >= 1, "sched.step_epochs", "must be >= 1")


def _check_data(cfg: Config, need) -> None:
    """The data and its augmentation (the decoder's pixel limit: tools/checks.py)."""
    d = cfg.data
    need(d.size >= 0, "data.size", "must be >= 0 (0: choose from the images)")
    need(d.channels in (0, 1, 3), "data.channels", "must be 1 (grayscale), 3 (RGB) or 0 (choose)")
    need(d.stream_workers >= 0, "data.stream_workers", "must be >= 0 (0: one per core of this rank)")
    need(not d.stream or d.size >= 1, "data.size", "--data.stream needs the image side, e.g. --data.size 64")
    need(d.shard_buffer >= 0, "data.shard_buffer", "must be >= 0 (0: the samples of one shard)")
    a = cfg.augment
    need(a.crop_pad >= 0, "augment.crop_pad", "must be >= 0")
    need(a.cutout >= 0, "augment.cutout", "must be >= 0")
    _check_augment(cfg, need)


def _check_augment(cfg: Config, need) -> None:
    """The augmentations for larger images (what the store's side rules out is checked in train/setup.py)."""
    a = cfg.augment
    need(0 <= a.crop_size <= 8192, "augment.crop_size", "must be in 0..8192 (0: the store's side)")
    need(not a.rrc or a.crop_size > 0, "augment.rrc", "RandomResizedCrop needs the output side: add "
         "--augment.crop_size N (e.g. 224, or the store's side)")
    need(0 < a.rrc_min_scale <= 1, "augment.rrc_min_scale", "must be in (0, 1] (torchvision's default is 0.08)")
    need(0 < a.eval_crop <= 1, "augment.eval_crop", "must be in (0, 1] (0.875: resize to crop_size/0.875, crop)")
    need(0 <= a.erase <= 1, "augment.erase", "is a probability: must be in [0, 1]")
    need(a.mixup >= 0, "augment.mixup", "is the alpha of a Beta distribution: must be >= 0 (0: off; 0.2 or 0.8 "
         "are usual)")
    need(a.cutmix >= 0, "augment.cutmix", "is the alpha of a Beta distribution: must be >= 0 (0: off; 1.0 is usual)")
    need(a.mixup <= 100, "augment.mixup", "must be at most 100")
    need(a.cutmix <= 100, "augment.cutmix", "must be at most 100")


def _check_parallel(cfg: Config, need) -> None:
    """Ranks, threads, nodes, devices, timeouts, sharding; and checkpoints (what this node can run:
    tools/checks.py)."""
    p = cfg.parallel
    if p.invariant:
        _check_invariant(cfg, need)
    # isdecimal, not isdigit: int() refuses digits such as '²'; 19+ digits are out of range (tools/checks.py).
    need(p.nproc == "auto" or (p.nproc.isdecimal() and (len(p.nproc) > 18 or int(p.nproc) >= 1)),
         "parallel.nproc", "must be a positive number or 'auto'")
    need(p.nnodes >= 1, "parallel.nnodes", "must be >= 1")
    need(p.node_rank == -1 or 0 <= p.node_rank < p.nnodes, "parallel.node_rank",
         f"must be from 0 to nnodes - 1 = {p.nnodes - 1} (or -1: the rendezvous assigns it)")
    # XLA: one process per host drives all its devices (SPMD); a pod's hosts each run the same command.
    need(cfg.device != "xla" or p.nproc in ("auto", "1"), "parallel.nproc",
         "--device xla runs one process per host, whose XLA devices share each batch; use --nproc 1 (or auto)")
    need(cfg.device != "xla" or p.nnodes == 1, "parallel.nnodes",
         "--device xla needs no rendezvous: run the same command on every host of the TPU slice")
    need(cfg.device != "xla" or p.strategy == "ddp", "parallel.strategy",
         "--device xla replicates the parameters over its SPMD mesh; use --parallel.strategy ddp")
    need(cfg.device != "cuda" or p.start_method != "fork", "parallel.start_method",
         "CUDA cannot be used in a forked process; use --parallel.start_method spawn (or auto)")
    need(cfg.device != "xla" or not cfg.model.compile, "model.compile",
         "--device xla compiles every step's graph already (PyTorch/XLA); leave --model.compile false")
    need(p.max_restarts >= 0, "parallel.max_restarts", "must be >= 0")
    need(p.threads_per_rank >= 0, "parallel.threads_per_rank", "must be >= 0")
    days30 = f"must be in (0, {MAX_TIMEOUT_S}] seconds (30 days)"
    need(0 < p.init_timeout_s <= MAX_TIMEOUT_S, "parallel.init_timeout_s", days30)
    need(0 < p.timeout_s <= MAX_TIMEOUT_S, "parallel.timeout_s", days30)
    need(0 < p.bucket_mb <= 2 ** 20, "parallel.bucket_mb", "must be in (0, 1048576] MiB")
    need(p.shard_size >= 0, "parallel.shard_size", "must be >= 0 (0: shard over all ranks)")
    need(p.shard_size == 0 or p.strategy == "fsdp", "parallel.shard_size", "needs --parallel.strategy fsdp")
    c = cfg.ckpt
    need(c.every_steps >= 0, "ckpt.every_steps", "must be >= 0")
    need(c.every_minutes >= 0, "ckpt.every_minutes", "must be >= 0")
    need(c.keep >= 1, "ckpt.keep", "must be >= 1")
    need(c.snapshot_every >= 0, "ckpt.snapshot_every", "must be >= 0 (0: no in-memory snapshots)")


def invariant_world_error(global_batch: int, micro_batch: int, world: int) -> str | None:
    """Why `world` ranks cannot share the micro-batches of invariant training equally, or None."""
    count = global_batch // micro_batch
    if count % world == 0:
        return None
    fits = ", ".join(str(w) for w in range(1, count + 1) if count % w == 0)
    return (f"parallel.invariant=True splits global_batch={global_batch} into {count} micro-batches of "
            f"parallel.micro_batch={micro_batch}, which {world} ranks cannot share equally; run on a world size "
            f"dividing {count} ({fits}) or choose a --parallel.micro_batch that makes the count a multiple of {world}")


def _check_invariant(cfg: Config, need) -> None:
    """World-size-invariant training: micro-batches that cut the global batch, and what it cannot combine with."""
    p = cfg.parallel
    need(p.micro_batch >= 1, "parallel.micro_batch", "must be >= 1")
    need(cfg.global_batch % p.micro_batch == 0, "parallel.micro_batch",
         f"must divide global_batch={cfg.global_batch} with --parallel.invariant true (e.g. 32 for 256)")
    need(p.micro_batch % 2 == 0 or not (cfg.augment.mixup > 0 or cfg.augment.cutmix > 0), "parallel.micro_batch",
         "must be even with mixup/CutMix: a micro-batch holds whole pairs (2i, 2i+1) of the global batch")
    need(cfg.grad_accum == 1, "grad_accum", "must be 1 with --parallel.invariant true: --parallel.micro_batch sets "
         "the micro-batches each rank accumulates")
    need(p.shard_size == 0, "parallel.shard_size", "hybrid sharding is not world-size invariant (its all-reduce "
         "across replica groups sums in an order of its own); use --parallel.shard_size 0 with --parallel.invariant "
         "true")
    need(not p.sync_bn, "parallel.sync_bn", "--parallel.invariant true computes BatchNorm per micro-batch (ghost "
         "batches); set --parallel.sync_bn false")
    need(cfg.device != "xla", "device", "--parallel.invariant true runs on cpu or cuda; use --device cpu")
    if p.nproc.isdecimal() and 1 <= len(p.nproc) <= 6 and int(p.nproc) >= 1 and 1 <= p.nnodes <= 1 << 16:  # an explicit world size: check it now
        why = invariant_world_error(cfg.global_batch, p.micro_batch, int(p.nproc) * p.nnodes)
        if why:
            raise ConfigError(why)


def _check_limits(cfg: Config, need) -> None:
    """What every field must be for the libraries that take it (whether TensorBoard is installed:
    tools/checks.py)."""
    for info in fields_of():  # what the checks above leave: values the libraries below cannot hold
        v = get_key(cfg, info.key)
        if isinstance(v, int) and not isinstance(v, bool):
            need(-2 ** 63 <= v < 2 ** 63, info.key, "is out of range (at most 2**63-1)")
        elif isinstance(v, float):
            need(math.isfinite(v), info.key, "must be a finite number")
        elif isinstance(v, str):  # config.toml, read back by `phalanx eval`, holds neither
            bad = next((ch for ch in v if ord(ch) < 32 or ord(ch) == 127 or 0xD800 <= ord(ch) < 0xE000), None)
            need(bad is None, info.key, f"holds the character {bad!r}: control characters and bytes that are "
                                        f"not UTF-8 cannot be kept in the run's config.toml")


# ----------------------------------------------------------------------------- field metadata

@dataclass(frozen=True)
class FieldInfo:
    key: str
    type: Any
    default: Any
    doc: str


@lru_cache(maxsize=None)
def _field_docs(cls: type) -> dict[str, str]:
    """Docstrings written under dataclass fields (read from the class source)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for prev, node in zip(body, body[1:]):
        if (isinstance(prev, ast.AnnAssign) and isinstance(prev.target, ast.Name)
                and isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
                and isinstance(node.value.value, str)):
            docs[prev.target.id] = " ".join(node.value.value.split())
    return docs


@lru_cache(maxsize=None)
def fields_of(cls: type = Config, prefix: str = "") -> tuple[FieldInfo, ...]:
    """Every leaf field of a (nested) config dataclass, with dotted keys."""
    hints = get_type_hints(cls)
    docs = _field_docs(cls)
    out: list[FieldInfo] = []
    default_obj = cls()
    for f in dataclasses.fields(cls):
        t = hints[f.name]
        if dataclasses.is_dataclass(t):
            out.extend(fields_of(t, prefix + f.name + "."))
        else:
            out.append(FieldInfo(prefix + _option(f.name), t, getattr(default_obj, f.name), docs.get(f.name, "")))
    return tuple(out)


def _did_you_mean(word: str, choices) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _attr(part: str) -> str:
    """The dataclass field of an option's part (`async` is the field `async_`)."""
    return part + "_" if keyword.iskeyword(part) else part


def _option(field_name: str) -> str:
    """The option of a dataclass field: a trailing underscore only keeps a Python keyword a valid field name
    (the field `async_` is `--ckpt.async`, and `async = ...` in TOML)."""
    name = field_name.removesuffix("_")
    return name if keyword.iskeyword(name) else field_name


def get_key(cfg: Any, key: str) -> Any:
    obj = cfg
    for part in key.split("."):
        obj = getattr(obj, _attr(part))
    return obj


def _set_key(cfg: Any, key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    obj = cfg
    for part in parents:
        obj = getattr(obj, _attr(part))
    setattr(obj, _attr(leaf), value)


def _coerce_literal(choices: tuple, value: Any, where: str) -> Any:
    """One of a Literal's choices, as given (a TOML boolean as "true"/"false" where those are choices)."""
    if isinstance(value, bool) and str(value).lower() in choices:
        return str(value).lower()
    if value not in choices:
        raise ConfigError(f"{where}: choose one of {', '.join(map(str, choices))}"
                          f"{_did_you_mean(str(value), map(str, choices))}")
    return value


def _coerce_bool(value: Any, where: str) -> bool:
    """A TOML boolean, or a command-line word such as `true`, `0`, `yes` or `off`."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
        return True
    if isinstance(value, str) and value.lower() in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{where}: expected true or false")


def _coerce_int(value: Any, where: str) -> int:
    """An integer (not a boolean), or a string in any base Python's literals allow (`0x10`, `1_000`)."""
    if isinstance(value, bool):
        raise ConfigError(f"{where}: expected an integer")
    if isinstance(value, int):
        return value
    try:
        return int(str(value), 0)
    except ValueError:
        raise ConfigError(f"{where}: expected an integer") from None


def _coerce_float(value: Any, where: str) -> float:
    """A number (not a boolean), or a string float() reads."""
    if isinstance(value, bool):
        raise ConfigError(f"{where}: expected a number")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: expected a number") from None


def _coerce_str(value: Any, where: str) -> str:
    """Any scalar as its string; a TOML table or array is refused."""
    if isinstance(value, (dict, list)):
        raise ConfigError(f"{where}: expected a string")
    return str(value)


# Matched by identity (`t is bool`), in this order, after Literal.
_SCALAR_COERCERS: tuple[tuple[type, Any], ...] = (
    (bool, _coerce_bool), (int, _coerce_int), (float, _coerce_float), (str, _coerce_str))


def _coerce(info: FieldInfo, value: Any, origin: str) -> Any:
    """Convert a TOML value or a command-line string to the field's type."""
    t = info.type
    where = f"{info.key}={value!r} ({origin})"
    if get_origin(t) is Literal:
        return _coerce_literal(get_args(t), value, where)
    for scalar, coerce in _SCALAR_COERCERS:
        if t is scalar:
            return coerce(value, where)
    raise TypeError(f"unsupported config type {t!r}")  # a programming error, not a user's


def _lookup(key: str, origin: str) -> FieldInfo:
    infos = {i.key: i for i in fields_of()}
    if key in infos:
        return infos[key]
    # A bare leaf name is accepted when it is unambiguous: `--lr` means `--optim.lr`.
    leaf = [i for i in infos.values() if i.key.rsplit(".", 1)[-1] == key.replace("-", "_")]
    if len(leaf) == 1:
        return leaf[0]
    norm = key.replace("-", "_")
    if norm in infos:
        return infos[norm]
    raise ConfigError(f"unknown option {key!r} ({origin}){_did_you_mean(key, infos)}; "
                      f"`phalanx train --help` lists every option")


def _flatten_toml(table: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in table.items():
        if isinstance(v, dict):
            out.update(_flatten_toml(v, prefix + k + "."))
        else:
            out[prefix + k] = v
    return out


def _is_file(path: str) -> bool:
    """A file is there; False also where the name cannot be looked up (too long, a link loop: the path checks
    of tools/checks.py and commands/args.py say which)."""
    try:
        return Path(path).expanduser().is_file()
    except OSError:
        return False


def resolve_recipe(name: str) -> Path:
    """A recipe by path, or by name from the packaged recipes."""
    p = Path(name)
    if _is_file(name):
        return p
    for cand in (RECIPES_DIR / name, RECIPES_DIR / f"{name}.toml"):
        if cand.is_file():
            return cand
    known = sorted(q.stem for q in RECIPES_DIR.glob("*.toml"))
    raise ConfigError(f"recipe {name!r} not found{_did_you_mean(name, known)}; "
                      f"give a TOML file path or one of: {', '.join(known)}")


def recipe_keys(path: Path) -> set[str]:
    """The fields a recipe sets (dotted keys), for telling a user's choice from a default."""
    try:
        return {_lookup(k, f"in {path}").key for k in _flatten_toml(tomllib.loads(path.read_text(encoding="utf-8")))}
    except (OSError, ValueError):  # load_recipe has reported it already
        return set()


def canonical_key(key: str) -> str:
    """The dotted field name an override names (`--channels_last` is `model.channels_last`)."""
    return _lookup(key, "on the command line").key


def load_recipe(cfg: Config, path: Path) -> None:
    try:
        table = tomllib.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"recipe {path}: not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start}); "
                          f"save it as UTF-8") from None
    except (OSError, ValueError) as e:  # TOMLDecodeError, and ValueError for an integer of over 4300 digits
        raise ConfigError(f"recipe {path}: {first_line(e)}") from None
    for key, value in _flatten_toml(table).items():
        info = _lookup(key, f"in {path}")
        _set_key(cfg, info.key, _coerce(info, value, f"in {path}"))


def apply_overrides(cfg: Config, pairs: list[tuple[str, str]]) -> None:
    for key, raw in pairs:
        info = _lookup(key, "command line")
        _set_key(cfg, info.key, _coerce(info, raw, "command line"))


def build_config(recipe: str | None, overrides: list[tuple[str, str]]) -> Config:
    """Defaults <- recipe <- command-line overrides, then validation."""
    cfg = Config()
    load_recipe(cfg, resolve_recipe(recipe or "fashion_mnist"))
    apply_overrides(cfg, overrides)
    return cfg.validate()


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def to_toml(cfg: Config) -> str:
    """The resolved config as a TOML recipe (re-usable with --recipe)."""
    def fmt(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        return repr(v)

    top, tables = [], []
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if dataclasses.is_dataclass(v):
            lines = [f"[{f.name}]"] + [f"{_option(g.name)} = {fmt(getattr(v, g.name))}" for g in dataclasses.fields(v)]
            tables.append("\n".join(lines))
        else:
            top.append(f"{f.name} = {fmt(v)}")
    return "\n".join(top) + "\n\n" + "\n\n".join(tables) + "\n"


def help_text() -> str:
    lines = []
    for info in fields_of():
        t = info.type
        tname = "|".join(map(str, get_args(t))) if get_origin(t) is Literal else t.__name__
        lines.append(f"  --{info.key}={tname}  (default: {info.default!r})\n      {info.doc}")
    return "\n".join(lines)

"""`phalanx ray train`: a training run whose ranks are Ray Train workers (runtime/ray.py).

This process is the launcher, as `phalanx train` is: it checks the options, the data and the run directory,
locks the run directory and prepares the store, then hands the ranks to Ray (one TorchTrainer worker per rank).
Ray restarts a failed worker group (--max_failures); the new group resumes from the run directory.
"""
from __future__ import annotations

import os

from phalanx import config as C
from phalanx.commands import rank
from phalanx.commands.args import Command, Option, Parsed, Spec, parse, run_group
from phalanx.commands.train import COMMANDS as TRAIN
from phalanx.data.mix import world_error
from phalanx.data.sources import open_on_node
from phalanx.errors import ConfigError
from phalanx.paths import locked_run_dir
from phalanx.runtime import ray as on_ray
from phalanx.train.budget import TUNED_RATE_ENV, command_start
from phalanx.train.setup import check_data, run_dir_for

OPTIONS = (
    Option("workers", "ranks in all: one Ray Train worker each", int, 2, minimum=1),
    Option("gpus_per_worker", "GPUs per worker: 0 (CPU ranks) or 1 (one GPU per rank)", int, 0, choices=(0, 1)),
    Option("cpus_per_worker", "CPUs Ray reserves for each worker", int, 1, minimum=1),
    Option("address", "the Ray cluster: auto, HOST:PORT or ray://HOST:PORT (default: RAY_ADDRESS, else a local "
           "cluster started and stopped here)", str, ""),
    Option("max_failures", "failures of the worker group Ray recovers from (each new group resumes from the run "
           "directory's last checkpoint)", int, 3, minimum=0),
)
ABOUT = ("Train with every rank a Ray Train worker (TorchTrainer): the options after `--` are those of `phalanx "
         "train`; Ray places the workers and restarts a failed group, which resumes from the run directory.")
EPILOG = """examples:
  phalanx ray train --workers 2 -- --data fashion_mnist --epochs 2
  phalanx ray train --address auto --workers 8 --gpus_per_worker 1 -- --recipe cifar10_resnet --run_dir /shared/runs/c10

Every worker must see the run directory at the same path (shared storage on a cluster of several machines)."""

TAKEN_BY_RAY = {"parallel.nproc": "--workers", "parallel.nnodes": "--workers", "parallel.node_rank": "--workers",
                "parallel.rdzv_endpoint": "--address", "parallel.rdzv_id": "--address",
                "parallel.max_restarts": "--max_failures"}
"""Options of `phalanx train` that Ray decides here, and the option of `phalanx ray train` that says it."""


def train_options(p: Parsed) -> Parsed:
    """The `phalanx train` options after `--`, parsed as `phalanx train` parses them; one line for those Ray
    decides (the ranks and their rendezvous)."""
    own = parse("train", TRAIN["train"].spec, p.extra)
    for key in (C.canonical_key(k) for k, _ in own.pairs):
        if key in TAKEN_BY_RAY:
            raise ConfigError(f"--{key} after `--`: Ray starts the ranks here; give {TAKEN_BY_RAY[key]} to "
                              f"`phalanx ray train`, before `--`")
    return own


def layout_of(p: Parsed, cfg: C.Config) -> on_ray.RayLayout:
    v = p.values
    return on_ray.RayLayout(workers=v.workers, gpus_per_worker=v.gpus_per_worker, cpus_per_worker=v.cpus_per_worker,
                            address=v.address, max_failures=v.max_failures,
                            join_timeout_s=max(cfg.parallel.init_timeout_s, cfg.parallel.timeout_s))


def train(p: Parsed) -> int:
    """Check, prepare and launch one training on Ray; its exit code."""
    own = train_options(p)
    on_ray.import_ray()  # without Ray: its one line, before anything is written
    command_start(new=True)  # --budget counts from here; the workers inherit it (runtime/ray.worker_env)
    os.environ.pop(TUNED_RATE_ENV, None)
    cfg = rank.train_config(own)  # ConfigError / DataError: one line before anything is written
    if why := world_error(cfg, p.values.workers):
        raise ConfigError(why)
    argv = list(own.argv)
    run_dir = run_dir_for(cfg).absolute()
    if not cfg.run_dir:  # every worker, and every restarted group, trains in this one folder
        argv.append(f"--run_dir={run_dir}")
    where = "--run_dir" if "run_dir" in own.explicit_keys() else "--resume" if cfg.ckpt.resume else "--out_dir"
    with locked_run_dir(run_dir, where):
        if not cfg.data.stream:  # prepared once here (the workers of this machine then map it); checked here
            store = open_on_node(cfg.data.path, cfg.data.cache_dir, cfg.data.auto_install, 0, cfg.data.size,
                                 cfg.data.channels)
            check_data(cfg, store)
        # No layout tuning: Ray fixes the ranks, and the machine timed here need not be the workers' own.
        print(f"phalanx: {p.values.workers} rank(s) on Ray Train workers; run directory {run_dir}", flush=True)
        return on_ray.launch(rank.main, ["train", *argv], layout_of(p, cfg), run_dir)


SUBCOMMANDS = {
    "train": Command(Spec(
        "phalanx ray train [--workers N] [--gpus_per_worker 0|1] [--address A] -- [phalanx train options]", ABOUT,
        OPTIONS, passthrough=True, epilog=EPILOG), train),
}


def ray(argv: list[str]) -> int:
    return run_group("ray", "Run on a Ray cluster: the ranks of a training run as Ray Train workers.", SUBCOMMANDS,
                     argv)


COMMANDS = {"ray": ray}

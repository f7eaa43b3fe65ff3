"""`phalanx train` and `phalanx tune`, in the launching process: this runs once per command (per node).

    build and check the config -> check the run directory and the data -> prepare the store (once, here)
    -> tune what `auto` leaves open (measured, or cached) -> one rank in this process, or N ranks through
    PyTorch's elastic agent (runtime/launch.py), each running commands/rank.py
"""
from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

from phalanx import config as C
from phalanx.commands import rank
from phalanx.commands.args import Command, Parsed, Spec
from phalanx.data.mix import world_error, world_fits
from phalanx.data.sources import cache_dir, open_on_node
from phalanx.errors import ConfigError
from phalanx.paths import launcher_run_dir, locked_run_dir
from phalanx.runtime import dist as penv
from phalanx.runtime import slurm
from phalanx.runtime.launch import check_layout, launch, resolve_nproc
from phalanx.tools import tune
from phalanx.tools.checks import checked_config
from phalanx.train.budget import TUNED_RATE_ENV, command_start
from phalanx.train.checkpoint import find_latest
from phalanx.train.rate_check import TUNED_ENV
from phalanx.train.setup import check_data, run_dir_for
from phalanx.train.snapshot import remove_held_by_launcher
from phalanx.train.startup import STARTUP_ENV, Phases

TRAIN_ABOUT = """Train a classifier. Values come from the defaults, then the recipe (default: fashion_mnist),
then the command line. A leaf name alone works when unambiguous (--lr means --optim.lr).
Shortcuts: --data X (= --data.path X), --nproc N, --resume RUN_DIR, --nnodes, --node-rank,
--rdzv-endpoint HOST:PORT, --max-restarts K.

Launch modes (the same flags work under `torchrun ... -m phalanx train`):
  phalanx train                                one process
  phalanx train --nproc 4                      4 ranks on this node (elastic launcher, gloo or NCCL)
  phalanx train --nproc auto                   one rank per GPU, or the best CPU layout
  phalanx train --nproc 8 --nnodes 2 --node-rank 0 --rdzv-endpoint HOST0:29400   on each node

options:
  --recipe NAME|FILE  TOML recipe ({recipes})
  -h, --help          show this help
{fields}"""


class ConfigSpec(Spec):
    """A command whose options are the training config's fields: its help lists them."""

    def help(self) -> str:
        recipes = ", ".join(sorted(p.stem for p in C.RECIPES_DIR.glob("*.toml")))
        return f"usage: {self.usage}\n\n" + self.about.format(recipes=recipes, fields=C.help_text())


def train(p: Parsed) -> int:
    """Check, prepare, tune and launch one training; its exit code."""
    startup = Phases(command_start(new=True))  # --budget counts from here; the ranks this process starts inherit it
    startup.mark("imports")  # the interpreter, torch and Phalanx, from the process's start (train/startup.py)
    os.environ.pop(TUNED_RATE_ENV, None)  # set again below only by this command's own tuning
    os.environ.pop(TUNED_ENV, None)
    os.environ.pop(STARTUP_ENV, None)
    cfg = rank.train_config(p)  # ConfigError / DataError: one line before anything is written
    startup.mark("config")
    argv = list(p.argv)
    alloc = slurm.detect()
    if alloc is not None:
        slurm.catch_warning()  # USR1 before the ranks run must not end this process (Python's default)
    if alloc is not None and join_slurm(cfg, alloc, p.explicit_keys(), argv) == "rank":
        # SLURM started this task as one rank of the job (srun -n N): it runs as under a user's torchrun.
        if cfg.run_dir:
            slurm.mark_run_dir(Path(cfg.run_dir))
        code = rank.main(["train", *argv])
        return requeue_unless_finished(alloc, Path(cfg.run_dir) if cfg.run_dir else None, code)
    refuse_impossible_layout(cfg)
    # One run directory for all ranks and all elastic restarts (restarted groups resume from it), locked from
    # here: a second `phalanx train` in it is refused before it prepares, tunes or writes anything.
    run_dir = run_dir_for(cfg)
    if not cfg.run_dir:  # ranks in other processes are told by their argv; one rank here, through LOCK_ENV
        argv.append(f"--run_dir={run_dir}")
    where = "--run_dir" if "run_dir" in p.explicit_keys() else "--resume" if cfg.ckpt.resume else "--out_dir"
    # Several nodes sharing the folder have no one launcher to hold the lock (their rank 0 may be anywhere).
    with locked_run_dir(run_dir, where, hold=cfg.parallel.nnodes == 1):
        try:
            code = _prepare_and_launch(cfg, p, argv, startup)
        finally:  # the ranks' check of the tuner's decision (train/rate_check.py) into the cache, however they ended
            if os.environ.get(TUNED_ENV):
                tune.follow_up(cache_dir(cfg.data.cache_dir) / "tune.json", run_dir)
    return requeue_unless_finished(alloc, run_dir, code) if alloc is not None else code


def join_slurm(cfg: C.Config, alloc: slurm.Allocation, explicit: set[str], argv: list[str]) -> str:
    """Inside a SLURM allocation: 'node' (this task is its node's launcher; the nodes, this node's rank and the
    rendezvous come from SLURM unless given, and are handed on to the ranks in `argv`) or 'rank' (this task is
    one rank; the torchrun variables are set from SLURM's). One ConfigError line for an allocation of neither."""
    layout = slurm.check_layout(alloc, cfg.parallel.nproc)
    if layout == "rank":
        os.environ.update(slurm.rank_environment(alloc))
        return layout
    pc = cfg.parallel
    if len(alloc.nodes) > 1 and not explicit & {"parallel.nnodes", "parallel.rdzv_endpoint", "parallel.node_rank"}:
        pc.nnodes, pc.node_rank, pc.rdzv_endpoint, pc.rdzv_id = (len(alloc.nodes), alloc.node_id, alloc.endpoint,
                                                                 alloc.rdzv_id)
        argv += [f"--parallel.nnodes={pc.nnodes}", f"--parallel.node_rank={pc.node_rank}",
                 f"--parallel.rdzv_endpoint={pc.rdzv_endpoint}", f"--parallel.rdzv_id={pc.rdzv_id}"]
    return layout


def requeue_unless_finished(alloc: slurm.Allocation, run_dir: Path | None, code: int) -> int:
    """After a run stopped for a signal (SLURM's USR1 before the time limit, a preemption) with its checkpoint
    written: the job is requeued, by its first task, so that it comes back and resumes. A finished run (its
    final weights are written) or a failed one is not."""
    unfinished = run_dir is not None and not (run_dir / "model.safetensors").exists()
    # Stopped with its checkpoint written, or warned before it wrote one (it starts again from the beginning).
    stopped_early = unfinished and ((code == 0 and find_latest(run_dir) is not None) or slurm.warned())
    if stopped_early and alloc.proc_id == 0:
        # The requeue ends this job at once, with a SIGTERM to its steps, and this process has only its exit left:
        # that SIGTERM must not become a traceback from a handler of the elastic agent's.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print(slurm.requeue(alloc), flush=True)
    return code


def _prepare_and_launch(cfg: C.Config, p: Parsed, argv: list[str], startup: Phases | None = None) -> int:
    """Prepare the store and tune (both once, here), then start the ranks (handing them `startup`'s phases)."""
    from phalanx.data.shards import is_shards  # deferred: only a training launcher needs it
    if not cfg.data.stream and not is_shards(cfg.data.path):
        # Prepared here, once, before any rank starts (ranks then map it): data a run cannot use (one
        # class, no test split, fewer images than the global batch) is one line, not one per rank.
        store = open_on_node(cfg.data.path, cfg.data.cache_dir, cfg.data.auto_install, 0, cfg.data.size,
                             cfg.data.channels)
        check_data(cfg, store)
        if startup is not None:
            startup.mark("data")
        if cfg.tune:  # what `auto` leaves open, measured here (or cached) and handed to every rank
            # `--tune true` on the command line: measured now, whatever the cache holds
            argv += tune.tune_run(cfg, p.explicit_keys(), model_input_shape(cfg, store.shape), len(store.classes),
                                  cache_dir(cfg.data.cache_dir) / "tune.json",
                                  refresh="tune" in {C.canonical_key(k) for k, _ in p.pairs})
            if startup is not None:
                startup.mark("tune")
    if startup is not None:
        startup.hand_over()
    if slurm.warned():  # SLURM's USR1 came while preparing: no rank starts; train() requeues the job
        print("phalanx: SLURM's warning (USR1) came before the ranks started; none was started", flush=True)
        return 0
    return run_ranks("train", cfg, argv)


def refuse_impossible_layout(cfg: C.Config) -> None:
    """An explicit --nproc this node cannot run (more ranks than GPUs under NCCL, `fork` with CUDA): one line
    before any data is prepared or any layout timed, not minutes later. launch() checks again, `auto` included."""
    if cfg.parallel.nproc == "auto" or (int(cfg.parallel.nproc) == 1 and cfg.parallel.nnodes == 1):
        return
    check_layout(cfg.parallel, int(cfg.parallel.nproc), cfg.device)


def model_input_shape(cfg: C.Config, shape: tuple[int, int, int]) -> tuple[int, int, int]:
    """(h, w, c) of what the model sees: the augment.crop_size crop of the stored images when set."""
    side = cfg.augment.crop_size
    return (side, side, shape[2]) if side else tuple(shape)


def run_ranks(sub: str, cfg: C.Config, argv: list[str], target: Path | None = None) -> int:
    """`sub` ("train" or "eval") on this node's ranks: in this process for one rank, else through the elastic
    launcher, each rank running commands/rank.py with `argv` (the command's own arguments)."""
    fits = world_fits(cfg) if sub == "train" else None
    nproc, why = resolve_nproc(cfg.parallel, cfg.device, cfg.global_batch // cfg.grad_accum, fits)
    # Here, once, rather than from every rank (each would print it inside the elastic agent's report).
    if fits is not None and (why_not := world_error(cfg, nproc * cfg.parallel.nnodes)):
        raise ConfigError(why_not)
    if nproc == 1 and cfg.parallel.nnodes == 1:
        return rank.run(sub, cfg, target)
    threads = penv.threads_per_rank(cfg.parallel, nproc)
    print(f"phalanx: launching {nproc} rank(s) x {threads} thread(s) per node on {cfg.parallel.nnodes} node(s) "
          f"({why})", flush=True)
    rank_argv = [sub] + list(argv)  # eval's argv holds its TARGET; train's its --run_dir (train() adds it)
    run_dir = launcher_run_dir() if sub == "train" else Path(cfg.run_dir) if cfg.run_dir else None
    try:
        return launch(cfg.parallel, nproc, threads, rank.main, rank_argv, run_dir, cfg.device,
                      on_stop=lambda sig: stopped(sig, run_dir))
    finally:  # the ranks are gone for good: the in-memory snapshots this node's agent kept go with them
        if sub == "train" and run_dir is not None and cfg.ckpt.snapshot_every:
            remove_held_by_launcher(run_dir, cfg.ckpt.snapshot_dir)


def stopped(sig: signal.Signals, run_dir: Path | None) -> int:
    """The agent passed a stop signal on and every rank finished its step: say whether a checkpoint was
    written; exit 0 when one was (a scheduler then reruns the same command to resume)."""
    slurm.note_stop(sig.name)  # inside a SLURM job, the job is requeued even before its first checkpoint
    saved = run_dir is not None and find_latest(run_dir) is not None
    where = run_dir or "RUN_DIR"
    print(f"phalanx: stopped by {sig.name}; "
          + (f"checkpoint written, resume with `phalanx train --resume {where}`" if saved else
             f"no checkpoint was written in {where}"), file=sys.stderr, flush=True)
    return 0 if saved else 128 + int(sig)


def tune_command(p: Parsed) -> int:
    """Measure the candidates of the `auto` fields for the training these options describe, afresh, and
    print them as a table; the decision is cached for the next `phalanx train` with the same options."""
    cfg = checked_config(p.recipe, p.pairs)
    store = open_on_node(cfg.data.path, cfg.data.cache_dir, cfg.data.auto_install, 0, cfg.data.size,
                         cfg.data.channels)
    q = tune.question_for(cfg, p.explicit_keys(), model_input_shape(cfg, store.shape), len(store.classes))
    if q is None or not q.open:
        print("phalanx tune: nothing to measure: these options leave no choice to `auto` on this machine")
        return 0
    device = tune.device_of(q)
    choice, record = tune.decide(q, cache_dir(cfg.data.cache_dir) / "tune.json",
                                 lambda c: tune.measure_choice(c, q, device=device), refresh=True)
    print(tune.table(record))
    print(f"phalanx: {tune.summary_line(choice, record)}")
    return 0


COMMANDS = {
    "train": Command(ConfigSpec("phalanx train [--recipe NAME|FILE] [--KEY=VALUE | --KEY VALUE]...", TRAIN_ABOUT,
                                config=True), train),
    "tune": Command(Spec("phalanx tune [--recipe R] [--KEY=VALUE]...",
                         "Measure what `phalanx train` with these options would choose where they say auto (--nproc: "
                         "ranks x threads on CPU; --precision: bf16 vs fp32 where bf16 is native; channels-last unless "
                         "--model.channels_last is given), print the table, and cache the decision for the next run.",
                         config=True), tune_command),
}

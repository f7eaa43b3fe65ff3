"""`phalanx` command line: one module per command group; each parses its arguments with commands/args.py.

    phalanx train [--recipe R] [--KEY=VALUE ...]      train (in-process, or N ranks via the elastic launcher)
    phalanx eval RUN_DIR|WEIGHTS [--KEY=VALUE ...]    evaluate saved weights on a test split
    phalanx predict RUN_DIR|WEIGHTS IMAGE|FOLDER...   classify image files: top-k table, CSV or JSON
    phalanx export RUN_DIR --format torchscript|onnx|safetensors   a deployable model, checked
    phalanx data prepare|info|verify ...              build, inspect and check a prepared store
    phalanx models [PATTERN]                          house, torchvision and timm models (matching PATTERN)
    phalanx bench scaling|flops|step|loader|all       throughput benchmarks
    phalanx doctor [--json] [--backend gloo|nccl]     check this machine before a long run
    phalanx report RUN_DIR [RUN_DIR ...] [--out DIR]  plots and one HTML page of runs (several: compared)
    phalanx tune [--KEY=VALUE ...]                    measure what `auto` chooses for this training, print the table
    phalanx slurm script|submit ... -- [train options]  an sbatch script for a run, printed or submitted
    phalanx ray train [--workers N] ... -- [train options]  the ranks of a run as Ray Train workers
    phalanx k8s manifest [--replicas N] ... -- [train options]  Kubernetes manifests (PyTorchJob, Indexed Job)

Two processes run these modules: the launcher (the command the user typed: commands/train.py validates,
prepares, tunes and launches) and each rank it starts (commands/rank.py). A user's own
`torchrun ... -m phalanx train` makes every process a rank: `main` hands those to the rank entry.
"""
from __future__ import annotations

import importlib
import os
import sys
import time

from phalanx.commands.args import did_you_mean, run_command
from phalanx.commands.outcome import run_entry, run_reporting_errors
from phalanx.errors import ConfigError

_LOADED_AT = time.time()  # before torch is imported: where a `--budget` starts without /proc (budget.mark_entry)

USAGE = __doc__.split("\n\n", 2)[1]

COMMANDS = {"train": "train", "tune": "train", "eval": "evaluate", "predict": "evaluate", "data": "data",
            "models": "models", "bench": "bench", "export": "export", "doctor": "doctor", "report": "report",
            "slurm": "slurm", "ray": "ray", "k8s": "k8s"}
"""Command name -> the module of phalanx.commands that runs it (its `COMMANDS[name]`): imported when used, so
that a command pays for its own imports only (the tools' matplotlib, onnx, torchvision's model zoo...)."""


def main(argv: list[str] | None = None) -> int:
    """Run one `phalanx` command; its exit code (2: a usage error, printed as one line)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: phalanx COMMAND [options]   (phalanx COMMAND --help for each)\n\n" + USAGE)
        return 0 if argv else 2
    if argv[0] in ("train", "eval") and _started_by_torchrun():
        from phalanx.commands import rank  # a rank needs none of the other commands
        return rank.main(argv)
    return run_reporting_errors(lambda: _dispatch(argv))


def _started_by_torchrun() -> bool:
    """This process is a rank of a user's own `torchrun ... -m phalanx train|eval` (the elastic agent sets
    these); the ranks `phalanx train --nproc N` starts run commands/rank.py directly."""
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def _dispatch(argv: list[str]) -> int:
    module = COMMANDS.get(argv[0])
    if module is None:
        raise ConfigError(f"unknown command {argv[0]!r}{did_you_mean(argv[0], list(COMMANDS))}; "
                          f"commands: {', '.join(COMMANDS)}")
    if argv[0] in ("train", "eval"):
        # One process whose environment holds a launcher's variables (a manual env:// launch, or values a shell
        # or a wrapper left): values no launcher sets are one line now, not a traceback after the data is ready.
        from phalanx.runtime.dist import launch_vars
        launch_vars(os.environ)
    command = importlib.import_module(f"phalanx.commands.{module}").COMMANDS[argv[0]]
    if callable(command):  # a command group (data, bench): it parses its own sub-command
        return command(argv[1:])
    return run_command(argv[0], command, argv[1:])


def entry() -> None:
    """`phalanx` and `python -m phalanx`."""
    run_entry(main, _LOADED_AT)

"""`phalanx slurm script|submit`: an sbatch script for a training run, printed or submitted.

The script runs one Phalanx launcher per node (`srun --ntasks-per-node=1`), which reads its place in the job
from SLURM (runtime/slurm.py) and starts `--nproc` ranks there. `--requeue` and `--signal=B:USR1@N` make the
time limit and a preemption cost a checkpoint, not the run: on USR1 the ranks checkpoint, Phalanx requeues the
job (`scontrol requeue`) unless the run has finished, and the job, run again, resumes from the same run
directory with no extra flags.
"""
from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from phalanx import config as C
from phalanx.commands.args import Command, Option, Parsed, Spec, parse, run_group
from phalanx.commands.train import COMMANDS as TRAIN
from phalanx.errors import ConfigError
from phalanx.paths import RUN_MARKER, check_destination, check_run_dir_is_ours

SBATCH_TIMEOUT_S = 60.0

OPTIONS = (
    Option("run_dir", "the run directory (required: the job and every requeue of it train there)", Path, None,
           metavar="DIR"),
    Option("nodes", "nodes", int, 1, minimum=1),
    Option("nproc", "ranks per node, handed to `phalanx train --nproc`", str, "auto"),
    Option("gpus_per_node", "GPUs per node (0: none asked for)", int, 0, minimum=0),
    Option("cpus_per_node", "CPUs per node (0: SLURM's default)", int, 0, minimum=0),
    Option("time", "time limit, as sbatch takes it (e.g. 4:00:00, 2-00:00:00; empty: the partition's)", str, ""),
    Option("partition", "partition (empty: the cluster's default)", str, ""),
    Option("account", "account to charge (empty: yours by default)", str, ""),
    Option("signal_s", "seconds before the time limit that SLURM sends USR1 (checkpoint, requeue)", int, 120,
           minimum=1),
    Option("job_name", "job name", str, "phalanx"),
)
ABOUT = ("the sbatch script of `phalanx train` with the options after `--`: one Phalanx launcher per node, "
         "--requeue, USR1 before the time limit (checkpoint, requeue, resume), SLURM's output in RUN_DIR/logs.")
EPILOG = """example:
  phalanx slurm script --run_dir runs/r50 --nodes 2 --gpus_per_node 8 --time 12:00:00 -- --recipe imagefolder_224 --data /data/imagenet
  phalanx slurm submit --run_dir runs/r50 --nodes 2 --gpus_per_node 8 --time 12:00:00 -- --recipe imagefolder_224"""

_SAFE = re.compile(r"[\w.:@%+=,/-]*")


def _sbatch_value(name: str, value: str) -> str:
    """A value for an #SBATCH line: no spaces or shell characters (sbatch reads these lines itself)."""
    if not _SAFE.fullmatch(value):
        raise ConfigError(f"--{name} {value!r}: letters, digits and . : @ % + = , / - only (it goes into an "
                          f"#SBATCH line)")
    return value


def script(p: Parsed, run_dir: Path) -> str:
    """The sbatch script for the run `p` describes."""
    v = p.values
    train = [sys.executable, "-m", "phalanx", "train", "--run_dir", str(run_dir), "--nproc", v.nproc, *p.extra]
    lines = ["#!/bin/bash",
             f"# Written by `phalanx slurm script` on {time.strftime('%Y-%m-%d %H:%M')}. Submit it with `sbatch` "
             f"(or use `phalanx slurm submit`).",
             f"#SBATCH --job-name={_sbatch_value('job_name', v.job_name)}",
             f"#SBATCH --nodes={v.nodes}",
             "#SBATCH --ntasks-per-node=1"]
    if v.cpus_per_node:
        lines.append(f"#SBATCH --cpus-per-task={v.cpus_per_node}")
    if v.gpus_per_node:
        lines.append(f"#SBATCH --gpus-per-node={v.gpus_per_node}")
    for name in ("time", "partition", "account"):
        if getattr(v, name):
            lines.append(f"#SBATCH --{name}={_sbatch_value(name, getattr(v, name))}")
    lines += ["#SBATCH --requeue",
              f"#SBATCH --signal=B:USR1@{v.signal_s}",
              "#SBATCH --open-mode=append",
              f"#SBATCH --output={_sbatch_value('run_dir', str(run_dir))}/logs/slurm-%j.out",
              "",
              "# USR1 (the time limit is near, or a preemption) reaches this shell (B:); it is passed to srun, which",
              "# passes it to Phalanx: the ranks checkpoint, Phalanx requeues this job unless the run has finished,",
              "# and the job, when it runs again, resumes from the run directory.",
              "trap 'kill -USR1 \"$PID\" 2>/dev/null' USR1",
              "srun --ntasks-per-node=1 --kill-on-bad-exit=1 " + shlex.join(train) + " &",
              "PID=$!",
              "wait \"$PID\"; STATUS=$?",
              "while kill -0 \"$PID\" 2>/dev/null; do wait \"$PID\"; STATUS=$?; done  # a trap ends `wait` early",
              "exit \"$STATUS\"", ""]
    return "\n".join(lines)


def _run_dir(p: Parsed) -> Path:
    """The run directory, after the training options after `--` were checked as `phalanx train` checks them
    before it writes anything: a typo is one line here, not a failed job in the queue."""
    if p.values.run_dir is None:
        raise ConfigError("--run_dir is required: the job, and every requeue of it, trains in that one folder "
                          "(e.g. --run_dir runs/my-run)")
    own = parse("train", TRAIN["train"].spec, p.extra)
    if own.positional:
        raise ConfigError(f"unexpected argument {own.positional[0]!r} after `--`: the options of `phalanx train` "
                          f"go there (--KEY VALUE)")
    given = {C.canonical_key(k) for k, _ in own.pairs}
    if given & {"run_dir", "parallel.nproc"}:
        raise ConfigError("give --run_dir and --nproc to `phalanx slurm`, before `--`, not to the training after it")
    C.build_config(own.recipe, own.pairs)
    return Path(p.values.run_dir).expanduser().absolute()


def print_script(p: Parsed) -> int:
    print(script(p, _run_dir(p)), end="")
    return 0


def submit(p: Parsed) -> int:
    """Write the script into the run directory (made and marked as a run's, as `phalanx train` would) and
    submit it; prints the job id and the run directory."""
    run_dir = _run_dir(p)
    check_destination(run_dir, "--run_dir", folder=True)
    check_run_dir_is_ours(run_dir, "--run_dir", "choose another --run_dir (a new or empty folder, or a run to resume)")
    if not shutil.which("sbatch"):
        raise ConfigError("sbatch is not on PATH: run `phalanx slurm submit` on a SLURM login node, or print the "
                          "script with `phalanx slurm script` and submit it there")
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)  # SLURM opens its output file before the job starts
    if not (run_dir / RUN_MARKER).exists():
        (run_dir / RUN_MARKER).write_text(json.dumps({"made_by": "phalanx slurm submit",
                                                      "created": time.strftime("%Y-%m-%dT%H:%M:%S")}) + "\n")
    path = run_dir / "slurm-job.sh"
    path.write_text(script(p, run_dir))
    try:
        out = subprocess.run(["sbatch", "--parsable", str(path)], capture_output=True, text=True,
                             timeout=SBATCH_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise ConfigError(f"sbatch did not answer within {SBATCH_TIMEOUT_S:.0f} s: is slurmctld up "
                          f"(`scontrol ping`)?") from None
    if out.returncode != 0:
        why = (out.stderr or out.stdout).strip().splitlines()[-1:] or [f"exit code {out.returncode}"]
        raise ConfigError(f"sbatch refused {path}: {why[0]}")
    job = out.stdout.strip().split(";")[0]
    print(f"submitted job {job}; run directory {run_dir} (its SLURM output: {run_dir}/logs/slurm-{job}.out)")
    return 0


SUBCOMMANDS = {
    "script": Command(Spec("phalanx slurm script --run_dir DIR [options] -- [phalanx train options]",
                           "Print " + ABOUT, OPTIONS, passthrough=True, epilog=EPILOG), print_script),
    "submit": Command(Spec("phalanx slurm submit --run_dir DIR [options] -- [phalanx train options]",
                           "Write into RUN_DIR and submit " + ABOUT, OPTIONS, passthrough=True, epilog=EPILOG),
                      submit),
}


def slurm(argv: list[str]) -> int:
    return run_group("slurm", "Run on a SLURM cluster: an sbatch script for a training run, printed or submitted.",
                     SUBCOMMANDS, argv)


COMMANDS = {"slurm": slurm}

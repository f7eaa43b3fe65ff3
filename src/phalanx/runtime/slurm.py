"""SLURM: where this process stands in an allocation, read from SLURM's environment, and the requeue.

Inside `sbatch`/`srun`, `phalanx train` needs no rendezvous flags. Two layouts are understood:

    one task per node   (srun --ntasks-per-node=1)   each task is this node's launcher: the nodes, this
                        node's rank and the c10d endpoint (the first node, a port derived from the job id)
                        come from SLURM, and the elastic agent starts --nproc ranks here, as on any node
    one task per rank   (srun -n N, tasks spread evenly)  each task is one rank (SLURM_PROCID, SLURM_LOCALID),
                        started by SLURM itself: no agent, the torchrun variables set from SLURM's

Any other allocation is refused in one line. Every SLURM_* variable Phalanx reads is read here (as
Lightning's SLURMEnvironment does), so that a newcomer finds in one file what a job's environment means.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass

from phalanx.errors import ConfigError
from phalanx.paths import RUN_MARKER

PORT_BASE, PORT_SPAN = 20000, 20000
"""The rendezvous port of job J is PORT_BASE + J % PORT_SPAN: the same on every node of the job without
being told, and different for the jobs that share a node."""

SCONTROL_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Allocation:
    job_id: str
    nodes: tuple[str, ...]   # the nodes of this step (of the job, in the batch script), in SLURM's order
    node_id: int             # this node's index among them (SLURM_NODEID)
    ntasks: int              # tasks of this step
    tasks_per_node: tuple[int, ...]
    proc_id: int             # this task's global index (SLURM_PROCID)
    local_id: int            # this task's index on its node (SLURM_LOCALID)
    in_step: bool            # under srun (a job step), not the batch script itself

    @property
    def one_task_per_node(self) -> bool:
        return self.ntasks == len(self.nodes)

    @property
    def endpoint(self) -> str:
        """host:port of the c10d rendezvous: the first node of the step."""
        digits = re.sub(r"\D", "", self.job_id) or "0"  # an array task's id is JOB_TASK
        return f"{self.nodes[0]}:{PORT_BASE + int(digits) % PORT_SPAN}"

    @property
    def rdzv_id(self) -> str:
        return f"slurm-{self.job_id}"


def detect(env: Mapping[str, str] | None = None) -> Allocation | None:
    """This process's place in a SLURM job, or None outside one (no SLURM_JOB_ID, or PHALANX_SLURM=0 for a
    job that wants Phalanx to ignore its allocation and take the flags alone)."""
    env = os.environ if env is None else env
    job = env.get("SLURM_JOB_ID") or env.get("SLURM_JOBID")
    if not job or env.get("PHALANX_SLURM", "1") == "0":
        return None
    in_step = "SLURM_STEP_ID" in env

    def pick(step_key: str, job_key: str, default: str = "") -> str:
        return env.get(step_key) or env.get(job_key) or default

    nodelist = pick("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", env.get("SLURM_NODELIST", ""))
    nodes = tuple(hostnames(nodelist)) if nodelist else ()
    try:
        nnodes = int(pick("SLURM_STEP_NUM_NODES", "SLURM_JOB_NUM_NODES", str(len(nodes) or 1)))
        ntasks = int(pick("SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", "1"))
        per_node = tasks_per_node(pick("SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE", str(ntasks)))
        node_id, proc_id = int(env.get("SLURM_NODEID", "0")), int(env.get("SLURM_PROCID", "0"))
        local_id = int(env.get("SLURM_LOCALID", "0"))
    except ValueError as e:
        raise ConfigError(f"SLURM job {job}: an unreadable SLURM_* variable ({e}); run inside sbatch/srun, or set "
                          f"PHALANX_SLURM=0 to ignore the allocation") from None
    if len(nodes) != nnodes:
        raise ConfigError(f"SLURM job {job}: {nnodes} node(s) but the node list {nodelist!r} names {len(nodes)}; "
                          f"run inside sbatch/srun, or set PHALANX_SLURM=0 to ignore the allocation")
    return Allocation(job, nodes, node_id, ntasks, per_node, proc_id, local_id, in_step)


def hostnames(nodelist: str) -> list[str]:
    """SLURM's compressed node list expanded (`node[01-03],gpu7`): by `scontrol show hostnames`, as SLURM
    documents it, or by the same rules here where scontrol is missing (inside a container)."""
    if shutil.which("scontrol"):
        try:
            out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                                 timeout=SCONTROL_TIMEOUT_S)
            if out.returncode == 0 and out.stdout.split():
                return out.stdout.split()
        except (OSError, subprocess.TimeoutExpired):
            pass
    return expand_nodelist(nodelist)


def expand_nodelist(nodelist: str) -> list[str]:
    """`a[1-3,7],b05` -> a1 a2 a3 a7 b05 (ranges keep their zero padding), without scontrol."""
    out: list[str] = []
    for m in re.finditer(r"([^,\[]+)(?:\[([^\]]*)\])?([^,]*)", nodelist):
        prefix, ranges, suffix = m.group(1), m.group(2), m.group(3)
        if not ranges:
            out.append(prefix + suffix)
            continue
        for part in ranges.split(","):
            lo, _, hi = part.partition("-")
            width = len(lo)
            for i in range(int(lo), int(hi or lo) + 1):
                out.append(f"{prefix}{i:0{width}d}{suffix}")
    return out


def tasks_per_node(spec: str) -> tuple[int, ...]:
    """SLURM_TASKS_PER_NODE (`2(x3),1`) -> (2, 2, 2, 1)."""
    out: list[int] = []
    for part in spec.split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if not m:
            raise ValueError(f"SLURM_TASKS_PER_NODE={spec!r}")
        out += [int(m.group(1))] * int(m.group(2) or 1)
    return tuple(out)


def check_layout(alloc: Allocation, nproc: str) -> str:
    """'node' (one launcher per node) or 'rank' (each task one rank); one ConfigError line for an allocation
    that fits neither, or a --nproc that contradicts one task per rank."""
    if len(alloc.nodes) > 1 and not alloc.in_step:
        raise ConfigError(f"SLURM job {alloc.job_id} has {len(alloc.nodes)} nodes but this is its batch script, "
                          f"which runs on the first node only: start Phalanx with `srun --ntasks-per-node=1 "
                          f"phalanx train ...` (`phalanx slurm script` writes such a script)")
    if alloc.one_task_per_node:
        return "node"
    if len(set(alloc.tasks_per_node)) == 1 and alloc.ntasks == sum(alloc.tasks_per_node):
        if nproc not in ("auto", "1"):
            raise ConfigError(f"SLURM job {alloc.job_id}: {alloc.ntasks} tasks, so each task is one rank; "
                              f"--nproc {nproc} would start {nproc} more per task: leave --nproc out, or run one "
                              f"task per node (srun --ntasks-per-node=1) for --nproc ranks per node")
        return "rank"
    raise ConfigError(f"SLURM job {alloc.job_id}: {alloc.ntasks} tasks over {len(alloc.nodes)} nodes, unevenly "
                      f"({', '.join(map(str, alloc.tasks_per_node))} per node): run one task per node "
                      f"(srun --ntasks-per-node=1) or the same number of tasks on every node (one per device)")


def rank_environment(alloc: Allocation) -> dict[str, str]:
    """The variables torchrun would set for this task as one rank of the job (the 'rank' layout)."""
    local_world = alloc.tasks_per_node[alloc.node_id] if alloc.node_id < len(alloc.tasks_per_node) else 1
    host, _, port = alloc.endpoint.rpartition(":")
    return {"RANK": str(alloc.proc_id), "WORLD_SIZE": str(alloc.ntasks), "LOCAL_RANK": str(alloc.local_id),
            "LOCAL_WORLD_SIZE": str(local_world), "GROUP_RANK": str(alloc.node_id), "MASTER_ADDR": host,
            "MASTER_PORT": port}


def requeue(alloc: Allocation) -> str:
    """Ask SLURM to run this job again (`scontrol requeue`): the requeued job runs the same script, which
    resumes from the run directory. The line to print: what was done, or why not."""
    if not shutil.which("scontrol"):
        return (f"phalanx: scontrol is not on PATH (a container?): job {alloc.job_id} was not requeued; submit "
                f"the same script again to resume (or let --requeue bring a preempted job back)")
    try:
        out = subprocess.run(["scontrol", "requeue", alloc.job_id], capture_output=True, text=True,
                             timeout=SCONTROL_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"phalanx: scontrol requeue {alloc.job_id} failed ({e}); submit the same script again to resume"
    if out.returncode != 0:
        why = (out.stderr or out.stdout).strip().splitlines()[-1:] or [f"exit code {out.returncode}"]
        return (f"phalanx: scontrol requeue {alloc.job_id} failed ({why[0]}); submit the same script again to "
                f"resume (the job needs --requeue)")
    return f"phalanx: job {alloc.job_id} requeued; it resumes from its run directory when it runs again"


_warned: list[str] = []
EARLY_ENV = "PHALANX_SLURM_WARNED"
"""Set by `python -m phalanx` (phalanx/__main__.py) when USR1 came while it was importing torch."""


def catch_warning() -> None:
    """From now on, SLURM's USR1 (the time limit is near, or a preemption) is noted instead of ending this
    process, which Python's default for USR1 does: SLURM may send it before the ranks run (its time-limit checks
    come every 30 s, so the warning can come up to a minute early). The launcher's own handler takes over while
    the ranks run; `warned()` then says whether the warning came before them. Main thread only."""
    def note(signum, frame) -> None:
        _warned.append(signal.Signals(signum).name)

    signal.signal(signal.SIGUSR1, note)
    if os.environ.pop(EARLY_ENV, None):  # noted by `python -m phalanx` before this module was imported
        _warned.append("SIGUSR1")


def warned() -> bool:
    """Whether SLURM's warning (USR1) reached this process, or it was stopped (`note_stop`) since it started."""
    return bool(_warned)


def note_stop(name: str) -> None:
    """The launcher was stopped by signal `name` (the elastic agent passed it on to the ranks)."""
    _warned.append(name)


def mark_run_dir(run_dir) -> None:
    """One task per rank: no launcher marks the run directory as a run's before the ranks write into it (logs/),
    so each task does, once its own check passed. A task that checks later (rank 0 started after rank 1 wrote its
    log) then finds a run directory, not a folder that holds files and no marker."""
    import json
    import time
    from pathlib import Path
    marker = Path(run_dir) / RUN_MARKER
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    if not marker.exists():
        marker.write_text(json.dumps({"made_by": "phalanx train (SLURM task)",
                                      "created": time.strftime("%Y-%m-%dT%H:%M:%S")}) + "\n")

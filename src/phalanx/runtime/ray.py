"""Start the ranks on Ray Train's workers (`phalanx ray train`): Ray places and restarts them, Phalanx trains.

Ray Train's TorchTrainer starts one worker per rank (ScalingConfig: workers, GPUs and CPUs per worker), sets
RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT in each, and joins them in a process
group of its own. Each worker then hands over to Phalanx's rank entry as a torchrun rank would: Ray's group
serves once, to agree on this attempt's number and a fresh port on MASTER_ADDR, and is destroyed; the rank then
joins its own group exactly as under torchrun (its backend, timeouts, rank 0's store bound to MASTER_ADDR). So a
rank's arithmetic, checkpoints and run directory are those of `phalanx train --nproc N`.

A worker that fails (an exception, a non-zero exit code, a killed process) fails the group; Ray's FailureConfig
starts a new one (up to `max_failures` times), whose ranks find the run directory's last checkpoint and resume
there, as after an elastic restart. The attempt number is the ranks' TORCHELASTIC_RESTART_COUNT. Ray's own files
(RunConfig's storage) are kept in RUN_DIR/ray; Phalanx's checkpoints stay where they always are.

What a rank runs is the caller's: `launch` is handed the rank entry and never imports the commands.
"""
from __future__ import annotations

import os
import re
import socket
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from phalanx.errors import ConfigError

RankEntry = Callable[[list[str]], int]

INSTALL_HINT = "pip install 'phalanx[ray]' (Ray Train: pip install 'ray[train]')"

AGREE_KEY = "phalanx/ray/attempt-port"
"""Where rank 0 leaves `ATTEMPT:PORT` in Ray's process-group store for the other ranks."""


@dataclass(frozen=True)
class RayLayout:
    """Where and how many: one Ray Train worker per rank."""
    workers: int
    """Ranks in all (ScalingConfig.num_workers)."""
    gpus_per_worker: int = 0
    """0: CPU ranks; 1: one GPU per rank (Ray sets CUDA_VISIBLE_DEVICES; the rank takes its local one)."""
    cpus_per_worker: int = 1
    """CPUs Ray reserves for each worker (its threads: --parallel.threads_per_rank, 0 = cores / ranks)."""
    address: str = ""
    """Ray's cluster: '' (RAY_ADDRESS, else a local cluster started here and stopped at the end), 'auto' (the
    cluster this machine belongs to), HOST:PORT of its head, or ray://HOST:PORT (Ray Client)."""
    max_failures: int = 3
    """Worker-group failures Ray recovers from (FailureConfig.max_failures) before the run fails."""
    join_timeout_s: float = 1800.0
    """How long Ray's own process group waits for its workers (TorchConfig.timeout_s)."""


def import_ray():
    """The `ray` package with Ray Train, or one ConfigError line saying how to install it."""
    try:
        import ray
        import ray.train.torch  # noqa: F401 (Ray Train: the `train` extra of ray)
    except ImportError as e:
        raise ConfigError(f"Ray Train is not installed ({e.name or e}): {INSTALL_HINT}") from None
    return ray


def scaling(layout: RayLayout) -> dict:
    """ScalingConfig's arguments for `layout`: one worker per rank with its CPUs and GPUs."""
    resources = {"CPU": float(layout.cpus_per_worker)}
    if layout.gpus_per_worker:
        resources["GPU"] = float(layout.gpus_per_worker)
    return {"num_workers": layout.workers, "use_gpu": layout.gpus_per_worker > 0, "resources_per_worker": resources}


def worker_env(environ: Mapping[str, str]) -> dict[str, str]:
    """What the workers inherit from this process: Phalanx's own variables (the command's start time, the run
    directory its launcher holds, a data cache, a fault to inject in tests). Ray's workers are started by its
    raylets, not by this process, so nothing else reaches them."""
    return {k: v for k, v in environ.items() if k.startswith("PHALANX_")}


def init_kwargs(layout: RayLayout, environ: Mapping[str, str]) -> dict:
    """ray.init's arguments: the cluster, and the variables every worker of this job gets."""
    kwargs: dict = {"runtime_env": {"env_vars": worker_env(environ)}, "log_to_driver": True}
    if layout.address:
        kwargs["address"] = layout.address
    elif not environ.get("RAY_ADDRESS"):  # a local cluster of this machine, started here: no dashboard
        kwargs["include_dashboard"] = False
    return kwargs


class Attempts:
    """How many times the worker group has started (a Ray actor: rank 0 of each group asks it once)."""

    def __init__(self) -> None:
        self.started = 0

    def next(self) -> int:
        self.started += 1
        return self.started - 1


def free_port(addr: str) -> int:
    """A TCP port free on `addr` now (rank 0's process-group store then listens there)."""
    with socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET) as s:
        s.bind((addr, 0))
        return s.getsockname()[1]


def _agree(attempts, rank: int, world: int, timeout_s: float) -> tuple[int, int]:
    """(attempt, port), the same on every rank, through Ray's process group; which is then destroyed, so that the
    rank joins its own. Rank 0 waits until every rank has read them before it closes the store it hosts."""
    import datetime

    import ray
    import torch.distributed as dist

    store = dist.distributed_c10d._get_default_store()
    store.set_timeout(datetime.timedelta(seconds=timeout_s))
    if rank == 0:
        attempt = ray.get(attempts.next.remote(), timeout=timeout_s)
        store.set(AGREE_KEY, f"{attempt}:{free_port(os.environ['MASTER_ADDR'])}")
    attempt, port = (int(x) for x in store.get(AGREE_KEY).decode().split(":"))
    store.set(f"{AGREE_KEY}/read/{rank}", "1")
    if rank == 0:
        store.wait([f"{AGREE_KEY}/read/{k}" for k in range(world)])
    dist.destroy_process_group()
    return attempt, port


class RankFailed(RuntimeError):
    """A rank's entry returned a non-zero exit code: the worker fails, and Ray restarts the group."""


def rank_on_worker(config: dict) -> None:
    """Ray Train's `train_loop_per_worker`: this worker becomes one Phalanx rank and runs `entry(argv)`."""
    import ray.train

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    # Ray has set these for its own group already; set again from its context, so the rank reads Ray's placement
    # whatever the version of Ray set before.
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(ctx.get_local_rank()),
                      LOCAL_WORLD_SIZE=str(ctx.get_local_world_size()))
    attempt, port = _agree(config["attempts"], rank, world, config["join_timeout_s"])
    os.environ.update(MASTER_PORT=str(port), TORCHELASTIC_RESTART_COUNT=str(attempt))
    code = config["entry"](list(config["argv"]))
    if code:
        raise RankFailed(f"phalanx: rank {rank} (Ray attempt {attempt}) exited with code {code}")


def launch(entry: RankEntry, rank_args: list[str], layout: RayLayout, run_dir: Path,
           environ: Mapping[str, str] | None = None) -> int:
    """Run `entry(RANK_ARGS)` on `layout.workers` Ray Train workers until it ends or fails more than
    `layout.max_failures` times; returns the exit code (one line on stderr for a failed run)."""
    ray = import_ray()
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    environ = os.environ if environ is None else environ
    started_here = not ray.is_initialized()
    if started_here:
        try:
            ray.init(**init_kwargs(layout, environ))
        except (ConnectionError, ValueError, RuntimeError) as e:
            raise ConfigError(f"--address {layout.address or environ.get('RAY_ADDRESS', '(local)')}: cannot join "
                              f"the Ray cluster ({str(e).strip().splitlines()[0][:200]}); start it (`ray start "
                              f"--head`) or give its address (auto, HOST:PORT, ray://HOST:PORT)") from None
    attempts = ray.remote(num_cpus=0)(Attempts).remote()
    try:
        need = scaling(layout)
        short = shortfall(need, layout.workers, ray.cluster_resources())
        if short and started_here and not layout.address and not environ.get("RAY_ADDRESS"):
            raise ConfigError(f"--workers {layout.workers}: {short} on this machine's local Ray cluster; use fewer "
                              f"workers or fewer CPUs/GPUs per worker, or join a cluster with --address")
        if short:  # an autoscaling cluster may grow: Ray waits for the resources
            print(f"phalanx: {short} now; Ray Train waits until the cluster has them", file=sys.stderr, flush=True)
        trainer = TorchTrainer(
            rank_on_worker,
            train_loop_config={"entry": entry, "argv": list(rank_args), "attempts": attempts,
                               "join_timeout_s": layout.join_timeout_s},
            torch_config=TorchConfig(backend="gloo", timeout_s=int(layout.join_timeout_s)),  # only to agree (above)
            scaling_config=ScalingConfig(**need),
            run_config=RunConfig(name="train", storage_path=str(Path(run_dir).absolute() / "ray"),
                                 failure_config=FailureConfig(max_failures=layout.max_failures)),
        )
        try:
            trainer.fit()
        except Exception as e:  # Ray's TrainingFailedError and its kin: the last failure, as one line
            print(f"phalanx: the run on Ray failed (after up to {layout.max_failures} restart(s) of the worker "
                  f"group): {failure_line(e)}; the ranks' logs: {run_dir}/logs", file=sys.stderr, flush=True)
            return 1
        return 0
    finally:
        ray.kill(attempts)
        if started_here:
            ray.shutdown()


def shortfall(need: dict, workers: int, have: Mapping[str, float]) -> str:
    """What the cluster lacks for `workers` workers of `need["resources_per_worker"]` ('' when nothing)."""
    short = [f"{workers} x {amount:g} {kind} asked for, the cluster has {have.get(kind, 0):g}"
             for kind, amount in need["resources_per_worker"].items() if have.get(kind, 0) < amount * workers]
    return "; ".join(short)


def failure_line(e: BaseException) -> str:
    """What failed, in one line: a rank's own `phalanx: ...` line where Ray's report holds one, else the first line
    of Ray's snippet of the failing rank, else the report's first line."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    own = [ln for ln in lines if "phalanx: " in ln]
    if own:
        return own[-1][own[-1].find("phalanx: ") + len("phalanx: "):][:300]
    for i, ln in enumerate(lines[:-1]):
        if m := re.match(r"\[Rank (\d+) Error Snippet\]", ln):
            return f"rank {m.group(1)}: {lines[i + 1][:300]}"
    return lines[0][:300] if lines else type(e).__name__

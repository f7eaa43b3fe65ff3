"""Who am I in the run: rank, world size, local rank, device, threads; process-group set-up and teardown.

Read once from the variables PyTorch's elastic launcher sets (RANK, WORLD_SIZE, LOCAL_RANK,
LOCAL_WORLD_SIZE, MASTER_ADDR/PORT); nothing deeper reads the environment.
"""
from __future__ import annotations

import contextlib
import datetime
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from phalanx import runtime
from phalanx.config import ParallelConfig
from phalanx.errors import ConfigError
from phalanx.runtime import hang, stores
from phalanx.runtime.cpu import usable_cores


def threads_per_rank(pcfg: ParallelConfig, local_world: int) -> int:
    """ranks x threads <= cores: oversubscribed cores make every rank wait on the slowest."""
    return pcfg.threads_per_rank or max(1, usable_cores() // local_world)


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory in the process; True when it took effect.

    Each training step allocates and frees the same few-MB activation tensors. By default glibc
    serves blocks that large with mmap (or trims the heap top), so every step faults fresh pages in
    again: ~10% of a small CNN's CPU step here. A fixed mmap threshold (its 32 MiB maximum) and a
    high trim threshold keep those blocks for reuse; resident memory stays at the step's peak.
    jemalloc or tcmalloc (LD_PRELOAD) do the same job; this needs nothing installed.
    """
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library this process already runs on
    except (OSError, AttributeError):  # no mallopt (macOS): nothing to tune; musl's returns 0
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(mallopt(m_mmap_threshold, 32 << 20)) and bool(mallopt(m_trim_threshold, 1 << 30))


def is_worker() -> bool:
    """True inside a process started by torchrun / the elastic agent."""
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "TORCHELASTIC_RESTART_COUNT", "MASTER_ADDR",
               "MASTER_PORT")
"""The variables a launcher sets for each rank (torchrun, the elastic agent, a scheduler's own wrapper)."""

_MOST_RANKS = 1 << 24  # more ranks than any cluster has: a value this large is a typo or garbage


@dataclass(frozen=True)
class LaunchVars:
    """Where this process is in the run, as the launcher's variables say (defaults: one process)."""
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1
    restart: int = 0
    master_addr: str = ""
    master_port: int | None = None


def launch_vars(environ: Mapping[str, str]) -> LaunchVars:
    """LAUNCH_VARS from `environ`, checked: a value no launcher would set is one ConfigError line naming the
    variable, its value and the fix, never int()'s traceback or a process group that waits for ever."""
    fix = ("a launcher (torchrun, `phalanx train --nproc N`, a scheduler) sets these; unset it to run one "
           "process, or let the launcher set it")

    def count(name: str, default: int, least: int) -> int:
        raw = environ.get(name)
        if raw is None:
            return default
        value = raw.strip()
        if not (value.isdecimal() and len(value) <= 9 and least <= int(value) <= _MOST_RANKS):
            raise ConfigError(f"{name}={raw[:40]!r} in the environment: must be a whole number from {least} to "
                              f"{_MOST_RANKS}; {fix}")
        return int(value)

    world = count("WORLD_SIZE", 1, 1)
    rank = count("RANK", 0, 0)
    local_world = count("LOCAL_WORLD_SIZE", 1, 1)
    local_rank = count("LOCAL_RANK", 0, 0)
    restart = count("TORCHELASTIC_RESTART_COUNT", 0, 0)
    if rank >= world:
        raise ConfigError(f"RANK={rank} in the environment: must be below WORLD_SIZE={world} (ranks count from 0); "
                          f"{fix}")
    if "LOCAL_WORLD_SIZE" in environ and local_rank >= local_world:
        raise ConfigError(f"LOCAL_RANK={local_rank} in the environment: must be below LOCAL_WORLD_SIZE="
                          f"{local_world}; {fix}")
    if "WORLD_SIZE" in environ and local_world > world:
        raise ConfigError(f"LOCAL_WORLD_SIZE={local_world} in the environment: more ranks on this node than "
                          f"WORLD_SIZE={world} in all; {fix}")
    addr, port = environ.get("MASTER_ADDR", "").strip(), None
    if world > 1:  # joining a process group: rank 0's address and port must be known, or init waits for ever
        missing = [n for n in ("MASTER_ADDR", "MASTER_PORT") if not environ.get(n, "").strip()]
        if missing:
            raise ConfigError(f"WORLD_SIZE={world} and RANK={rank} are set in the environment but "
                              f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} not: a launcher sets "
                              f"them all; start the ranks with `phalanx train --nproc N` or torchrun, or unset "
                              f"RANK and WORLD_SIZE to run one process")
        raw = environ["MASTER_PORT"]
        if not (raw.strip().isdecimal() and len(raw.strip()) <= 5 and 1 <= int(raw) <= 65535):
            raise ConfigError(f"MASTER_PORT={raw[:40]!r} in the environment: must be a TCP port from 1 to 65535 "
                              f"(rank 0's process-group store); {fix}")
        port = int(raw)
    return LaunchVars(rank, world, local_rank, local_world, restart, addr, port)


@dataclass
class DistEnv:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1
    device: torch.device = torch.device("cpu")
    accel: runtime.Accelerator = field(default_factory=runtime.CPUAccelerator)
    backend: str = "none"
    threads: int = 1
    restart: int = 0
    """How many times the elastic agent has restarted this group."""
    error_file: str = ""
    """Where the elastic agent reads this rank's failure message (TORCHELASTIC_ERROR_FILE)."""
    store_on_rank0: bool = False
    """The process-group store is hosted by rank 0 (not by the elastic agent)."""
    store_server: object = None
    """Rank 0's process-group store server, bound here to MASTER_ADDR only (held while the process lives)."""
    phase: str = "starting"
    """What this rank is doing now; named in the message when a peer fails."""
    join_timeout_s: float = 0.0
    """The process group's timeout while ranks join (--parallel.init_timeout_s, at least timeout_s)."""
    timeout_now_s: float = 0.0
    """The collective timeout in force now: join_timeout_s, then --parallel.timeout_s after the first step."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1 and dist.is_initialized()


def init(pcfg: ParallelConfig, device_pref: str = "auto", run_dir: str | None = None) -> DistEnv:
    """Bind the device, set CPU threads and join the process group (when there is more than one rank). With
    `run_dir`, the backend's flight recorder (NCCL's) dumps into its logs/ when a collective times out."""
    v = launch_vars(os.environ)
    e = DistEnv(
        rank=v.rank, world=v.world, local_rank=v.local_rank, local_world=v.local_world, restart=v.restart,
        error_file=os.environ.get("TORCHELASTIC_ERROR_FILE", ""),
        store_on_rank0=os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "False") != "True",
    )
    e.accel = runtime.accelerator(device_pref)
    if e.world > 1 and e.accel.kind == "xla":  # config refuses --nproc > 1 with --device xla; torchrun sets WORLD_SIZE
        raise ConfigError(f"--device xla: this process is rank {e.rank} of {e.world} (started by torchrun?), but one "
                          f"process per host drives all of its XLA devices as one SPMD program; run `phalanx train "
                          f"--device xla` once on each host, without torchrun")
    backend = resolve_backend(pcfg, e.accel)
    if e.world > 1:  # under a bare torchrun too; `phalanx train --nproc` refuses before starting the ranks
        check_ranks_fit(e.accel, e.local_world, backend)
    e.device = e.accel.bind(e.local_rank)
    e.threads = threads_per_rank(pcfg, e.local_world)
    if e.device.type == "cpu" and pcfg.keep_cpu_memory:
        keep_freed_memory()
    torch.set_num_threads(e.threads)
    if e.world > 1:
        kwargs = {}
        if backend == "nccl":
            kwargs["device_id"] = e.device  # eager NCCL init, bound to this rank's GPU
        if run_dir:  # read by the backend as it creates the group
            set_flight_recorder(e.accel, Path(run_dir) / "logs", os.environ)
        if e.rank == 0 and e.store_on_rank0:
            e.store_server = serve_process_group_store(os.environ.get("MASTER_ADDR", ""),
                                                       os.environ.get("MASTER_PORT", ""))
        # The init timeout also covers slow joiners; collectives get the shorter one after the first step.
        e.join_timeout_s = e.timeout_now_s = max(pcfg.init_timeout_s, pcfg.timeout_s)
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=e.join_timeout_s), **kwargs)
        e.backend = backend
        if e.local_world < e.world:  # several nodes: which one this rank is on, for a line naming a silent rank's
            publish_node(e)
    return e


NODE_KEY = "phalanx/node/"
"""The process-group store's key of each rank's node address (several nodes only)."""


def node_address() -> str:
    """This machine's address towards rank 0's (MASTER_ADDR): the one the other nodes reach it at."""
    addr = os.environ.get("MASTER_ADDR", "")
    try:
        return stores.route_addr(stores.resolve(addr)) or addr
    except OSError:
        return addr


def publish_node(env: DistEnv) -> None:
    with contextlib.suppress(Exception):  # a line without the node's address, then
        dist.distributed_c10d._get_default_store().set(f"{NODE_KEY}{env.rank}", node_address())


def node_of(env: DistEnv, rank: int, within_s: float = 2.0) -> str:
    """' (node ADDR)' for `rank` of a run on several nodes, as it published it (rank 0's: MASTER_ADDR, which
    needs no store: the store is on its node); '' on one node or when the store does not answer in time."""
    if env.local_world >= env.world:
        return ""
    if rank == 0 and env.store_on_rank0:
        addr = os.environ.get("MASTER_ADDR", "")
    else:
        def ask() -> str:
            store = dist.distributed_c10d._get_default_store()
            return store.get(f"{NODE_KEY}{rank}").decode() if store.check([f"{NODE_KEY}{rank}"]) else ""
        done, addr = stores.call_within(ask, within_s)
        addr = addr if done and isinstance(addr, str) else ""
    return f" (node {addr})" if addr else ""


def set_flight_recorder(accel: runtime.Accelerator, logs: Path, environ) -> None:
    """The accelerator's flight-recorder variables into `environ`, each unless a user set one of its names; the
    folder of its dump files is made here, whether or not the backend would make it."""
    settings = accel.flight_recorder(logs)
    for names, value in settings:
        if not any(n in environ for n in names):
            environ.update(dict.fromkeys(names, value))
    if settings:
        with contextlib.suppress(OSError):  # no dump then; the run itself reports an unusable run directory
            (Path(logs) / "flight-recorder").mkdir(parents=True, exist_ok=True)


def resolve_backend(pcfg: ParallelConfig, accel: runtime.Accelerator) -> str:
    """--parallel.backend, or the accelerator's (NCCL on CUDA, gloo on CPU) for auto."""
    return pcfg.backend if pcfg.backend != "auto" else accel.backend


def check_ranks_fit(accel: runtime.Accelerator, ranks_per_node: int, backend: str) -> None:
    """One line instead of two ranks silently sharing a GPU (NCCL refuses that later, less clearly): more
    ranks on a node than its devices need a backend that lets ranks share one (gloo; tests, the GPU check)."""
    n = accel.device_count()
    if n and ranks_per_node > n and backend == "nccl":
        raise ConfigError(f"parallel.nproc={ranks_per_node}: more ranks on this node than its {n} "
                          f"{accel.kind.upper()} device(s), and NCCL needs one device per rank; use --nproc {n} "
                          f"(auto: one per device), or --parallel.backend gloo to let ranks share devices (slow)")


def serve_process_group_store(master_addr: str, master_port: str):
    """Rank 0's process-group store, listening on MASTER_ADDR's address only, or None (torch's own then).

    env:// initialisation creates a multi-tenant TCPStore server on MASTER_PORT, on every interface;
    created here first, bound to the address the other ranks are told to connect to, it is the one
    initialisation then uses (see runtime/stores.py).
    """
    if not master_addr or not master_port.isdigit():
        return None
    try:
        return stores.serve(stores.resolve(master_addr), int(master_port))
    except OSError:  # not this machine's address, or taken: torch's own server reports it as before
        return None


def set_collective_timeout(seconds: float, env: DistEnv | None = None) -> None:
    """Shorten the process group's timeout once every rank has joined and stepped once (or lengthen it
    again: `rank0_alone`). `env` records the value in force."""
    if env is not None:
        env.timeout_now_s = seconds
    if not dist.is_initialized():
        return
    td = datetime.timedelta(seconds=seconds)
    try:
        if hasattr(dist, "set_timeout"):  # public since 2.12
            dist.set_timeout(td)
        elif hasattr(dist.distributed_c10d, "_set_pg_timeout"):  # 2.3 - 2.11
            dist.distributed_c10d._set_pg_timeout(td, None)
    except Exception:  # a backend without support keeps the init timeout
        pass


@contextlib.contextmanager
def rank0_alone(env: DistEnv):
    """Work rank 0 does alone (writing a checkpoint, the final weights, plots) while the others wait for it,
    then a barrier: every rank waits there with the joining timeout, not the short one of training steps,
    so that a long write cannot time the others out (NCCL's watchdog would abort them). Every rank enters."""
    short = env.timeout_now_s
    longer = env.distributed and short < env.join_timeout_s
    if longer:
        set_collective_timeout(env.join_timeout_s, env)
    try:
        yield
        if env.distributed:
            hang.entered("barrier (after rank 0's work alone)")
            dist.barrier()
    finally:
        if longer:
            set_collective_timeout(short, env)


ANSWER_WINDOW_S = 5.0
"""How long a rank whose collective timed out waits for the other ranks to check in through the store."""


def unanswered_ranks(env: DistEnv, window_s: float = ANSWER_WINDOW_S) -> list[int] | None:
    """The ranks that do not check in through the process-group store within `window_s` seconds.

    Called by every rank whose collective timed out: those that are alive all get there within about
    the same time (they waited the same timeout), a stalled one never does. None when the store
    itself does not answer (its host stalled too) or cannot be asked.
    """

    def ask() -> list[int]:
        store = dist.distributed_c10d._get_default_store()
        key = f"phalanx/alive/{env.restart}/"
        store.set(key + str(env.rank), "1")
        waiting = [k for k in range(env.world) if k != env.rank]
        deadline = time.monotonic() + window_s
        while waiting and time.monotonic() < deadline:
            time.sleep(0.1)
            waiting = [k for k in waiting if not store.check([key + str(k)])]
        return waiting

    done, value = stores.call_within(ask, window_s + 2)
    return value if done else None


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()

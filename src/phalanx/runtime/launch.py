"""Start N ranks per node through PyTorch's elastic launcher (the engine behind `torchrun`).

`phalanx train --nproc 2 ...` becomes `torchrun --standalone --nproc-per-node 2 -m phalanx.commands.rank
train ...` run in this process by `torch.distributed.run`; multi-node runs use a c10d rendezvous. Nothing
here spawns or watches processes by hand: restarts, failure reports and teardown are the agent's. What a
rank runs is the caller's: `launch` is handed the rank entry and never imports the commands.
"""
from __future__ import annotations

import contextlib
import math
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

from phalanx import runtime
from phalanx.config import ParallelConfig
from phalanx.errors import ConfigError
from phalanx.runtime import stores
from phalanx.runtime.dist import check_ranks_fit, resolve_backend


def resolve_nproc(pcfg: ParallelConfig, device_pref: str, global_batch: int = 512,
                  fits: Callable[[int], bool] | None = None) -> tuple[int, str]:
    """(ranks on this node, why): `auto` is one rank per GPU, or on CPU one single-thread rank per core,
    capped so that every rank still gets at least 32 images per step. `fits(world)` says whether the run
    can use a world size (mixup's pairs must not straddle ranks): on CPU, where ranks are a layout of the
    same cores, `auto` then takes the most ranks that fit; GPUs are not left idle (the run refuses instead)."""
    if pcfg.nproc != "auto":
        return int(pcfg.nproc), "as asked"
    accel = runtime.accelerator(device_pref)
    n, why = accel.auto_nproc(global_batch)
    if fits is None or accel.kind != "cpu" or fits(n * pcfg.nnodes):
        return n, why
    fitting = next((k for k in range(n - 1, 0, -1) if fits(k * pcfg.nnodes)), None)
    if fitting is None:  # no world size fits (an odd global batch): the run refuses and says why
        return n, why
    return fitting, f"{why}; {fitting}, the most that keep mixup/CutMix's pairs whole"


def launcher_argv(pcfg: ParallelConfig, nproc: int, module: str = "phalanx.commands.rank") -> list[str]:
    """torchrun's own flags for this run, ending with `-m MODULE` (the rank's arguments are passed separately)."""
    argv = ["--nproc-per-node", str(nproc), "--max-restarts", str(pcfg.max_restarts), "--monitor-interval", "0.1"]
    if pcfg.nnodes == 1 and not pcfg.rdzv_endpoint:
        argv += ["--standalone"]
    else:
        # The rendezvous waits for the other nodes as long as the process group waits for its ranks (torch's
        # own default is 600 s, whatever --parallel.init_timeout_s says).
        argv += ["--nnodes", str(pcfg.nnodes), "--rdzv-backend", "c10d",
                 "--rdzv-endpoint", pcfg.rdzv_endpoint or "127.0.0.1:29400", "--rdzv-id", pcfg.rdzv_id,
                 "--rdzv-conf", f"join_timeout={max(1, math.ceil(pcfg.init_timeout_s))}"]
        if pcfg.node_rank >= 0:
            argv += ["--node-rank", str(pcfg.node_rank)]
    return argv + ["-m", module]


RankEntry = Callable[[list[str]], int]
"""What each rank runs: `entry(argv)` returns the rank's exit code. Spawned ranks run `python -m
entry.__module__ ARGV`, which must call it (`if __name__ == "__main__"`); forked ones call it directly."""


def _forked_rank(entry: RankEntry, *argv: str) -> None:
    """A rank forked from the launcher: `entry(ARGV)`, minus the ~2 s of importing torch.

    The elastic agent has already set RANK, WORLD_SIZE, MASTER_ADDR... in this process. The
    signal handlers copied from the agent (which raise its SignalException) are reset, so the rank
    handles SIGTERM/SIGINT exactly as a spawned one does.
    """
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    from torch.distributed.elastic.multiprocessing.errors import record
    try:
        # `record` leaves the exception for the agent, as a spawned rank's entry (commands/outcome.run_entry) does.
        code = record(entry)(list(argv))
    except Exception:
        # torch's fork wrapper would hand the traceback to the agent, whose report of it `launch` silences:
        # print it here, as a spawned rank's interpreter does.
        import traceback
        traceback.print_exc()
        sys.stderr.flush()
        raise SystemExit(1) from None
    if code:
        raise SystemExit(code)
    leave_after_return(RETURN_GRACE_S)


RETURN_GRACE_S = 1.0
"""How long a forked rank that finished its work waits for the agent to release it before it exits by itself."""


def leave_after_return(grace_s: float) -> None:
    """End this forked rank `grace_s` seconds from now, whatever the elastic agent does.

    After the entrypoint returns, torch's worker wrapper puts the return value on a queue and waits for
    an event that the agent sets only when it polls and finds every rank done. An agent that is shutting
    down (it got SIGTERM and passed it on: a preemption) never polls again; it only waits for its
    workers to exit and SIGKILLs them after 30 s. The return value is on the queue within microseconds,
    so leaving after `grace_s` is safe for a polling agent too (an exit code 0 is a success to it).
    """
    import threading

    def leave() -> None:
        time.sleep(grace_s)
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(0)

    threading.Thread(target=leave, daemon=True, name="phalanx-leave").start()


def bind_rendezvous(args, pcfg: ParallelConfig):
    """Make the run's stores listen on the rendezvous endpoint's address only; returns the rendezvous store
    server where this process hosts it (keep it while the agent runs), else None.

    The endpoint is 127.0.0.1 for a single-node run. On the machine that owns the endpoint's address,
    the rendezvous store is bound here to that address (torch's own would listen on every interface;
    see runtime/stores.py). `args.local_addr`, which the ranks' process-group store binds (rank 0's
    MASTER_ADDR), becomes this machine's address towards the endpoint; on loopback, gloo is told to use
    the loopback interface too (GLOO_SOCKET_IFNAME, unless set). Where the endpoint's port is held by a
    program that does not answer as a c10d store, a ConfigError says so instead of waiting for ever.
    """
    import errno

    from torch.distributed.elastic.rendezvous.utils import parse_rendezvous_endpoint

    endpoint = args.rdzv_endpoint
    field = f"--parallel.rdzv_endpoint {endpoint}" if pcfg.rdzv_endpoint else f"rendezvous endpoint {endpoint}"
    try:
        host, port = parse_rendezvous_endpoint(endpoint, default_port=29400)
        addr = stores.resolve(host)
    except (ValueError, OSError) as e:
        raise ConfigError(f"{field}: not a reachable host:port ({e}); give HOST:PORT of node 0, e.g. "
                          f"10.0.0.1:29400") from None
    if stores.is_loopback(addr):
        args.local_addr = addr
        lo = stores.loopback_interface()
        if lo:
            os.environ.setdefault("GLOO_SOCKET_IFNAME", lo)
    else:
        args.local_addr = stores.route_addr(addr)  # None: torch's default, this machine's FQDN
        # gloo listens, and tells the other ranks to connect, on that address's interface, not on the address
        # this machine's name resolves to (often a loopback one: Debian's /etc/hosts), unless told otherwise.
        # (NCCL picks its interface itself and skips loopback.)
        nic = stores.interface_of(args.local_addr) if args.local_addr else None
        if nic:
            os.environ.setdefault("GLOO_SOCKET_IFNAME", nic)
    try:
        server = stores.serve(addr, port)
    except OSError as e:
        if e.errno not in (errno.EADDRINUSE, errno.EADDRNOTAVAIL):
            raise ConfigError(f"{field}: cannot listen there ({e.strerror}); give a free port") from None
        # Another machine's address, or a port in use here: by another node's agent on this machine
        # (its store), or by some other program, which torch's client would wait on for ever.
        if stores.answers_as_store(host, port) is False:
            raise ConfigError(f"{field}: the port is held by a program that does not answer as a PyTorch "
                              f"c10d store; give a free port (or stop that program)") from None
        return None
    if port == 0:
        args.rdzv_endpoint = f"[{addr}]:{server.port}" if ":" in addr else f"{addr}:{server.port}"
    return server


LAUNCHER_ENV = "PHALANX_LAUNCHER"
"""Set in the ranks that `launch` starts. Their launcher prints the first failing rank's line once, so a rank
leaves its line for it (`tell_from_rank`) instead of printing it too; under a user's own torchrun, whose
agent prints no such line, each rank prints its own."""


def tell_from_rank(line: str, for_agent: bool = True, console: bool = False) -> None:
    """A rank's one-line failure: in this rank's log file; with `for_agent`, where the elastic agent reads this
    rank's failure (TORCHELASTIC_ERROR_FILE, which the agent sets for forked and spawned ranks alike); and on
    stderr unless Phalanx's launcher started this rank (it prints the first failing rank's line, once) or with
    `console` (a node that lost rank 0's: its agent's rendezvous store is there too, and it may not report soon)."""
    import logging
    log = logging.getLogger("phalanx")
    for handler in log.handlers:  # the rank's logs/rank-K.log only: rank 0's console is the launcher's terminal
        if isinstance(handler, logging.FileHandler):
            handler.handle(log.makeRecord(log.name, logging.ERROR, __file__, 0, line, None, None))
    if for_agent:
        write_error_file(os.environ.get("TORCHELASTIC_ERROR_FILE", ""), line)
    if console or os.environ.get(LAUNCHER_ENV) != "1":
        print(line, file=sys.stderr, flush=True)


def write_error_file(path: str, message: str) -> None:
    """`message` as torch's error-file format (`{"message": str, "timestamp": int}`); nothing without a path."""
    import json
    if not path:
        return
    try:
        with open(path, "w") as f:
            json.dump({"message": message, "timestamp": int(time.time())}, f)
    except OSError:  # the agent then reports the exit code alone
        pass


def _own_line(failure) -> bool:
    return isinstance(failure.message, str) and failure.message.startswith("phalanx: ")


def failure_report(e, run_dir=None, since: float = 0.0) -> tuple[str, int]:
    """(one line, exit code) for a failed group. The line is the failing rank's own where one left it (a user's
    mistake; a rank that waited on a stalled peer names that peer), the first such by time, then rank; else the
    first rank the agent saw fail, and how. The code is that rank's (128 + N for signal N). The rank's log is
    named only where it exists and was written since `since` (a copied run folder holds another run's)."""
    pool = {r: f for r, f in e.failures.items() if _own_line(f)} or e.failures
    rank = min(pool, key=lambda r: (pool[r].timestamp, r))
    failure = pool[rank]
    code = failure.exitcode if failure.exitcode > 0 else 128 - failure.exitcode
    if _own_line(failure):
        return failure.message.splitlines()[0], code
    how = (f"was killed by {failure.signal_name()}" if failure.exitcode < 0 else
           f"exited with code {failure.exitcode}")
    if isinstance(failure.message, dict) and failure.message.get("message"):  # an exception `record` left
        how += f" after {str(failure.message['message']).strip().splitlines()[0][:300]}"
    log = rank_log(run_dir, rank, since)
    return f"phalanx: rank {rank} {how}" + (f"; its log: {log}" if log else ""), code


def rank_log(run_dir, rank: int, since: float = 0.0):
    """RUN_DIR/logs/rank-RANK.log where it exists and was written since `since`, else None."""
    if run_dir is None:
        return None
    log = Path(run_dir) / "logs" / f"rank-{rank}.log"
    try:
        return log if log.is_file() and log.stat().st_mtime >= since else None
    except OSError:
        return None


@contextlib.contextmanager
def quiet_agent_reports():
    """Silence torch's report of a failed rank (its traceback of the agent's own poll, the processes it closes):
    `launch` prints the rank's one line instead; the rank's own output and log keep the detail."""
    import logging
    loggers = [logging.getLogger(name) for name in ("torch.distributed.elastic.multiprocessing.api",
                                                    "torch.distributed.elastic.multiprocessing.errors",
                                                    "torch.multiprocessing.spawn")]
    levels = [log.level for log in loggers]
    for log in loggers:
        log.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for log, level in zip(loggers, levels):
            log.setLevel(level)


def start_method(pcfg: ParallelConfig, device_pref: str) -> str:
    """How the agent starts ranks: the accelerator's choice (fork on CPU, spawn with CUDA) unless asked;
    fork where the device cannot be used in a forked process is one ConfigError line."""
    accel = runtime.accelerator(device_pref)
    if pcfg.start_method == "fork" and not accel.fork_safe:
        raise ConfigError(f"parallel.start_method='fork': {accel.kind.upper()} cannot be used in a forked process "
                          f"(--device {device_pref} runs on {accel.kind}); use --parallel.start_method spawn "
                          f"(or auto)")
    if pcfg.start_method != "auto":
        return pcfg.start_method
    return accel.start_method


def check_layout(pcfg: ParallelConfig, nproc: int, device_pref: str) -> str:
    """The start method of `nproc` ranks on this node; ConfigError, one line, for a layout it cannot run (more
    ranks than GPUs under NCCL, `fork` with CUDA)."""
    method = start_method(pcfg, device_pref)
    accel = runtime.accelerator(device_pref)
    check_ranks_fit(accel, nproc, resolve_backend(pcfg, accel))
    return method


def launch(pcfg: ParallelConfig, nproc: int, threads: int, entry: RankEntry, rank_args: list[str], run_dir=None,
           device_pref: str = "auto", on_stop: Callable[[signal.Signals], int] | None = None) -> int:
    """Run `entry(RANK_ARGS)` on `nproc` ranks per node; returns the exit code.

    `on_stop(signal)`: what the command says and returns when a stop signal (a preemption) was passed on to
    the ranks and they finished (default: one line, exit 128 + the signal's number).

    Does what `torch.distributed.run.run` does (parse torchrun flags, `config_from_args`,
    `elastic_launch`), except that the worker's arguments bypass torchrun's argparse, which
    would otherwise claim abbreviations of its own flags such as `--nproc`.
    """
    import uuid

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous.api import RendezvousTimeoutError
    from torch.distributed.launcher.api import elastic_launch
    from torch.distributed.run import config_from_args, get_args_parser

    method = check_layout(pcfg, nproc, device_pref)  # the refusals first, before anything starts
    os.environ["OMP_NUM_THREADS"] = str(threads)  # torchrun would otherwise force 1 and print a banner
    # Workers sharing the rendezvous TCPStore can read the previous attempt's keys after an elastic
    # restart and hang in process-group init (pytorch/pytorch#135712): give each attempt its own store.
    os.environ.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    args = get_args_parser().parse_args(launcher_argv(pcfg, nproc, entry.__module__) + ["--"])
    if args.standalone:  # as torch.distributed.run.run does for --standalone, on loopback
        args.rdzv_backend, args.rdzv_endpoint, args.rdzv_id = "c10d", "127.0.0.1:0", str(uuid.uuid4())
    rdzv_server = bind_rendezvous(args, pcfg)  # noqa: F841 (held while the agent runs)
    config, cmd, cmd_args = config_from_args(args)
    cmd_args = [a for a in cmd_args if a != "--"] + list(rank_args)
    config.start_method = method
    if config.start_method == "fork":  # a function entrypoint: the agent forks, runs it, watches the exit code
        cmd, cmd_args = _forked_rank, [entry, *rank_args]
        # Forked ranks inherit this process's modules: torch._dynamo, which building the first optimizer imports
        # (2 s on an idle 2-core machine, 11 s on a loaded one), is imported once here, not again by the ranks of
        # every elastic restart (benchmarks/goodput.py).
        import torch._dynamo  # noqa: F401
    # SLURM announces preemption with SIGUSR1; the agent forwards SIGTERM to its workers, which
    # finish their step, write a checkpoint and exit 0. So SIGUSR1 here becomes SIGTERM.
    old_usr1 = signal.signal(signal.SIGUSR1, lambda *_: os.kill(os.getpid(), signal.SIGTERM))
    os.environ[LAUNCHER_ENV] = "1"  # inherited by the ranks: they leave their error line to this process
    started = time.time() - 1.0  # mtimes of a rank's log: a coarse clock and a second of slack
    try:
        with quiet_agent_reports():
            elastic_launch(config=config, entrypoint=cmd)(*cmd_args)
    except ChildFailedError as e:
        line, code = failure_report(e, run_dir, started)
        print(line, file=sys.stderr, flush=True)
        return code
    except RendezvousTimeoutError:
        raise ConfigError(f"the rendezvous at {args.rdzv_endpoint}: {pcfg.nnodes} node(s) expected, not all "
                          f"joined within --parallel.init_timeout_s {pcfg.init_timeout_s:g}; start the same command "
                          f"on every node (with this endpoint and --nnodes), or give --nnodes the number of "
                          f"nodes") from None
    except SignalException as e:
        # The agent passed the signal on: each rank finished its step (and a training wrote a checkpoint).
        if on_stop is not None:
            return on_stop(e.sigval)
        print(f"phalanx: stopped by {e.sigval.name}", file=sys.stderr, flush=True)
        return 128 + int(e.sigval)
    finally:
        signal.signal(signal.SIGUSR1, old_usr1)
        os.environ.pop(LAUNCHER_ENV, None)
    return 0

"""Start N ranks per node through PyTorch's elastic launcher (the engine behind `torchrun`).

`phalanx train --nproc 2 ...` becomes `torchrun --standalone --nproc-per-node 2 -m phalanx train ...`
run in this process by `torch.distributed.run`; multi-node runs use a c10d rendezvous. Nothing
here spawns or watches processes by hand: restarts, failure reports and teardown are the agent's.
"""
from __future__ import annotations

import os
import signal
import sys

from phalanx import runtime
from phalanx.config import ParallelConfig


def resolve_nproc(pcfg: ParallelConfig, device_pref: str, global_batch: int = 512) -> tuple[int, str]:
    """(ranks on this node, why): `auto` is one rank per GPU, or on CPU one single-thread rank per core,
    capped so that every rank still gets at least 32 images per step."""
    if pcfg.nproc != "auto":
        return int(pcfg.nproc), "as asked"
    return runtime.accelerator(device_pref).auto_nproc(global_batch)


def launcher_argv(pcfg: ParallelConfig, nproc: int) -> list[str]:
    """torchrun's own flags for this run (the worker's arguments are passed separately)."""
    argv = ["--nproc-per-node", str(nproc), "--max-restarts", str(pcfg.max_restarts), "--monitor-interval", "0.5"]
    if pcfg.nnodes == 1 and not pcfg.rdzv_endpoint:
        argv += ["--standalone"]
    else:
        argv += ["--nnodes", str(pcfg.nnodes), "--rdzv-backend", "c10d",
                 "--rdzv-endpoint", pcfg.rdzv_endpoint or "127.0.0.1:29400", "--rdzv-id", pcfg.rdzv_id]
        if pcfg.node_rank >= 0:
            argv += ["--node-rank", str(pcfg.node_rank)]
    return argv + ["-m", "phalanx"]


def _forked_rank(*argv: str) -> None:
    """A rank forked from the launcher: `python -m phalanx ARGV`, minus the ~2 s of importing torch.

    The elastic agent has already set RANK, WORLD_SIZE, MASTER_ADDR... in this process. The
    signal handlers copied from the agent (which raise its SignalException) are reset, so the rank
    handles SIGTERM/SIGINT exactly as a spawned one does.
    """
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    from phalanx.cli import main
    code = main(list(argv))
    if code:
        raise SystemExit(code)


def start_method(pcfg: ParallelConfig, device_pref: str) -> str:
    """How the agent starts ranks: the accelerator's choice (fork on CPU, spawn with CUDA) unless asked."""
    if pcfg.start_method != "auto":
        return pcfg.start_method
    return runtime.accelerator(device_pref).start_method


def launch(pcfg: ParallelConfig, nproc: int, threads: int, module_args: list[str], run_dir=None,
           device_pref: str = "auto") -> int:
    """Run `python -m phalanx MODULE_ARGS` on `nproc` ranks per node; returns the exit code.

    Does what `torch.distributed.run.run` does (parse torchrun flags, `config_from_args`,
    `elastic_launch`), except that the worker's arguments bypass torchrun's argparse, which
    would otherwise claim abbreviations of its own flags such as `--nproc`.
    """
    import uuid

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import elastic_launch
    from torch.distributed.run import config_from_args, get_args_parser

    os.environ["OMP_NUM_THREADS"] = str(threads)  # torchrun would otherwise force 1 and print a banner
    # Workers sharing the rendezvous TCPStore can read the previous attempt's keys after an elastic
    # restart and hang in process-group init (pytorch/pytorch#135712): give each attempt its own store.
    os.environ.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    args = get_args_parser().parse_args(launcher_argv(pcfg, nproc) + ["--"])
    if args.standalone:  # as torch.distributed.run.run does for --standalone
        args.rdzv_backend, args.rdzv_endpoint, args.rdzv_id = "c10d", "localhost:0", str(uuid.uuid4())
    config, cmd, cmd_args = config_from_args(args)
    cmd_args = [a for a in cmd_args if a != "--"] + list(module_args)
    config.start_method = start_method(pcfg, device_pref)
    if config.start_method == "fork":  # a function entrypoint: the agent forks, runs it, watches the exit code
        cmd, cmd_args = _forked_rank, list(module_args)
    # SLURM announces preemption with SIGUSR1; the agent forwards SIGTERM to its workers, which
    # finish their step, write a checkpoint and exit 0. So SIGUSR1 here becomes SIGTERM.
    old_usr1 = signal.signal(signal.SIGUSR1, lambda *_: os.kill(os.getpid(), signal.SIGTERM))
    try:
        elastic_launch(config=config, entrypoint=cmd)(*cmd_args)
    except ChildFailedError as e:
        print(f"phalanx: the run failed\n{e}", file=sys.stderr, flush=True)
        return 1
    except SignalException as e:
        # The agent passed the signal on: each rank finished its step and wrote a checkpoint.
        from phalanx.train.checkpoint import find_latest
        saved = run_dir is not None and find_latest(run_dir) is not None
        where = run_dir or "RUN_DIR"
        print(f"phalanx: stopped by {e.sigval.name}; "
              + (f"checkpoint written, resume with `phalanx train --resume {where}`" if saved else
                 f"no checkpoint was written in {where}"), file=sys.stderr, flush=True)
        return 0 if saved else 128 + int(e.sigval)
    finally:
        signal.signal(signal.SIGUSR1, old_usr1)
    return 0

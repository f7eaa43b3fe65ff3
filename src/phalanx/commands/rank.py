"""What every rank runs: `train ARGS` or `eval TARGET ARGS`, in a process that the elastic agent started
(`phalanx train --nproc N`, a user's own `torchrun ... -m phalanx train`) or, for one process, called by the
launcher in its own process.

The launcher (commands/train.py, commands/evaluate.py) has already checked the config, the data and the run
directory, prepared the store and tuned the layout; a rank builds the same config from the same arguments
(the tuner's choices are among them), checks it again (cheap; a user's own torchrun has no launcher), joins
the process group and trains or evaluates. `runtime.launch` is handed `main` as the entry of each rank.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

_LOADED_AT = time.time()  # before torch is imported: where a `--budget` starts without /proc

from phalanx import config as C
from phalanx.commands.args import Parsed, Spec, parse
from phalanx.commands.outcome import run_entry, run_reporting_errors
from phalanx.errors import ConfigError

RANK_ARGS = Spec("phalanx train|eval [TARGET] [--KEY=VALUE]...", "One rank of a training or an evaluation.",
                 positionals=(0, 1), config=True)


def main(argv: list[str]) -> int:
    """A rank's whole life: `train ARGS` or `eval TARGET ARGS`; returns its exit code."""
    return run_reporting_errors(lambda: _rank(argv), say=tell)


def tell(line: str) -> None:
    """A rank's error line: in this rank's log and left for the elastic agent; Phalanx's launcher prints the
    first failing rank's line once (runtime/launch.py), a user's own torchrun's ranks print their own."""
    from phalanx.runtime.launch import tell_from_rank  # torch's elastic modules: only once a rank has failed
    tell_from_rank(line)


def _rank(argv: list[str]) -> int:
    if not argv or argv[0] not in ("train", "eval"):
        raise ConfigError(f"a rank runs `train` or `eval`, not {argv[:1]}")
    # Where this rank is, from its launcher's variables: values no launcher sets are one line before any work
    # (deferred, as the imports below: a rank pays for what it runs).
    from phalanx.runtime.dist import launch_vars
    launch_vars(os.environ)
    sub = argv[0]
    parsed = parse(sub, RANK_ARGS, argv[1:])
    if sub == "train":
        if parsed.positional:
            raise ConfigError(f"unexpected argument {parsed.positional[0]!r} (options look like --optim.lr=0.1)")
        return run("train", train_config(parsed, launcher=False))
    target = Path(parsed.positional[0]) if parsed.positional else None
    if target is None:
        raise ConfigError("`eval` needs the run directory or weights file to evaluate")
    return run("eval", eval_config(target, parsed), target)


def train_config(parsed: Parsed, launcher: bool = True) -> C.Config:
    """The run's config from the command line, checked (one ConfigError line), and its data and run directory
    checked (a DataError or ConfigError line) before anything is written. The launcher (`launcher`) also
    refuses a --resume without a usable checkpoint here, before the run announces itself; a rank finds it again
    as it picks the run directory (train/setup.py), so it does not read the checkpoint twice."""
    from phalanx.tools.checks import checked_config, checked_resume  # deferred: a rank pays for what it runs
    from phalanx.train.setup import check_run_dir  # deferred: a rank pays for what it runs
    cfg = checked_config(parsed.recipe, parsed.pairs)
    if launcher:
        checked_resume(cfg)
    from phalanx.data.shards import is_shards  # deferred: a rank pays for what it runs
    if is_shards(cfg.data.path):  # shards (a URL or an index's folder): the ranks read the index
        pass
    elif cfg.data.stream:
        from phalanx.data.streaming import stream_root  # deferred: a rank pays for what it runs
        stream_root(cfg.data.path)
    elif cfg.data.path not in ("fashion_mnist", "fashion-mnist") or cfg.data.size or cfg.data.channels:
        from phalanx.data.sources import store_path_for  # deferred: a rank pays for what it runs
        store_path_for(cfg.data.path, cfg.data.cache_dir, auto_install=False, size=cfg.data.size,
                       channels=cfg.data.channels)
    check_run_dir(cfg)  # a file or a read-only folder where the run directory goes
    return cfg


def eval_config(target: Path, parsed: Parsed) -> C.Config:
    """The config `phalanx eval TARGET` evaluates with: the run's own config.toml (unless a recipe is named),
    then the command line."""
    from phalanx.tools.checks import checked_config  # deferred: a rank pays for what it runs
    base = (target if target.is_dir() else target.parent) / "config.toml"
    return checked_config(str(base) if base.is_file() and parsed.recipe is None else parsed.recipe, parsed.pairs)


def run(sub: str, cfg: C.Config, target: Path | None = None) -> int:
    """Train or evaluate on this rank (the process group, if any, is joined inside)."""
    if sub == "train":
        from phalanx.train.loop import train  # deferred: a rank pays for what it runs
        train(cfg)
    else:
        from phalanx.train.evaluate import eval_main  # deferred: a rank pays for what it runs
        eval_main(cfg, target)
    return 0


if __name__ == "__main__":  # a spawned rank: `python -m phalanx.commands.rank train ...`
    run_entry(main, _LOADED_AT)

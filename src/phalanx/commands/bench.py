"""`phalanx bench scaling|flops|step|loader|all`: throughput benchmarks (tools/bench.py)."""
from __future__ import annotations

from pathlib import Path

from phalanx.commands.args import Command, Option, Parsed, Spec, run_group
from phalanx.tools import bench


def _scaling(p: Parsed) -> int:
    v = p.values
    bench.check_ranks("--max-world", v.max_world)
    return bench.scaling(v.max_world, v.steps, v.global_batch, v.json, p.extra)


def _flops(p: Parsed) -> int:
    v = p.values
    bench.check_model_args(v.model, v.width, v.size, v.channels)  # before the timing, not in a traceback
    bench.flops(**vars(v))
    return 0


def _step(p: Parsed) -> int:
    v = p.values
    bench.check_ranks("--nproc", v.nproc)
    bench.check_model_args(v.model, v.width)  # step_split times 28x28x1 images
    return bench.step(**vars(v))


def _loader(p: Parsed) -> int:
    return bench.loader(**vars(p.values))


def _all(p: Parsed) -> int:
    return bench.everything(p.values.out, p.values.steps)


def _opt(name: str, default, help: str = "", **kw) -> Option:
    """An option whose type is its default's (int or str)."""
    return Option(name, help, type(default) if default is not None else int, default, **kw)


SUBCOMMANDS = {
    "scaling": Command(Spec("phalanx bench scaling [--max-world N] [--steps S] [--global_batch B] [--json FILE] "
                            "[-- TRAIN OPTIONS]",
                            "img/s for world sizes 1..N and the scaling efficiency; on CPU also compares process x "
                            "thread layouts. Options after `--` go to every `phalanx train` it runs.",
                            options=(_opt("max-world", None, "largest world size (default: GPUs or cores)", minimum=1),
                                     _opt("steps", 90, "optimizer steps per measurement (logged every 29)", minimum=1),
                                     _opt("global_batch", 512, "global batch (fixed across world sizes)", minimum=1),
                                     Option("json", "also write the JSON here", Path, metavar="FILE")),
                            passthrough=True), _scaling),
    "flops": Command(Spec("phalanx bench flops [--model NAME] [--width W] [--size S] [--channels C] [--batch B] "
                          "[--precision auto|bf16|fp32] [--steps N]",
                          "FLOPs per image, achieved FLOP/s in training steps and their fraction of a matmul peak "
                          "measured in the same run.",
                          options=(_opt("model", "phalanx_cnn"), _opt("width", 64, minimum=1),
                                   _opt("size", 28, minimum=1), _opt("channels", 1, choices=(1, 3)),
                                   _opt("batch", 256, "per-process batch", minimum=1),
                                   _opt("precision", "auto", choices=("auto", "bf16", "fp32")),
                                   _opt("steps", 20, minimum=1))), _flops),
    "step": Command(Spec("phalanx bench step [--nproc N] [--model NAME] [--width W] [--global_batch B]",
                         "The split of a training step into compute, gradient all-reduce and optimizer, for 1..N "
                         "single-thread ranks (on CPU).",
                         options=(_opt("nproc", None, "largest number of ranks (default: the cores)", minimum=1),
                                  _opt("model", "phalanx_cnn"), _opt("width", 32, minimum=1),
                                  _opt("global_batch", 512, minimum=1))), _step),
    "loader": Command(Spec("phalanx bench loader [--data D] [--global_batch B] [--steps S]",
                           "img/s of the input pipeline alone.",
                           options=(_opt("data", "fashion_mnist"), _opt("global_batch", 512, minimum=1),
                                    _opt("steps", 40, minimum=1))), _loader),
    "all": Command(Spec("phalanx bench all [--out DIR] [--steps S]",
                        "Every benchmark: one JSON, one table and one PNG (bench.png).",
                        options=(Option("out", "folder for bench.json and bench.png", Path, Path("bench"),
                                        metavar="DIR"),
                                 _opt("steps", 60, "optimizer steps per scaling measurement", minimum=1))), _all),
}


def bench_group(argv: list[str]) -> int:
    return run_group("bench", "Throughput benchmarks; each prints a table and one JSON object (the last line of "
                     "stdout).", SUBCOMMANDS, argv)


COMMANDS = {"bench": bench_group}

"""`phalanx bench scaling|flops|step|loader|plan|all`: throughput benchmarks (tools/bench.py) and the scaling
model (tools/plan.py)."""
from __future__ import annotations

import json
import math
from pathlib import Path

from phalanx.commands.args import Command, Option, Parsed, Spec, run_group
from phalanx.errors import ConfigError
from phalanx.tools import bench, plan


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


MEASURE_BATCH = 64  # at most this many images are timed; compute and activations are scaled to the global batch


def _plan(p: Parsed) -> int:
    v = p.values
    inter = plan.Link(_rate("link", v.link), _finite("latency-us", v.latency_us) * 1e-6)
    intra = plan.Link(_rate("intra-link", v.intra_link), _finite("intra-latency-us", v.intra_latency_us) * 1e-6)
    cluster = plan.Cluster(v.gpus, v.nodes, inter, intra)
    overlap = _finite("overlap", v.overlap)
    if overlap > 1:
        raise ConfigError(f"--overlap {v.overlap}: a share of the backward pass, from 0 to 1")
    opts = plan.Options(overlap=overlap, bucket_bytes=_finite("bucket_mb", v.bucket_mb, 1e-3) * 2**20,
                        powersgd_rank=v.powersgd_rank, reshard_after_forward=v.reshard_after_forward == "true")
    bench.check_model_args(v.model, v.width, v.size, v.channels)  # one line, before anything is measured
    described = plan.describe_model(v.model, v.width, v.size, v.channels, v.classes)
    # Measured only for what is not given: a given compute needs no timing here (its optimizer counts 0 unless
    # --optim-ms), and the activations need one forward.
    given = v.compute_ms is not None and v.activation_gib is not None
    measured = {"param_gather_bytes": 2 if v.precision == "bf16" else 4} if given else \
        plan.measure_step(v.model, v.width, v.size, v.channels, v.classes, v.global_batch, v.precision,
                          steps=0 if v.compute_ms is not None else 5,
                          max_batch=MEASURE_BATCH if v.compute_ms is None else 8)
    compute_s = measured["compute_s"] if v.compute_ms is None else _finite("compute-ms", v.compute_ms) / 1e3
    # A given compute is another machine's: this one's optimizer time would not fit it (0 unless --optim-ms).
    optim_s = _finite("optim-ms", v.optim_ms) / 1e3 if v.optim_ms is not None else \
        0.0 if v.compute_ms is not None else measured["optim_s"]
    acts = measured["activation_bytes"] if v.activation_gib is None else _finite("activation-gib",
                                                                                  v.activation_gib) * 2**30
    work = plan.Workload(tuple(described["shapes"]), compute_s, optim_s, acts,
                         optim_state_per_param=8 if v.optimizer == "adamw" else 4,
                         param_gather_bytes=measured["param_gather_bytes"],
                         unit_params=tuple(described["unit_params"]))
    rows = plan.plan(work, cluster, opts)
    source = "given" if v.compute_ms is not None else \
        f"measured here ({measured['device']}, {measured['precision']}, {measured['threads']} thread(s), " \
        f"{measured['measured_batch']} images scaled to {v.global_batch})"
    out = plan.as_json(rows, cluster, work, opts) | {"compute_source": source, "model": v.model, "width": v.width,
                                                     "global_batch": v.global_batch}
    if v.json:
        print(json.dumps(out))
        return 0
    print(plan.table(rows, cluster, work, opts))
    print(f"compute: {source}; activations {acts / 2**30:.3f} GiB per global batch; see docs/parallel.md"
          f"#choosing-a-strategy-phalanx-bench-plan for the formulas and assumptions")
    return 0


def _rate(name: str, text: str) -> float:
    try:
        return plan.parse_rate(text)
    except ValueError as e:
        raise ConfigError(f"--{name} {e}") from None


def _finite(name: str, value: float, least: float = 0.0) -> float:
    if not (math.isfinite(value) and value >= least):
        raise ConfigError(f"--{name} {value}: must be a finite number >= {least:g}")
    return value


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
    "plan": Command(Spec("phalanx bench plan --gpus N --nodes M --link 100Gb/s [--intra-link 300GB/s] [--model NAME] "
                         "[--global_batch B] [--compute-ms T] [--json]",
                         "Predicted step time, communication share and memory per rank of DDP, DDP with bf16 or "
                         "PowerSGD gradient compression, FSDP and HSDP on N GPUs per node and M nodes, from the "
                         "compute of one step (measured here, or --compute-ms), the model's parameters and ring/tree "
                         "collective costs.",
                         options=(_opt("gpus", 8, "ranks (GPUs) per node", minimum=1),
                                  _opt("nodes", 1, "nodes", minimum=1),
                                  _opt("link", "100Gb/s", "network bandwidth of one node (shared by its ranks)"),
                                  Option("latency-us", "network latency per message in us", float, 10.0),
                                  _opt("intra-link", "300GB/s", "bandwidth between ranks of one node (NVLink)"),
                                  Option("intra-latency-us", "latency within a node in us", float, 3.0),
                                  _opt("model", "phalanx_cnn"), _opt("width", 64, minimum=1),
                                  _opt("size", 28, minimum=1), _opt("channels", 1, choices=(1, 3)),
                                  _opt("classes", 10, minimum=2),
                                  _opt("global_batch", 512, "images per step over all ranks", minimum=1),
                                  _opt("precision", "fp32", choices=("auto", "bf16", "fp32")),
                                  _opt("optimizer", "sgd", "sgd (momentum: 4 bytes/param) or adamw (8)",
                                       choices=("sgd", "adamw")),
                                  Option("compute-ms", "forward+backward ms of the global batch on one device "
                                         "(default: measured here)", float),
                                  Option("optim-ms", "optimizer ms per step on one device (default: measured; 0 with "
                                         "--compute-ms)", float),
                                  Option("activation-gib", "activation GiB of the global batch on one device "
                                         "(default: measured)", float),
                                  Option("overlap", "share of backward that communication hides behind, 0..1",
                                         float, 1.0),
                                  Option("bucket_mb", "DDP bucket MiB", float, 25.0),
                                  _opt("powersgd_rank", 1, minimum=1),
                                  _opt("reshard_after_forward", "true", choices=("true", "false")),
                                  Option("json", "print one JSON object instead of the table", flag=True))),
                    _plan),
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

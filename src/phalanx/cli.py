"""`phalanx` command line: parse, build the config, call one function per sub-command.

    phalanx train [--recipe R] [--KEY=VALUE ...]      train (in-process, or N ranks via the elastic launcher)
    phalanx eval RUN_DIR|WEIGHTS [--KEY=VALUE ...]    evaluate saved weights on a test split
    phalanx predict RUN_DIR|WEIGHTS IMAGE|FOLDER...   classify image files: top-k table, CSV or JSON
    phalanx export RUN_DIR --format torchscript|onnx|safetensors   a deployable model, checked
    phalanx data prepare SRC OUT [--size N] ...       build a prepared store
    phalanx models [PATTERN]                          house, torchvision and timm models (matching PATTERN)
    phalanx bench scaling|flops [...]                 throughput benchmarks
    phalanx doctor [--json] [--backend gloo|nccl]     check this machine before a long run
    phalanx report RUN_DIR [RUN_DIR ...] [--out DIR]  plots and one HTML page of runs (several: compared)
    phalanx tune [--KEY=VALUE ...]                    measure what `auto` chooses for this training, print the table
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from phalanx import config as C

_LOADED_AT = time.time()  # before torch is imported: where a `--budget` starts without /proc (budget.mark_entry)

USAGE = __doc__.split("\n\n", 1)[1]

TRAIN_HELP = """usage: phalanx train [--recipe NAME|FILE] [--KEY=VALUE | --KEY VALUE]...

Train a classifier. Values come from the defaults, then the recipe (default: fashion_mnist),
then the command line. A leaf name alone works when unambiguous (--lr means --optim.lr).
Shortcuts: --data X (= --data.path X), --nproc N, --resume RUN_DIR, --nnodes, --node-rank,
--rdzv-endpoint HOST:PORT, --max-restarts K.

Launch modes (the same flags work under `torchrun ... -m phalanx train`):
  phalanx train                                one process
  phalanx train --nproc 4                      4 ranks on this node (elastic launcher, gloo or NCCL)
  phalanx train --nproc auto                   one rank per GPU, or the best CPU layout
  phalanx train --nproc 8 --nnodes 2 --node-rank 0 --rdzv-endpoint HOST0:29400   on each node

options:
  --recipe NAME|FILE  TOML recipe ({recipes})
  -h, --help          show this help
{fields}
"""


def _split_args(argv: list[str]) -> tuple[list[str], list[tuple[str, str]], str | None, bool]:
    """(positional, [(key, value)], recipe, help) from `--k=v`, `--k v` and bare `--flag` (true)."""
    pos, pairs, recipe, want_help = [], [], None, False
    i = 0
    while i < len(argv):
        a = argv[i]
        if a in ("-h", "--help"):
            want_help = True
        elif a.startswith("--"):
            key, eq, val = a[2:].partition("=")
            if not eq:
                if i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                    val = argv[i + 1]
                    i += 1
                else:
                    val = "true"
            if key == "recipe":
                recipe = val
            else:
                pairs.append(({"data": "data.path"}.get(key, key), val))
        else:
            pos.append(a)
        i += 1
    return pos, pairs, recipe, want_help


def _explicit_keys(pairs: list[tuple[str, str]], recipe: str | None) -> set[str]:
    """The fields the user set (command line, or a recipe the user named): the tuner leaves them alone."""
    return {C.canonical_key(k) for k, _ in pairs} | (C.recipe_keys(C.resolve_recipe(recipe)) if recipe else set())


def _fail(msg: str) -> int:
    print(f"phalanx: error: {msg}", file=sys.stderr)
    return 2


def _train_help() -> str:
    recipes = ", ".join(sorted(p.stem for p in C.RECIPES_DIR.glob("*.toml")))
    return TRAIN_HELP.format(recipes=recipes, fields=C.help_text())


def cmd_train(argv: list[str]) -> int:
    from phalanx.runtime.dist import is_worker
    from phalanx.train.budget import command_start
    if not is_worker():
        command_start(new=True)  # --budget counts from here; the ranks this process starts inherit it
        from phalanx.train.budget import TUNED_RATE_ENV
        os.environ.pop(TUNED_RATE_ENV, None)  # set again below only by this command's own tuning
    pos, pairs, recipe, want_help = _split_args(argv)
    if want_help:
        print(_train_help())
        return 0
    if pos:
        return _fail(f"unexpected argument {pos[0]!r} (options look like --optim.lr=0.1)")
    cfg = C.build_config(recipe, pairs)  # ConfigError -> exit 2 before anything is written
    if not is_worker():
        _refuse_impossible_layout(cfg)
    if cfg.data.stream:
        from phalanx.data.streaming import stream_root
        stream_root(cfg.data.path)  # DataError before any run dir
    elif cfg.data.path not in ("fashion_mnist", "fashion-mnist") or cfg.data.size or cfg.data.channels:
        from phalanx.data.sources import store_path_for
        store_path_for(cfg.data.path, cfg.data.cache_dir, auto_install=False, size=cfg.data.size,
                       channels=cfg.data.channels)  # DataError before any run dir
    from phalanx.runtime import dist as penv
    from phalanx.train.setup import check_data, check_run_dir
    check_run_dir(cfg)  # a file or a read-only folder where the run directory goes: ConfigError, exit 2
    if not penv.is_worker() and not cfg.data.stream:
        # Prepared here, once, before any rank starts (ranks then map it): data a run cannot use (one
        # class, no test split, fewer images than the global batch) is one line, not one per rank.
        from phalanx.data.sources import cache_dir, open_on_node
        store = open_on_node(cfg.data.path, cfg.data.cache_dir, cfg.data.auto_install, 0, cfg.data.size,
                             cfg.data.channels)
        check_data(cfg, store)
        if cfg.tune:  # what `auto` leaves open, measured here (or cached) and handed to every rank
            from phalanx.tune import tune_run
            explicit = _explicit_keys(pairs, recipe)
            argv = list(argv) + tune_run(cfg, explicit, model_input_shape(cfg, store.shape), len(store.classes),
                                         cache_dir(cfg.data.cache_dir) / "tune.json")
    return _run_or_launch("train", cfg, argv)


def _refuse_impossible_layout(cfg: C.Config) -> None:
    """An explicit --nproc this node cannot run (more ranks than GPUs under NCCL, `fork` with CUDA): one line
    before any data is prepared or any layout timed, not minutes later. launch() checks again, `auto` included."""
    if cfg.parallel.nproc == "auto" or (int(cfg.parallel.nproc) == 1 and cfg.parallel.nnodes == 1):
        return
    from phalanx.runtime.launch import check_layout
    check_layout(cfg.parallel, int(cfg.parallel.nproc), cfg.device)


def model_input_shape(cfg: C.Config, shape: tuple[int, int, int]) -> tuple[int, int, int]:
    """(h, w, c) of what the model sees: the augment.crop_size crop of the stored images when set."""
    side = cfg.augment.crop_size
    return (side, side, shape[2]) if side else tuple(shape)


def _run_or_launch(sub: str, cfg: C.Config, argv: list[str], target: Path | None = None) -> int:
    from phalanx.data.mix import mix_layout_error, world_fits
    from phalanx.runtime import dist as penv
    from phalanx.runtime.launch import launch, resolve_nproc

    fits = world_fits(cfg) if sub == "train" else None
    nproc, why = resolve_nproc(cfg.parallel, cfg.device, cfg.global_batch // cfg.grad_accum, fits)
    if fits is not None and not penv.is_worker():
        from phalanx.errors import ConfigError
        # Here, once, rather than from every rank (each would print it inside the elastic agent's report).
        if why_not := mix_layout_error(cfg.global_batch, cfg.grad_accum, nproc * cfg.parallel.nnodes):
            raise ConfigError(why_not)
    if penv.is_worker() or (nproc == 1 and cfg.parallel.nnodes == 1):
        if sub == "train":
            from phalanx.train.loop import train
            train(cfg)
            return 0
        from phalanx.train.evaluate import eval_main
        eval_main(cfg, target)
        return 0
    threads = penv.threads_per_rank(cfg.parallel, nproc)
    print(f"phalanx: launching {nproc} rank(s) x {threads} thread(s) per node on {cfg.parallel.nnodes} node(s) "
          f"({why})", flush=True)
    worker_argv = list(argv)
    run_dir = Path(cfg.run_dir) if cfg.run_dir else None
    if sub == "train" and not cfg.run_dir:
        # One run directory for all ranks and all elastic restarts: restarted groups resume from it.
        run_dir = Path(cfg.ckpt.resume or cfg.default_run_dir())
        worker_argv.append(f"--run_dir={run_dir}")
    return launch(cfg.parallel, nproc, threads, [sub] + worker_argv, run_dir, cfg.device)


def cmd_eval(argv: list[str]) -> int:
    pos, pairs, recipe, want_help = _split_args(argv)
    if want_help or not pos:
        print("usage: phalanx eval RUN_DIR|WEIGHTS.safetensors [--data X] [--nproc N] [--eval_batch N] "
              "[--tta_flip=false] [--KEY=VALUE]...\n\nEvaluate saved weights on the test split of --data "
              "(default: the data the run trained on). Prints accuracy and loss as JSON; identical for any --nproc.\n"
              "Every `phalanx train` option applies (see `phalanx train --help`), e.g. --precision, "
              "--threads_per_rank, --parallel.*.")
        return 0 if want_help else 2
    target = Path(pos[0])
    run_dir = target if target.is_dir() else target.parent
    if not target.exists():
        return _fail(f"{target}: no such run directory or weights file")
    base = run_dir / "config.toml"
    cfg = C.build_config(str(base) if base.is_file() and recipe is None else recipe, pairs)
    return _run_or_launch("eval", cfg, argv, target=target)


MODELS_HELP = """usage: phalanx models [PATTERN]

Without PATTERN: the house models and a curated list of torchvision's, with their parameters (10 classes,
3 channels, 32x32 images, --model.width 32), and what timm offers when it is installed.
With PATTERN (a wildcard such as '*convnext*' or 'resnet5*'): every torchvision and timm model name matching it.
Any torchvision classification model works by name (--model.name resnet50); timm's as --model.name timm:NAME."""


def cmd_models(argv: list[str]) -> int:
    pos, pairs, _, want_help = _split_args(argv)
    if want_help or pairs or len(pos) > 1:
        print(MODELS_HELP)
        return 0 if want_help else 2
    from phalanx.models import listing
    for line in listing(pos[0] if pos else ""):
        print(line)
    return 0


PREDICT_HELP = """usage: phalanx predict RUN_DIR|WEIGHTS IMAGE|FOLDER... [--top 3] [--format table|csv|json] [--batch 64]

Classify image files (PNG, JPEG, ...) with saved weights, preprocessed as the training data was
(size, channels, normalisation). Folders are searched recursively for image files.
  --top K          the K most probable classes of each image (default 3)
  --format F       table (default), csv (one row per image: file,top1,p1,...) or json (one object per line)
  --batch N        images per forward pass (default 64)"""


def _int_option(opts: dict, key: str, default: int) -> int:
    raw = opts.pop(key, str(default))
    if not raw.isdigit() or int(raw) < 1:
        from phalanx.errors import ConfigError
        raise ConfigError(f"--{key} {raw}: must be a whole number >= 1")
    return int(raw)


def _choice_option(opts: dict, key: str, choices: tuple[str, ...]) -> str:
    raw = opts.pop(key, choices[0])
    if raw not in choices:
        from phalanx.errors import ConfigError
        raise ConfigError(f"--{key} {raw}: choose one of {', '.join(choices)}")
    return raw


def _no_other_options(opts: dict, command: str) -> None:
    if opts:
        from phalanx.errors import ConfigError
        raise ConfigError(f"unknown option --{next(iter(opts))} for `phalanx {command}` (phalanx {command} --help)")


def cmd_predict(argv: list[str]) -> int:
    pos, pairs, _, want_help = _split_args(argv)
    if want_help or len(pos) < 2:
        print(PREDICT_HELP)
        return 0 if want_help else 2
    from phalanx.observe.console import prediction_writer
    from phalanx.train.evaluate import list_images, load_weights, predict_files
    opts = dict(pairs)
    top, batch = _int_option(opts, "top", 3), _int_option(opts, "batch", 64)
    fmt = _choice_option(opts, "format", ("table", "csv", "json"))
    _no_other_options(opts, "predict")
    files = list_images([Path(p) for p in pos[1:]])
    model, meta = load_weights(Path(pos[0]))
    write = prediction_writer(fmt, min(top, meta["num_classes"]), files, meta["classes"])
    for row in predict_files(model, meta, files, top, batch):
        write(row)
    return 0


EXPORT_HELP = """usage: phalanx export RUN_DIR|WEIGHTS [IMAGE|FOLDER...] --format torchscript|onnx|safetensors [--out PATH]
                      [--input uint8|float]

Write the run's final model with its input normalisation built in: it takes uint8 (0..255) or float
(0..1) images (N, C, H, W) and returns logits. The export is then run on real test images (those
named, else the test split of the run's prepared store) and compared with the PyTorch model; the
largest logit difference is printed and must be within 1e-4 x the largest |logit| (at least 1e-4).
  --format F     torchscript (torch.jit.load), onnx (onnxruntime; pip install phalanx[export]),
                 or safetensors (state_dict + metadata; phalanx.export.load_safetensors_export)
  --out PATH     default RUN_DIR/export/model.pt|.onnx|.safetensors
  --input T      the input type of an ONNX graph, which has exactly one: uint8 (default) or float"""


def cmd_export(argv: list[str]) -> int:
    pos, pairs, _, want_help = _split_args(argv)
    if want_help or not pos:
        print(EXPORT_HELP)
        return 0 if want_help else 2
    from phalanx import export as X
    opts = dict(pairs)
    if "format" not in opts:
        return _fail(f"--format is required: one of {', '.join(X.FORMATS)}")
    fmt = _choice_option(opts, "format", X.FORMATS)
    input_dtype = _choice_option(opts, "input", ("uint8", "float"))
    out = opts.pop("out", None)
    _no_other_options(opts, "export")
    target = Path(pos[0])
    if not target.exists():
        return _fail(f"{target}: no such run directory or weights file")
    try:
        path, check = X.export(target, fmt, Path(out) if out else None, [Path(p) for p in pos[1:]], input_dtype)
    except X.ExportError as e:
        print(f"phalanx: error: {e}", file=sys.stderr)
        return 1
    print(X.describe(path, fmt, check), flush=True)
    return 0


def cmd_doctor(argv: list[str]) -> int:
    from phalanx import doctor
    return doctor.cli(argv)


def cmd_tune(argv: list[str]) -> int:
    """Measure the candidates of the `auto` fields for the training these options describe, afresh, and
    print them as a table; the decision is cached for the next `phalanx train` with the same options."""
    pos, pairs, recipe, want_help = _split_args(argv)
    if want_help or pos:
        print("usage: phalanx tune [--recipe R] [--KEY=VALUE]...\n\nMeasure what `phalanx train` with these "
              "options would choose where they say auto (--nproc: ranks x threads on CPU; --precision: bf16 vs "
              "fp32 where bf16 is native; channels-last unless --model.channels_last is given), print the table, "
              "and cache the decision for the next run.")
        return 0 if want_help else 2
    from phalanx import tune
    from phalanx.data.sources import cache_dir, open_on_node
    cfg = C.build_config(recipe, pairs)
    store = open_on_node(cfg.data.path, cfg.data.cache_dir, cfg.data.auto_install, 0, cfg.data.size,
                         cfg.data.channels)
    explicit = _explicit_keys(pairs, recipe)
    q = tune.question_for(cfg, explicit, model_input_shape(cfg, store.shape), len(store.classes))
    if q is None or not q.open:
        print("phalanx tune: nothing to measure: these options leave no choice to `auto` on this machine")
        return 0
    device = tune.device_of(q)
    choice, record = tune.decide(q, cache_dir(cfg.data.cache_dir) / "tune.json",
                                 lambda c: tune.measure_choice(c, q, device=device), refresh=True)
    print(tune.table(record))
    print(f"phalanx: {tune.summary_line(choice, record)}")
    return 0


def cmd_report(argv: list[str]) -> int:
    from phalanx.observe import report
    return report.cli(argv)


def cmd_data(argv: list[str]) -> int:
    from phalanx.data import prepare
    return prepare.cli(argv)


def cmd_bench(argv: list[str]) -> int:
    from phalanx.bench import cli as bench_cli
    return bench_cli(argv)


COMMANDS = {"train": cmd_train, "tune": cmd_tune, "eval": cmd_eval, "predict": cmd_predict, "data": cmd_data,
            "models": cmd_models, "bench": cmd_bench, "export": cmd_export, "doctor": cmd_doctor,
            "report": cmd_report}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: phalanx COMMAND [options]   (phalanx COMMAND --help for each)\n\n" + USAGE)
        return 0 if argv else 2
    cmd = COMMANDS.get(argv[0])
    if cmd is None:
        import difflib
        close = difflib.get_close_matches(argv[0], COMMANDS, n=1)
        return _fail(f"unknown command {argv[0]!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
                     + f"; commands: {', '.join(COMMANDS)}")
    from phalanx.errors import CheckpointError, ConfigError, DataError
    try:
        return cmd(argv[1:])
    except ConfigError as e:
        return _fail(str(e))
    except (DataError, CheckpointError) as e:
        print(f"phalanx: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("phalanx: interrupted", file=sys.stderr)
        return 130


def entry() -> None:
    from phalanx.train.budget import mark_entry
    mark_entry(_LOADED_AT)  # a `--budget` counts from the command's start, `import torch` included
    from torch.distributed.elastic.multiprocessing.errors import record
    # `record` writes this rank's traceback where the elastic agent reports it as the root cause.
    leave(record(main)())


def leave(code: int | None) -> None:
    """End the process with `code`: everything Python's own exit runs for it (the atexit functions: logging's
    flush, multiprocessing's children), then `os._exit`, without the interpreter's teardown. Freeing torch's
    modules and libraries took ~1.1 s after every command on a 2-core AMD EPYC (~1 s on an H100 machine), which
    a user waits through for nothing and a `--budget` pays for. With a non-daemon thread still running, or an
    interpreter without `atexit._run_exitfuncs`, the usual exit instead."""
    import atexit
    import contextlib
    import threading
    run_exitfuncs = getattr(atexit, "_run_exitfuncs", None)
    others = [t for t in threading.enumerate() if t is not threading.current_thread() and not t.daemon]
    if run_exitfuncs is None or others or threading.current_thread() is not threading.main_thread():
        sys.exit(code)
    run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed or broken pipe: nothing more can reach it
            stream.flush()
    os._exit(code if isinstance(code, int) else 0 if code is None else 1)


if __name__ == "__main__":
    entry()

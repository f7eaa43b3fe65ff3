"""`phalanx eval` (launcher side: it starts the ranks, each running commands/rank.py) and `phalanx predict`."""
from __future__ import annotations

from pathlib import Path

from phalanx.commands import rank
from phalanx.commands.args import Command, Option, Parsed, Spec
from phalanx.commands.train import run_ranks
from phalanx.errors import ConfigError
from phalanx.observe.console import prediction_writer
from phalanx.train.evaluate import list_images, load_weights, predict_files


def evaluate(p: Parsed) -> int:
    """Evaluate saved weights on this node's ranks; prints accuracy and loss as JSON."""
    target = Path(p.positional[0])
    if not target.exists():
        raise ConfigError(f"{target}: no such run directory or weights file")
    return run_ranks("eval", rank.eval_config(target, p), p.argv, target=target)


def predict(p: Parsed) -> int:
    """Classify image files with saved weights: one row per image."""
    v = p.values
    files = list_images([Path(x) for x in p.positional[1:]])
    model, meta = load_weights(Path(p.positional[0]))
    write = prediction_writer(v.format, min(v.top, meta["num_classes"]), files, meta["classes"])
    for row in predict_files(model, meta, files, v.top, v.batch):
        write(row)
    return 0


EVAL = Spec("phalanx eval RUN_DIR|WEIGHTS.safetensors [--data X] [--nproc N] [--eval_batch N] [--tta_flip=false] "
            "[--KEY=VALUE]...",
            "Evaluate saved weights on the test split of --data (default: the data the run trained on). Prints "
            "accuracy and loss as JSON; identical for any --nproc.\nEvery `phalanx train` option applies (see "
            "`phalanx train --help`), e.g. --precision, --threads_per_rank, --parallel.*.",
            positionals=(1, 1), config=True, paths=True)

PREDICT = Spec("phalanx predict RUN_DIR|WEIGHTS IMAGE|FOLDER... [--top 3] [--format table|csv|json] [--batch 64]",
               "Classify image files (PNG, JPEG, ...) with saved weights, preprocessed as the training data was\n"
               "(size, channels, normalisation). Folders are searched recursively for image files.",
               options=(Option("top", "the K most probable classes of each image", int, 3, minimum=1, metavar="K"),
                        Option("format", "table, csv (one row per image: file,top1,p1,...) or json (one object "
                               "per line)", str, "table", choices=("table", "csv", "json")),
                        Option("batch", "images per forward pass", int, 64, minimum=1)),
               positionals=(2, None), paths=True)

COMMANDS = {"eval": Command(EVAL, evaluate), "predict": Command(PREDICT, predict)}

"""Exact distributed evaluation: contiguous chunks per rank, no padding, sums all-reduced.

Each chunk's loss sum lands in its own slot of a vector that is all-reduced (adding zeros is
exact) and then summed in chunk order on every rank; correct counts are integers. So accuracy and
loss are bit-identical for any world size, given the same per-rank thread count.
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from phalanx.data import shards
from phalanx.data.augment import Normalize, eval_crop_of
from phalanx.data.imageio import IMAGE_EXTENSIONS, decode_chw, is_image_file
from phalanx.data.loader import SplitOnDevice, eval_chunks, to_nchw
from phalanx.data.sources import cache_dir, open_on_node
from phalanx.data.streaming import StreamSplit, stream_workers
from phalanx.durable import is_numbers
from phalanx.errors import CheckpointError, DataError, first_line
from phalanx.models import build_model, model_refusal
from phalanx.parallel.collectives import all_reduce_sum
from phalanx.parallel.model_state import check_fits, load_into
from phalanx.runtime import dist as rdist
from phalanx.train.checkpoint import read_json_object, show
from phalanx.train.precision import Precision


@torch.no_grad()
def evaluate(model: nn.Module, data: SplitOnDevice, normalize: Normalize, chunk: int, world: int, rank: int,
             precision: Precision | None = None, tta_flip: bool = False, lockstep: bool = False) -> dict:
    """{'loss', 'acc', 'correct', 'count'} over the whole split, identical on every rank; with more than
    5 classes also 'top5' and 'correct_top5' (the label among the 5 largest logits; with 5 or fewer classes
    that is every image, so it is left out).

    `lockstep` (a sharded model, whose forward gathers parameters from every rank): a rank with
    fewer chunks than another runs one-image forwards whose output is dropped, so that every rank
    takes part in as many gathers."""
    was_training = model.training
    model.eval()
    n = len(data.split)
    n_chunks = (n + chunk - 1) // chunk
    device = normalize.scale.device  # NCCL reduces device tensors only
    loss_sums = torch.zeros(n_chunks, dtype=torch.float64, device=device)
    # top-1, top-5 correct, chunks with more than 5 classes (so a rank without chunks learns it too): integers,
    # summed exactly in any order
    correct = torch.zeros(3, dtype=torch.int64, device=device)
    mine = eval_chunks(n, chunk, world, rank)
    most = max(len(eval_chunks(n, chunk, world, r)) for r in range(world)) if lockstep else len(mine)
    for i in range(most):
        c, lo, hi = mine[i] if i < len(mine) else (None, 0, 1)
        x, y = data.gather(torch.arange(lo, hi))
        x = normalize.for_eval(to_nchw(x))  # resize + centre crop when augment.crop_size asks
        with precision.autocast() if precision is not None else contextlib.nullcontext():
            logits = model(x).float()
            if tta_flip:
                logits = (logits + model(x.flip(3)).float()) * 0.5
        if c is None:
            continue  # a lockstep forward only
        loss_sums[c] = F.cross_entropy(logits.double(), y, reduction="sum")
        correct[0] += (logits.argmax(1) == y).sum()
        if logits.shape[1] > 5:
            correct[1] += (logits.topk(5, dim=1).indices == y[:, None]).any(1).sum()
            correct[2] += 1
    all_reduce_sum(loss_sums)
    all_reduce_sum(correct)
    model.train(was_training)
    count, count5, has_top5 = correct.tolist()  # one device-to-host read
    res = {"loss": float(loss_sums.sum().item() / max(1, n)), "acc": count / max(1, n), "correct": count, "count": n}
    if has_top5:
        res.update(top5=count5 / max(1, n), correct_top5=count5)
    return res


# ----------------------------------------------------------------------------- saved weights

def load_weights(target: Path, device: torch.device | None = None) -> tuple[nn.Module, dict]:
    """Model rebuilt from `model.safetensors` + `model.json` (a run directory or the weights file).

    model.json is checked field by field and the model it names is first built on the meta device
    (no memory) and compared with the weights: any content gives one CheckpointError line.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file


    target = Path(target)
    weights = target / "model.safetensors" if target.is_dir() else target
    meta_path = weights.with_suffix(".json")
    if not weights.is_file():
        raise CheckpointError(f"{weights}: no weights file (a finished run directory holds model.safetensors)")
    if not meta_path.is_file():
        raise CheckpointError(f"{meta_path}: missing; it names the model that {weights.name} belongs to")
    meta = read_json_object(meta_path, "model description")
    _check_model_meta(meta, meta_path)
    try:
        sd = load_file(weights)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{weights}: not a valid safetensors file ({e})") from None
    with torch.device("meta"):  # the shapes it names, at no cost whatever its numbers say
        check_fits(_build_from_meta(meta, meta_path), sd, weights)
    model = _build_from_meta(meta, meta_path)
    load_into(model, sd, weights)
    return model.to(device or torch.device("cpu")).eval(), meta


# model.json: field -> (check, what it must be); width, norm and act may be absent (older files).
_SIZE_LIMIT = 1 << 20


def _is_size(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= _SIZE_LIMIT


_MODEL_FIELDS = {
    "model": (lambda v: isinstance(v, str), "a model name"),
    "num_classes": (_is_size, f"an integer from 1 to {_SIZE_LIMIT}"),
    "in_channels": (lambda v: _is_size(v) and v in (1, 3), "1 or 3"),
    "image_size": (_is_size, f"an integer from 1 to {_SIZE_LIMIT}"),
}
_MODEL_OPTIONAL = {
    "width": (_is_size, f"an integer from 1 to {_SIZE_LIMIT}"),
    "norm": (lambda v: v in ("batch", "group", "none"), "one of batch, group, none"),
    "act": (lambda v: v in ("relu", "gelu", "silu"), "one of relu, gelu, silu"),
    "small_input": (lambda v: isinstance(v, bool), "true or false"),
}


def _check_model_meta(meta: dict, path: Path) -> None:
    """One CheckpointError line naming the first field of model.json that load and predict cannot use."""

    for key, (_, words) in _MODEL_FIELDS.items():
        if key not in meta:
            raise CheckpointError(f"{path}: field {key!r} is missing; it should be {words}")
    for key, (ok, words) in (*_MODEL_FIELDS.items(), *_MODEL_OPTIONAL.items()):
        if key in meta and not ok(meta[key]):
            raise CheckpointError(f"{path}: field {key!r} must be {words}, found {show(meta[key])}")
    if model_refusal(meta["model"]) is not None:
        raise CheckpointError(f"{path}: names model {show(meta['model'])}, which this version of Phalanx does not "
                              f"have ({model_refusal(meta['model'])})")
    c, n = meta["in_channels"], meta["num_classes"]
    for key in ("mean", "std"):
        if not is_numbers(meta.get(key), c):
            raise CheckpointError(f"{path}: field {key!r} must be a list of {c} numbers (one per channel), found "
                                  f"{show(meta.get(key))}")
    classes = meta.get("classes")
    if not (isinstance(classes, list) and len(classes) == n and all(isinstance(x, str) for x in classes)):
        raise CheckpointError(f"{path}: field 'classes' must be a list of {n} class names (num_classes), found "
                              f"{show(classes)}")


def _build_from_meta(meta: dict, path: Path) -> nn.Module:
    try:
        return build_model(meta["model"], meta["num_classes"], meta["in_channels"], meta["image_size"],
                           meta.get("width", 64), meta.get("norm", "batch"), meta.get("act", "relu"),
                           meta.get("small_input", False))
    except (ValueError, KeyError, TypeError, RuntimeError, IndexError, ZeroDivisionError) as e:
        raise CheckpointError(f"{path}: cannot build the model it describes ({type(e).__name__}: "
                              f"{first_line(e)})") from None


def eval_main(cfg, target: Path) -> dict:
    """`phalanx eval`: evaluate saved weights on the test split of cfg.data, on this rank."""

    env = rdist.init(cfg.parallel, cfg.device)
    try:
        model, meta = load_weights(target, env.device)
        if cfg.model.channels_last:
            model = model.to(memory_format=torch.channels_last)
        from_shards = shards.is_shards(cfg.data.path)
        if from_shards:  # tar shards (a URL): the test split is read through the node's cache by DataLoader workers
            store = shards.open_shards(cfg.data.path, cfg.data.size, cfg.data.channels, cache_dir(cfg.data.cache_dir),
                                       cfg.data.shard_cache, env.is_main)
        else:
            store = open_on_node(cfg.data.path, cfg.data.cache_dir, cfg.data.auto_install, env.local_rank,
                                 cfg.data.size, cfg.data.channels)
        split = store["test" if "test" in store.splits else "val"]
        if store.shape[2] != meta["in_channels"] or len(store.classes) != meta["num_classes"]:
            raise DataError(f"{store.path}: {store.shape} images with {len(store.classes)} classes do not fit "
                            f"{target} ({meta['in_channels']} channels, {meta['num_classes']} classes)")
        normalize = Normalize(meta["mean"], meta["std"], env.device, cfg.model.channels_last, eval_crop_of_meta(meta))
        data = (StreamSplit(split, env.device, stream_workers(cfg.data.stream_workers, env.local_world)) if from_shards
                else SplitOnDevice(split, env.device, resident=False))
        prec = Precision.from_config(cfg.precision, env.accel)
        res = evaluate(model, data, normalize, cfg.eval_batch, env.world, env.rank, prec, cfg.tta_flip)
        res.update(weights=str(target), data=str(store.path), world=env.world)
        if env.is_main:
            print(json.dumps(res), flush=True)
        return res
    finally:
        rdist.teardown()


def eval_crop_of_meta(meta: dict) -> tuple[int, float] | None:
    """Evaluation's (crop side, fraction) for weights trained on augment.crop_size crops of stored
    images of image_size (model.json's crop_size and eval_crop), or None."""
    crop, frac = meta.get("crop_size"), meta.get("eval_crop", 0.875)
    number = isinstance(frac, (int, float)) and not isinstance(frac, bool)
    if isinstance(crop, int) and not isinstance(crop, bool) and crop > 0 and number and 0 < frac <= 1:
        return eval_crop_of(crop, frac, meta["image_size"])
    return None


def list_images(paths: list[Path]) -> list[Path]:
    """Files named, plus the image files under folders named (recursively, sorted); DataError for a
    missing path or a folder without images. A file named on its own is taken whatever its suffix."""

    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and is_image_file(f))
            if not found:
                raise DataError(f"{p}: no image files in this folder or below (suffixes: "
                                f"{', '.join(sorted(IMAGE_EXTENSIONS))})")
            files += found
        elif p.exists():
            files.append(p)
        else:
            raise DataError(f"{p}: no such file or folder")
    return files


@torch.no_grad()
def predict_files(model: nn.Module, meta: dict, files: list[Path], top: int = 3, batch: int = 64) -> Iterator[dict]:
    """Top-k classes of image files by a model from `load_weights`, preprocessed like the training store
    (size, channels, normalisation), `batch` files at a time; yields one row per file, in order. A file
    that cannot be decoded raises DecodeError naming it."""

    size, ch = meta["image_size"], meta["in_channels"]
    normalize = Normalize(meta["mean"], meta["std"], torch.device("cpu"), False, eval_crop_of_meta(meta))
    k = min(top, meta["num_classes"])
    for lo in range(0, len(files), batch):
        part = files[lo:lo + batch]
        x = normalize.for_eval(torch.stack([decode_chw(f, size, ch) for f in part]))  # DecodeError names the file
        vals, idx = model(x).float().softmax(1).topk(k, dim=1)
        for f, v, i in zip(part, vals.tolist(), idx.tolist()):
            yield {"file": str(f), "top": [{"class": meta["classes"][c], "p": round(p, 6)} for p, c in zip(v, i)]}

"""Checkpoints: safe (safetensors + JSON, nothing unpickled), atomic, verified, keep-last-K.

    run_dir/checkpoints/step-00001234/
        model.safetensors  optim.safetensors  [ema.safetensors]
        state.json         epoch, step, schedule, scaler, per-rank RNG, config, metrics so far
        COMPLETE           sha256 of every file above; written last, after fsync and rename
    run_dir/checkpoints/latest   name of the newest complete checkpoint

A checkpoint directory counts only when COMPLETE exists and its checksums match, so a kill at any
moment of a write leaves the previous checkpoint the newest valid one. Only rank 0 writes: the
model and optimizer are replicated under DDP, and the small per-rank RNG states are gathered.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from phalanx import faults
from phalanx.durable import fsync_path, sha256_file
from phalanx.errors import CheckpointError

MARKER = "COMPLETE"


# ----------------------------------------------------------------------------- nested state <-> (JSON, tensors)

def pack(obj: Any, tensors: dict[str, torch.Tensor], prefix: str = "t") -> Any:
    """Replace tensors in a nested structure by references; dict keys keep their int/str type."""
    if isinstance(obj, torch.Tensor):
        key = f"{prefix}.{len(tensors)}"
        tensors[key] = obj.detach().cpu().contiguous().clone()
        return {"__tensor__": key}
    if isinstance(obj, dict):
        return {"__dict__": [[k, pack(v, tensors, prefix)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return {"__list__": [pack(v, tensors, prefix) for v in obj], "tuple": isinstance(obj, tuple)}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} in a checkpoint")


def unpack(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__dict__" in obj:
            return {k: unpack(v, tensors) for k, v in obj["__dict__"]}
        if "__list__" in obj:
            items = [unpack(v, tensors) for v in obj["__list__"]]
            return tuple(items) if obj.get("tuple") else items
    return obj


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj))


# ----------------------------------------------------------------------------- write

def save(ckpt_root: Path, global_step: int, model_sd: dict, optim_sd: dict, state: dict,
         ema_sd: dict | None = None, keep: int = 2, rank: int = 0) -> Path:
    """Write one checkpoint atomically and prune old ones; returns its directory."""
    ckpt_root.mkdir(parents=True, exist_ok=True)
    name = f"step-{global_step:08d}"
    final = ckpt_root / name
    tmp = ckpt_root / f".{name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_file({k: v.detach().cpu().contiguous() for k, v in model_sd.items()}, tmp / "model.safetensors")
    faults.maybe("ckpt_write", rank, global_step)  # tests: a kill between two files of a write
    opt_tensors: dict[str, torch.Tensor] = {}
    state = dict(state, optim=pack(optim_sd, opt_tensors, "optim"))
    save_file(opt_tensors, tmp / "optim.safetensors")
    if ema_sd is not None:
        save_file({k: v.detach().cpu().contiguous() for k, v in ema_sd.items()}, tmp / "ema.safetensors")
    rng_tensors: dict[str, torch.Tensor] = {}
    state["rng"] = pack(state.get("rng"), rng_tensors, "rng")
    save_file(rng_tensors or {"none": torch.zeros(0)}, tmp / "rng.safetensors")
    _write_json(tmp / "state.json", state)
    files = sorted(p.name for p in tmp.iterdir())
    for f in files:
        fsync_path(tmp / f)
    marker = {"files": {f: sha256_file(tmp / f) for f in files}, "global_step": global_step}
    _write_json(tmp / (MARKER + ".tmp"), marker)
    fsync_path(tmp / (MARKER + ".tmp"))
    os.replace(tmp / (MARKER + ".tmp"), tmp / MARKER)
    fsync_path(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_path(ckpt_root)
    latest_tmp = ckpt_root / ".latest.tmp"
    latest_tmp.write_text(name)
    fsync_path(latest_tmp)
    os.replace(latest_tmp, ckpt_root / "latest")
    _prune(ckpt_root, keep)
    return final


def _prune(ckpt_root: Path, keep: int) -> None:
    done = sorted(p for p in ckpt_root.glob("step-*") if (p / MARKER).is_file())
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in ckpt_root.glob(".step-*.tmp-*"):  # leftovers of killed writes
        if stale.name.rsplit("-", 1)[-1] != str(os.getpid()):
            shutil.rmtree(stale, ignore_errors=True)


# ----------------------------------------------------------------------------- read

def verify(ckpt: Path) -> dict:
    """The checkpoint's marker after checking every checksum; CheckpointError otherwise."""
    mpath = ckpt / MARKER
    if not mpath.is_file():
        raise CheckpointError(f"{ckpt}: incomplete checkpoint (no {MARKER} marker); it was interrupted while written")
    try:
        marker = json.loads(mpath.read_text())
        files = marker["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{mpath}: unreadable marker ({e})") from None
    for f, digest in files.items():
        p = ckpt / f
        if not p.is_file():
            raise CheckpointError(f"{p}: missing file listed in {MARKER}")
        if sha256_file(p) != digest:
            raise CheckpointError(f"{p}: checksum mismatch; the file was truncated or modified after it was written")
    return marker


def find_latest(run_or_ckpt: Path) -> Path | None:
    """Newest valid checkpoint under a run directory (or the checkpoint directory itself)."""
    p = Path(run_or_ckpt)
    if (p / MARKER).exists() or p.name.startswith("step-"):
        try:
            verify(p)
            return p
        except CheckpointError:
            return None
    root = p / "checkpoints" if (p / "checkpoints").is_dir() else p
    if not root.is_dir():
        return None
    candidates = sorted((c for c in root.glob("step-*") if c.is_dir()), reverse=True)
    pointer = root / "latest"
    if pointer.is_file():
        named = root / pointer.read_text().strip()
        if named in candidates:
            candidates.remove(named)
            candidates.insert(0, named)
    for c in candidates:
        try:
            verify(c)
            return c
        except CheckpointError:
            continue  # a write that was killed: fall back to the previous one
    return None


def why_no_checkpoint(run_or_ckpt: Path) -> str:
    """One line: why `find_latest` found nothing usable here."""
    p = Path(run_or_ckpt)
    if not p.exists():
        return f"{p}: no such run directory or checkpoint"
    root = p / "checkpoints" if (p / "checkpoints").is_dir() else p
    cands = sorted(c for c in root.glob("step-*") if c.is_dir()) if not (p / MARKER).exists() else [p]
    if not cands:
        return f"{p}: holds no checkpoint (looked for {root}/step-*)"
    problems = []
    for c in cands:
        try:
            verify(c)
        except CheckpointError as e:
            problems.append(str(e))
    return f"{p}: no valid checkpoint: " + " | ".join(problems)


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a valid safetensors file ({e})") from None


def load(ckpt: Path) -> dict:
    """{'model', 'optim', 'ema' (or None), 'state'} of a verified checkpoint, on the CPU."""
    verify(ckpt)
    try:
        state = json.loads((ckpt / "state.json").read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{ckpt / 'state.json'}: unreadable ({e})") from None
    optim = unpack(state.pop("optim"), _load_tensors(ckpt / "optim.safetensors"))
    state["rng"] = unpack(state.get("rng"), _load_tensors(ckpt / "rng.safetensors"))
    ema = _load_tensors(ckpt / "ema.safetensors") if (ckpt / "ema.safetensors").is_file() else None
    return {"model": _load_tensors(ckpt / "model.safetensors"), "optim": optim, "ema": ema, "state": state}


def load_into(module: torch.nn.Module, sd: dict[str, torch.Tensor], source: Path) -> None:
    """load_state_dict with one clear line when the weights belong to another model."""
    own = module.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    shapes = [f"{k}: {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in sd and sd[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        detail = "; ".join(filter(None, [
            f"missing {', '.join(missing[:3])}{'...' if len(missing) > 3 else ''}" if missing else "",
            f"unexpected {', '.join(unexpected[:3])}{'...' if len(unexpected) > 3 else ''}" if unexpected else "",
            f"shape {shapes[0]}" if shapes else ""]))
        raise CheckpointError(f"{source}: weights do not match the model ({detail}); "
                              f"was it written by another model or width?")
    module.load_state_dict(sd)

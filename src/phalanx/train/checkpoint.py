"""Checkpoints: safe (safetensors + JSON, nothing unpickled), atomic, verified, keep-last-K.

    run_dir/checkpoints/step-00001234/
        model.safetensors  optim.safetensors  [ema.safetensors]
        state.json         epoch, step, schedule, scaler, per-rank RNG, config, metrics so far
        COMPLETE           sha256 of every file above; written last, after fsync and rename
    run_dir/checkpoints/latest   name of the newest complete checkpoint

A checkpoint directory counts only when COMPLETE exists and its checksums match, so a kill at any
moment of a write leaves the previous checkpoint the newest valid one. Only rank 0 writes: the
model and optimizer are replicated under DDP, and the small per-rank RNG states are gathered.
Under FSDP every rank writes its shards (sharded_checkpoint.py), and `seal` below finishes the write.

Nothing here deletes a checkpoint that may be the only copy of a user's work: `_prune` removes old
complete ones beyond `keep` and leftovers of dead writers, never a folder `set_aside` renamed to
`<name>.corrupt`. Every JSON file read here is checked field by field, so any content gives one
CheckpointError line naming the file and the field.
"""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from phalanx.durable import fsync_path, is_count, json_type, plain_file_name, read_json, sha256_file
from phalanx.errors import CheckpointError, first_line
from phalanx.train import faults

MARKER = "COMPLETE"
CORRUPT = ".corrupt"   # suffix of a checkpoint folder set aside by `set_aside`
# The files `load` reads: COMPLETE must list each one that exists (ema.safetensors only with an EMA).
LOADED_FILES = ("model.safetensors", "optim.safetensors", "rng.safetensors", "state.json", "ema.safetensors")
DCP_METADATA = ".metadata"
"""The metadata file of a sharded (DCP) checkpoint (train/sharded_checkpoint.py writes it)."""


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


# ----------------------------------------------------------------------------- JSON checks (one line each)

def show(value: Any, width: int = 40) -> str:
    """A JSON value as it is written, cut to `width` characters: safe in a one-line message."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError, RecursionError):
        text = json_type(value)
    return text if len(text) <= width else text[:width - 3] + "..."


def read_json_object(path: Path, what: str) -> dict:
    """A JSON file that must hold an object; CheckpointError naming the file otherwise."""
    obj = read_json(path, CheckpointError, what)
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: the {what} must be a JSON object, found {json_type(obj)}; the file is "
                              f"damaged or was not written by Phalanx")
    return obj


# ----------------------------------------------------------------------------- write

def save(ckpt_root: Path, global_step: int, model_sd: dict, optim_sd: dict, state: dict,
         ema_sd: dict | None = None, keep: int = 2, rank: int = 0) -> Path:
    """Write one checkpoint atomically and prune old ones; returns its directory.

    Leftovers of dead writers go first, so space a full disk left behind is freed before this write.
    An OSError while writing (a full disk, say) removes this write's partial folder and becomes one
    CheckpointError line; the previous checkpoints stay as they were.
    """
    ckpt_root = Path(ckpt_root)
    try:
        tmp = start_write(ckpt_root, global_step)
    except OSError as e:
        raise _write_error(ckpt_root, e) from None
    try:
        return _save(ckpt_root, tmp, global_step, model_sd, optim_sd, state, ema_sd, keep, rank)
    except (OSError, SafetensorError) as e:  # safetensors reports its I/O errors as SafetensorError
        shutil.rmtree(tmp, ignore_errors=True)
        raise _write_error(ckpt_root, e) from None


def _write_error(ckpt_root: Path, e: OSError | SafetensorError) -> CheckpointError:
    """One line for a failed write, saying what to do about it."""
    code = e.errno if isinstance(e, OSError) else None
    if code is None:  # SafetensorError: "Error while serializing: I/O error: ... (os error 28)"
        m = re.search(r"\((?:os error|code:) (\d+)", str(e))
        code = int(m.group(1)) if m else None
    why = (e.strerror if isinstance(e, OSError) else None) or (os.strerror(code) if code else first_line(e))
    if code in (errno.ENOSPC, errno.EDQUOT):
        return CheckpointError(f"{ckpt_root}: cannot write the checkpoint ({why}); free space or set --ckpt.keep lower")
    return CheckpointError(f"{ckpt_root}: cannot write the checkpoint ({why}); check that the run directory is "
                           f"writable and its file system has room")


def start_write(ckpt_root: Path, global_step: int) -> Path:
    """The empty temporary folder a write of `global_step` fills (this process's, named by its pid),
    after removing other writers' leftovers, whose space a full disk may need. OSError if it cannot."""
    ckpt_root.mkdir(parents=True, exist_ok=True)
    remove_stale_writes(ckpt_root)
    tmp = ckpt_root / f".step-{global_step:08d}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def _save(ckpt_root: Path, tmp: Path, global_step: int, model_sd: dict, optim_sd: dict, state: dict,
          ema_sd: dict | None, keep: int, rank: int) -> Path:
    save_file({k: v.detach().cpu().contiguous() for k, v in model_sd.items()}, tmp / "model.safetensors")
    faults.maybe("ckpt_write", rank, global_step)  # tests: a kill between two files of a write
    opt_tensors: dict[str, torch.Tensor] = {}
    state = dict(state, optim=pack(optim_sd, opt_tensors, "optim"))
    save_file(opt_tensors, tmp / "optim.safetensors")
    if ema_sd is not None:
        save_file({k: v.detach().cpu().contiguous() for k, v in ema_sd.items()}, tmp / "ema.safetensors")
    return seal(ckpt_root, tmp, global_step, state, keep)


def step_name(global_step: int) -> str:
    """The folder name of the checkpoint of `global_step`."""
    return f"step-{global_step:08d}"


def seal(ckpt_root: Path, tmp: Path, global_step: int, state: dict, keep: int) -> Path:
    """Finish a write whose tensors are in `tmp`: the RNG states and state.json beside them, every file
    fsynced, the COMPLETE marker with their checksums written last, then the folder renamed into place,
    `latest` pointed at it and old checkpoints pruned. Returns the checkpoint's directory."""
    name = step_name(global_step)
    final = ckpt_root / name
    rng_tensors: dict[str, torch.Tensor] = {}
    state = dict(state, rng=pack(state.get("rng"), rng_tensors, "rng"))
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
        _make_way(final)
    os.replace(tmp, final)
    fsync_path(ckpt_root)
    latest_tmp = ckpt_root / ".latest.tmp"
    latest_tmp.write_text(name)
    fsync_path(latest_tmp)
    os.replace(latest_tmp, ckpt_root / "latest")
    _prune(ckpt_root, keep)
    return final


def _make_way(final: Path) -> None:
    """Clear the folder of a checkpoint written again at the same step: a valid one is replaced, a
    corrupt one is set aside for inspection, never deleted."""
    try:
        verify(final)
    except CheckpointError:
        set_aside(final)
        return
    shutil.rmtree(final)


def _prune(ckpt_root: Path, keep: int) -> None:
    # Only `step-NNNNNNNN` folders: a `step-NNNNNNNN.corrupt` one set aside for inspection is never removed.
    done = sorted(p for p in ckpt_root.glob("step-*") if _is_step_name(p.name) and (p / MARKER).is_file())
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    remove_stale_writes(ckpt_root)


def _is_step_name(name: str) -> bool:
    return name.startswith("step-") and name[5:].isdigit()


def remove_stale_writes(ckpt_root: Path) -> list[Path]:
    """Remove the `.step-*.tmp-PID` folders of other processes: only rank 0 of a run writes, so they
    are leftovers of writers that were killed or ran out of space. Returns what was removed."""
    removed = []
    for stale in ckpt_root.glob(".step-*.tmp-*"):
        if stale.name.rsplit("-", 1)[-1] != str(os.getpid()):
            shutil.rmtree(stale, ignore_errors=True)
            removed.append(stale)
    return removed


def set_aside(ckpt: Path) -> Path:
    """Rename a corrupt checkpoint folder to `<name>.corrupt` (`.corrupt-2`, ... when taken) so that
    nothing overwrites or prunes it, and return the new path. Nothing is deleted."""
    ckpt = Path(ckpt)
    target = ckpt.with_name(ckpt.name + CORRUPT)
    n = 2
    while target.exists() or target.is_symlink():
        target = ckpt.with_name(f"{ckpt.name}{CORRUPT}-{n}")
        n += 1
    try:
        os.rename(ckpt, target)
    except OSError as e:
        raise CheckpointError(f"{ckpt}: cannot set the corrupt checkpoint aside as {target.name} "
                              f"({e.strerror or first_line(e)})") from None
    fsync_path(ckpt.parent)
    return target


# ----------------------------------------------------------------------------- read

def verify(ckpt: Path) -> dict:
    """The checkpoint's marker after checking every checksum; CheckpointError otherwise."""
    ckpt = Path(ckpt)
    mpath = ckpt / MARKER
    if not mpath.is_file():
        raise CheckpointError(f"{ckpt}: incomplete checkpoint (no {MARKER} marker); it was interrupted while written")
    marker = read_json_object(mpath, "marker")
    files = marker.get("files")
    if not isinstance(files, dict) or not files:
        raise CheckpointError(f"{mpath}: field 'files' must be a non-empty object of file name -> sha256, found "
                              f"{json_type(files)}; the marker was modified after it was written")
    if "global_step" in marker and not is_count(marker["global_step"]):
        raise CheckpointError(f"{mpath}: field 'global_step' must be a non-negative integer, found "
                              f"{show(marker['global_step'])}")
    for f, digest in files.items():
        if not plain_file_name(f):
            raise CheckpointError(f"{mpath}: lists {f!r}, which is not a plain file name inside {ckpt}; refusing "
                                  f"to read it (the marker was modified after it was written)")
        if not isinstance(digest, str):
            raise CheckpointError(f"{mpath}: the sha256 of {f!r} must be a string, found {show(digest)}")
        p = ckpt / f
        if p.is_symlink():  # a checkpoint holds only the files `save` wrote, never links elsewhere
            raise CheckpointError(f"{p}: a symbolic link, listed in {MARKER}; a checkpoint holds plain files only")
        if not p.is_file():
            raise CheckpointError(f"{p}: missing file listed in {MARKER}")
        if sha256_file(p) != digest:
            raise CheckpointError(f"{p}: checksum mismatch; the file was truncated or modified after it was written")
    return marker


def find_latest(run_or_ckpt: Path, skipped: list[tuple[Path, str]] | None = None) -> Path | None:
    """Newest valid checkpoint under a run directory (or the checkpoint directory itself).

    `skipped`, when given, receives (checkpoint folder, one-line reason) for each checkpoint found
    invalid on the way, newest first: a caller can warn about them and `set_aside` those newer
    than the one returned. Folders set aside (`step-*.corrupt*`) are never candidates.
    """
    p = Path(run_or_ckpt)
    if (p / MARKER).exists() or p.name.startswith("step-"):
        try:
            verify(p)
            return p
        except CheckpointError as e:
            if skipped is not None:
                skipped.append((p, str(e)))
            return None
    root = p / "checkpoints" if (p / "checkpoints").is_dir() else p
    if not root.is_dir():
        return None
    for c in _candidates(root):
        try:
            verify(c)
            return c
        except CheckpointError as e:  # e.g. a write that was killed: fall back to the previous one
            if skipped is not None:
                skipped.append((c, str(e)))
    return None


def _candidates(root: Path) -> list[Path]:
    """The checkpoint folders of `root`, newest first, the one `latest` names before the others."""
    candidates = sorted((c for c in root.glob("step-*") if _is_step_name(c.name) and c.is_dir()), reverse=True)
    pointer = root / "latest"
    if pointer.is_file():
        try:
            named = root / pointer.read_text().strip()
        except (OSError, ValueError):  # an unreadable pointer only loses the ordering hint
            return candidates
        if named in candidates:
            candidates.remove(named)
            candidates.insert(0, named)
    return candidates


def why_no_checkpoint(run_or_ckpt: Path) -> str:
    """One line: why `find_latest` found nothing usable here."""
    p = Path(run_or_ckpt)
    if not p.exists():
        return f"{p}: no such run directory or checkpoint"
    root = p / "checkpoints" if (p / "checkpoints").is_dir() else p
    cands = sorted(c for c in root.glob("step-*") if _is_step_name(c.name) and c.is_dir()) \
        if not (p / MARKER).exists() else [p]
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
        raise CheckpointError(f"{path}: not a valid safetensors file ({first_line(e)})") from None


# state.json fields that resume reads besides position, optim and rng: (JSON types, in words).
_STATE_FIELDS: dict[str, tuple[tuple[type, ...], str]] = {
    "scheduler": ((dict,), "an object"),
    "scaler": ((dict, type(None)), "an object or null"),
    "history": ((list,), "a list"),
    "world": ((int,), "a positive integer"),
    "global_batch": ((int,), "a positive integer"),
    "config": ((dict,), "an object"),
    "reason": ((str,), "a string"),
    "format": ((str,), "a string"),
    "budget_spent_s": ((int, float), "a number of seconds"),
}
_POSITION = ("epoch", "step", "global_step")


def check_state(state: dict, path: Path) -> None:
    """The fields of a checkpoint's state.json that resume reads, by type; one CheckpointError line
    naming the field otherwise (`state` as read, before `optim` and `rng` are unpacked)."""
    if state.get("format", "dcp") != "dcp":
        raise CheckpointError(f"{path}: field 'format' must be \"dcp\" (sharded) or absent, found {show(state['format'])}")
    pos = state.get("position")
    if not isinstance(pos, dict) or sorted(pos) != sorted(_POSITION) or not all(map(is_count, pos.values())):
        raise CheckpointError(f"{path}: field 'position' must be an object of non-negative integers "
                              f"{', '.join(_POSITION)}, found {show(pos, 80)}")
    for key in ("scheduler",) if state.get("format") == "dcp" else ("optim", "scheduler"):
        if key not in state:
            raise CheckpointError(f"{path}: field {key!r} is missing; the file was not written by Phalanx or was "
                                  f"modified after it was written")
    for key, (types, words) in _STATE_FIELDS.items():
        v = state.get(key)
        bad = key in state and (not isinstance(v, types) or isinstance(v, bool) or (key in ("world", "global_batch")
                                                                                    and v < 1))
        if bad:
            raise CheckpointError(f"{path}: field {key!r} must be {words}, found {show(v)}")
    if any(not isinstance(h, dict) for h in state.get("history", [])):
        raise CheckpointError(f"{path}: field 'history' must be a list of objects (one per evaluation)")


def _unpack_field(state: dict, key: str, tensors: dict[str, torch.Tensor], path: Path) -> Any:
    try:
        return unpack(state.get(key), tensors)
    except (KeyError, TypeError, ValueError, IndexError, AttributeError, RecursionError) as e:
        raise CheckpointError(f"{path}: field {key!r} is malformed ({type(e).__name__}: {first_line(e)}); the file "
                              f"was modified after it was written") from None


def _check_unpacked(optim: Any, rng: Any, path: Path) -> None:
    groups = optim.get("param_groups") if isinstance(optim, dict) else None
    if (not isinstance(optim, dict) or not isinstance(optim.get("state"), dict) or not isinstance(groups, list)
            or not all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in groups)):
        raise CheckpointError(f"{path}: field 'optim' is not an optimizer state (an object with 'state' and "
                              f"'param_groups', each group with 'params')")
    if rng is None:
        return
    ok = isinstance(rng, dict) and all(
        isinstance(r, dict) and "torch" in r
        and all(isinstance(t, torch.Tensor) and t.dtype == torch.uint8 for t in r.values()) for r in rng.values())
    if not ok:
        raise CheckpointError(f"{path}: field 'rng' must map each rank to its generator states ('torch' and "
                              f"others, uint8 tensors)")


def load(ckpt: Path) -> dict:
    """{'model', 'optim', 'ema' (or None), 'state', 'sharded'} of a verified checkpoint, on the CPU. A
    sharded one (FSDP) gives its state only: `sharded_checkpoint.load_into` reads its tensors into the
    model, at any world size.

    Every file read is listed (and so checksummed) in COMPLETE, and state.json is checked field by
    field: any damage or tampering is one CheckpointError line naming the file and the field.
    """
    ckpt = Path(ckpt)
    listed = verify(ckpt)["files"]
    spath = ckpt / "state.json"
    if "state.json" not in listed:
        raise CheckpointError(f"{spath}: not listed in {ckpt / MARKER}, so it cannot be checked; the checkpoint "
                              f"was not written by Phalanx or was modified after it was written")
    state = read_json_object(spath, "checkpoint state")
    check_state(state, spath)
    sharded = state.get("format") == "dcp"
    if sharded:
        _check_sharded_files(ckpt, listed)
    else:
        for f in LOADED_FILES:
            if f not in listed and (f != "ema.safetensors" or (ckpt / f).exists()):
                raise CheckpointError(f"{ckpt / f}: not listed in {ckpt / MARKER}, so it cannot be checked; the "
                                      f"checkpoint was not written by Phalanx or was modified after it was written")
    rng = _unpack_field(state, "rng", _load_tensors(ckpt / "rng.safetensors"), spath)
    if sharded:
        _check_unpacked({"state": {}, "param_groups": []}, rng, spath)
        state["rng"] = rng
        return {"model": None, "optim": None, "ema": None, "state": state, "sharded": True}
    optim = _unpack_field(state, "optim", _load_tensors(ckpt / "optim.safetensors"), spath)
    _check_unpacked(optim, rng, spath)
    state.pop("optim")
    state["rng"] = rng
    ema = _load_tensors(ckpt / "ema.safetensors") if "ema.safetensors" in listed else None
    return {"model": _load_tensors(ckpt / "model.safetensors"), "optim": optim, "ema": ema, "state": state,
            "sharded": False}


def _check_sharded_files(ckpt_dir: Path, listed: dict) -> None:
    """The files a sharded load reads must be listed (and so checksummed) in COMPLETE."""
    for f in (DCP_METADATA, "rng.safetensors", "state.json"):
        if f not in listed:
            raise CheckpointError(f"{ckpt_dir / f}: not listed in {ckpt_dir / MARKER}, so it cannot be "
                                  f"checked; the checkpoint was not written by Phalanx or was modified after it was "
                                  f"written")
    on_disk = {p.name for p in ckpt_dir.iterdir() if p.name.endswith(".distcp")}
    if not on_disk or not on_disk <= set(listed):
        raise CheckpointError(f"{ckpt_dir}: shard files {sorted(on_disk - set(listed)) or '(none)'} are not listed "
                              f"in {MARKER}; the checkpoint was modified after it was written")

"""Sharded checkpoints (FSDP): every rank writes its own shards with torch.distributed.checkpoint (DCP).

    run_dir/checkpoints/step-00001234/
        .metadata  __0_0.distcp  __1_0.distcp ...   DCP: model, optimizer, EMA; each rank's shards
        rng.safetensors  state.json ("format": "dcp")
        COMPLETE            sha256 of every file above; written last

The guarantees of checkpoint.py, whose write and read halves this reuses: rank 0 names one
temporary folder, every rank writes its shards into it, and when DCP's save has returned on every
rank (it gathers their results) rank 0 writes the RNG states and state.json, fsyncs every file,
writes the marker last and renames the folder into place. A load checks every checksum first.

DCP reshards when it loads, so a sharded checkpoint resumes at any world size, under FSDP or DDP:
the model's own state (sharded or not) is the template DCP fills. Its `.metadata` file is a
pickle; it is read here by an unpickler that builds only DCP's metadata classes, so a crafted
file cannot run code (the `.distcp` files hold tensors, read by DCP with weights_only=True).
"""
from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
import torch.nn as nn
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from phalanx.errors import CheckpointError, first_line
from phalanx.parallel.collectives import broadcast_object
from phalanx.parallel.model_state import check_fits
from phalanx.train import checkpoint as ckpt
from phalanx.train import faults

FORMAT = "dcp"
METADATA = ckpt.DCP_METADATA


# ----------------------------------------------------------------------------- write (collective)

def save(ckpt_root: Path, global_step: int, model_sd: dict, optim_sd: dict, state: dict, ema_sd: dict | None,
         keep: int, rank: int) -> Path | None:
    """Every rank writes its shards; rank 0 seals the checkpoint. Returns its directory on rank 0.
    A failure on any rank is one CheckpointError line on every rank; the previous checkpoints stay."""
    ckpt_root = Path(ckpt_root)
    tmp, err = None, None
    if rank == 0:
        try:
            tmp = ckpt.start_write(ckpt_root, global_step)
        except OSError as e:
            err = str(ckpt._write_error(ckpt_root, e))
    tmp, err = broadcast_object((tmp, err))
    if err:
        raise CheckpointError(err)
    try:
        dcp.save({"model": model_sd, "optim": optim_sd, **({"ema": ema_sd} if ema_sd is not None else {})},
                 checkpoint_id=tmp)
    except (Exception, CheckpointException) as e:  # DCP gathers every rank's failure, raised on every rank
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"{ckpt_root}: cannot write the sharded checkpoint ({_why(e)}); check that the run "
                              f"directory is writable and its file system has room") from None
    faults.maybe("ckpt_write", rank, global_step)  # tests: a kill after the shards, before the marker
    path = None
    if rank == 0:
        try:
            path = ckpt.seal(ckpt_root, tmp, global_step, dict(state, format=FORMAT), keep)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            err = str(ckpt._write_error(ckpt_root, e))
    err = broadcast_object(err)  # every rank waits for the seal, and fails with it
    if err:
        raise CheckpointError(err)
    return path


# ----------------------------------------------------------------------------- read

def is_sharded(state: dict) -> bool:
    return state.get("format") == FORMAT


def load_into(ckpt_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer, ema: nn.Module | None) -> None:
    """Fill the model, optimizer and EMA (sharded or not, at any world size) from a sharded checkpoint.
    Collective when the ranks are in a process group: every rank reads the parts it holds."""
    import torch.distributed as dist
    reader = SafeReader(ckpt_dir)
    meta = reader.read_metadata()
    _check_fits(model, meta, "model", ckpt_dir)
    if ema is not None:
        _check_fits(ema, meta, "ema", ckpt_dir)
    sd = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)}
    if ema is not None and any(k.startswith("ema.") for k in meta.state_dict_metadata):
        sd["ema"] = ema.state_dict()
    try:
        dcp.load(sd, storage_reader=reader, no_dist=not (dist.is_initialized() and dist.get_world_size() > 1))
    except (Exception, CheckpointException) as e:  # a torn or foreign shard: DCP names the key, we the folder
        raise CheckpointError(f"{ckpt_dir}: cannot read the sharded checkpoint ({_why(e)})") from None
    set_model_state_dict(model, sd["model"])
    try:
        set_optimizer_state_dict(model, optimizer, sd["optim"])
    except (ValueError, KeyError, RuntimeError) as e:
        raise CheckpointError(f"{ckpt_dir}: optimizer state does not match ({first_line(e)})") from None
    if "ema" in sd:
        ema.load_state_dict(sd["ema"])


def _why(e: BaseException) -> str:
    """The first line of the first rank's failure inside DCP's CheckpointException (a BaseException)."""
    failures = getattr(e, "failures", None)
    if isinstance(failures, dict) and failures:
        rank, failure = sorted(failures.items())[0]
        inner = failure[0] if isinstance(failure, tuple) else failure
        return f"rank {rank}: {type(inner).__name__}: {first_line(inner)}"
    return f"{type(e).__name__}: {first_line(e)}"


def _check_fits(module: nn.Module, meta, prefix: str, ckpt_dir: Path) -> None:
    """One line when the checkpoint's tensors under `prefix` belong to another model (names or shapes)."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata
    shapes = {k[len(prefix) + 1:]: torch.empty(v.size, device="meta")
              for k, v in meta.state_dict_metadata.items()
              if k.startswith(prefix + ".") and isinstance(v, TensorStorageMetadata)}
    if prefix == "ema" and not shapes:
        return  # written without an EMA: the EMA starts from the loaded weights' next update
    check_fits(module, shapes, ckpt_dir / METADATA)


class SafeReader(FileSystemReader):
    """DCP's file reader, with the metadata read by an unpickler that builds DCP's own classes only."""

    def read_metadata(self, *args, **kwargs):
        path = Path(self.path) / METADATA
        try:
            with open(path, "rb") as f:
                metadata = _MetadataUnpickler(f).load()
        except (pickle.UnpicklingError, EOFError, AttributeError, ValueError, TypeError, OSError) as e:
            raise CheckpointError(f"{path}: not a DCP metadata file ({first_line(e)})") from None
        from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
        if not isinstance(metadata, Metadata):
            raise CheckpointError(f"{path}: not a DCP metadata file (holds a {type(metadata).__name__})")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = getattr(self, "load_id", None)
        return metadata


class _MetadataUnpickler(pickle.Unpickler):
    """Builds the classes of torch.distributed.checkpoint's metadata and nothing else."""

    _MODULES = ("torch.distributed.checkpoint.metadata",)
    _NAMES = {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
              ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"),
              ("pathlib", "WindowsPath"), ("pathlib", "PureWindowsPath"), ("collections", "OrderedDict")}

    def find_class(self, module: str, name: str):
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if module in self._MODULES or (module, name) in self._NAMES:
            obj = super().find_class(module, name)
            if module in self._MODULES and not isinstance(obj, type):
                raise pickle.UnpicklingError(f"{module}.{name} is not a metadata class")
            return obj
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: not part of DCP's metadata")

"""`phalanx export`: a run's final weights as a self-contained model, checked against PyTorch.

Every format holds the model with the run's input normalisation built in:

    images (N, C, H, W) -> logits (N, num_classes)
    uint8 images: pixel values 0..255, as decoded; float images: 0..1 (uint8 / 255)
    H = W = the stored image side; for a run trained on crops (augment.crop_size), the crop side: the
    images resized and centre-cropped as evaluation does (torchvision's Resize + CenterCrop; model.json's
    crop_size and eval_crop), which the export's `input` metadata spells out. The resize stays outside the
    graph, as in torchvision's and timm's exports: it depends on each image's own size.

    torchscript   torch.jit.load(PATH)(images): uint8 or float; model.json's contents ride along as
                  the extra file `phalanx.json`
    onnx          one input `images` of the type chosen with --input (uint8 by default, an ONNX graph
                  has one input type), dynamic batch; model.json's contents in the metadata
                  property `phalanx`; needs `pip install phalanx[export]` (onnx, onnxscript, onnxruntime)
    safetensors   the wrapper's state_dict (`model.*`, `mean`, `std`) with model.json's contents in
                  the header; `load_safetensors_export(PATH)` rebuilds it (uint8 or float)

After writing, the export's logits are compared with those of the PyTorch model (load_weights +
the training normalisation) on real test images: the images named on the command line, else up
to CHECK_IMAGES images spread over the test split of the store the run trained on. The file is
moved to its place only when the largest difference is within TOLERANCE.
"""
from __future__ import annotations

import json
import os
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from phalanx import config as C
from phalanx.data.augment import Normalize
from phalanx.data.geometry import eval_resize_crop
from phalanx.data.imageio import decode_chw
from phalanx.data.loader import evenly_spaced
from phalanx.data.sources import store_path_for
from phalanx.data.store import is_store, open_store
from phalanx.errors import CheckpointError, ConfigError, DataError
from phalanx.parallel.model_state import load_into
from phalanx.paths import check_destination, real
from phalanx.train.evaluate import _build_from_meta, _check_model_meta, eval_crop_of_meta, list_images, load_weights

FORMATS = ("torchscript", "onnx", "safetensors")
SUFFIX = {"torchscript": ".pt", "onnx": ".onnx", "safetensors": ".safetensors"}
TOLERANCE = 1e-4
"""Largest |logit difference| accepted, relative to the largest |logit| of the PyTorch model (at least 1)."""
CHECK_IMAGES = 256
INSTALL_HINT = "pip install phalanx[export]"


class ExportError(ValueError):
    """An export that could not be written or does not match the PyTorch model: one line."""


class ExportedClassifier(nn.Module):
    """The trained model behind the training normalisation: uint8 (0..255) or float (0..1) images in."""

    def __init__(self, model: nn.Module, mean: list[float], std: list[float]):
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # The arithmetic of data.augment.Normalize, so uint8 input gives the training loop's floats bit for bit.
        shift = -self.mean / self.std
        if images.dtype == torch.uint8:
            x = torch.addcmul(shift, images.float(), 1.0 / (255.0 * self.std))
        else:
            x = torch.addcmul(shift, images.float(), 1.0 / self.std)
        return self.model(x)


@dataclass
class Check:
    """How the export compared with the PyTorch model."""
    images: int
    source: str
    max_diff: float
    tolerance: float
    top1_agree: int
    inputs: tuple[str, ...]
    classes: int
    shape: str = "images (N, C, H, W)"

    @property
    def ok(self) -> bool:
        return self.max_diff <= self.tolerance


# ----------------------------------------------------------------------------- one function per format

def input_side(meta: dict) -> int:
    """Side of the images the export takes: the evaluation crop's when the run trained on crops, else the stored."""
    crop = eval_crop_of_meta(meta)
    return crop[0] if crop else meta["image_size"]


def export_torchscript(wrapped: ExportedClassifier, meta: dict, path: Path) -> Callable:
    """Trace the model (its forward has no data-dependent branches), script the wrapper (its dtype branch
    stays), save with model.json's contents as `phalanx.json`. Returns a callable on uint8 or float batches."""
    size, ch = input_side(meta), meta["in_channels"]
    with warnings.catch_warnings():  # torch.jit is deprecated in favour of torch.export; this format asks for it
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        traced = torch.jit.trace(wrapped.model, torch.zeros(2, ch, size, size), check_trace=False)
        scripted = torch.jit.script(ExportedClassifier(traced, meta["mean"], meta["std"]).eval())
        torch.jit.save(scripted, str(path), _extra_files={"phalanx.json": json.dumps(meta)})
        loaded = torch.jit.load(str(path), map_location="cpu")
    return lambda x: loaded(torch.from_numpy(x))


def export_onnx(wrapped: ExportedClassifier, meta: dict, path: Path, input_dtype: str = "uint8") -> Callable:
    """torch.onnx.export (the torch.export-based exporter), dynamic batch, `phalanx` metadata property;
    returns an onnxruntime session's run on batches of `input_dtype`."""
    try:
        import onnx
        import onnxruntime
    except ImportError as e:
        raise ExportError(f"ONNX export needs onnx, onnxscript and onnxruntime ({e.name or e} is missing): "
                          f"{INSTALL_HINT}") from None
    size, ch = input_side(meta), meta["in_channels"]
    example = torch.zeros(2, ch, size, size, dtype=torch.uint8 if input_dtype == "uint8" else torch.float32)
    try:
        torch.onnx.export(wrapped, (example,), str(path), input_names=["images"], output_names=["logits"],
                          dynamic_shapes={"images": {0: torch.export.Dim("batch")}}, dynamo=True, verbose=False,
                          external_data=False)
    except ImportError as e:  # onnxscript, which the exporter imports on first use
        raise ExportError(f"ONNX export needs onnxscript ({e.name or e} is missing): {INSTALL_HINT}") from None
    except torch.onnx.OnnxExporterError as e:  # an op this torch's exporter cannot translate, and the like
        raise ExportError(f"{path}: torch {torch.__version__}'s ONNX exporter cannot convert this model "
                          f"({root_cause_line(e)}); --format torchscript or safetensors export it without ONNX, "
                          f"or a newer torch may convert it") from None
    proto = onnx.load(str(path))
    proto.metadata_props.add(key="phalanx", value=json.dumps(meta))
    onnx.save(proto, str(path))
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return lambda x: torch.from_numpy(session.run(["logits"], {"images": x})[0])


def root_cause_line(e: BaseException, limit: int = 300) -> str:
    """The first line of the innermost cause of `e` (torch's exporter wraps the failing op's error twice)."""
    while e.__cause__ is not None:
        e = e.__cause__
    line = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return line if len(line) <= limit else line[:limit] + "..."


def export_safetensors(wrapped: ExportedClassifier, meta: dict, path: Path) -> Callable:
    """The wrapper's state_dict with model.json's contents in the header; read back with
    `load_safetensors_export` for the check."""
    from safetensors.torch import save_file
    sd = {k: v.detach().cpu().contiguous() for k, v in wrapped.state_dict().items()}
    save_file(sd, str(path), metadata={"phalanx": json.dumps(meta)})
    loaded = load_safetensors_export(path)
    return lambda x: loaded(torch.from_numpy(x))


def load_safetensors_export(path: Path) -> ExportedClassifier:
    """An ExportedClassifier from a file written by `export_safetensors` (CheckpointError if unusable)."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(path), "pt") as f:
            header = f.metadata() or {}
        meta = json.loads(header["phalanx"])
        sd = load_file(str(path))
    except (SafetensorError, OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"{path}: not a Phalanx safetensors export ({type(e).__name__}: {e})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: the 'phalanx' header entry must be a JSON object")
    _check_model_meta(meta, path)
    wrapped = ExportedClassifier(_build_from_meta(meta, path), meta["mean"], meta["std"])
    load_into(wrapped, sd, path)
    return wrapped.eval()


# ----------------------------------------------------------------------------- the command

def default_path(run_dir: Path, fmt: str) -> Path:
    return run_dir / "export" / f"model{SUFFIX[fmt]}"


def export(target: Path, fmt: str, out: Path | None = None, images: list[Path] | None = None,
           input_dtype: str = "uint8") -> tuple[Path, Check]:
    """Write the run's model in `fmt` and check it; (the file, the check). ExportError when the check fails
    (nothing is left at `out` then), DataError / CheckpointError for unusable inputs."""
    target = Path(target)
    run_dir = target if target.is_dir() else target.parent
    out = Path(out) if out else default_path(run_dir, fmt)
    check_out(out, target, given=out is not None)  # before minutes of exporting: one line, nothing written
    model, meta = load_weights(target)
    x, source = check_images(run_dir, meta, images or [])
    wrapped = ExportedClassifier(model, meta["mean"], meta["std"]).eval()
    shape, crop = "images (N, C, H, W)", eval_crop_of_meta(meta)
    if crop is not None:  # checked on what it will be given: evaluation's resize + centre crop
        x = eval_resize_crop(x, *crop)
        source += ", resized and centre-cropped as evaluation does"
        side, frac = crop
        shape = (f"images (N, C, {side}, {side}), resized so that the centre {frac} of their side is "
                 f"{side} px, then centre-cropped to {side}x{side}")
    meta = dict(meta, input=f"{shape}: uint8 0..255 or float 0..1", output="logits (N, num_classes)")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # check_out looked; a full disk, or a folder made read-only since, remain
        raise ConfigError(f"--out {out}: cannot create {out.parent} ({e.strerror or e}); choose another --out") \
            from None
    partial = out.with_name(f".{out.name}.partial")
    try:
        with torch.no_grad():
            if fmt == "torchscript":
                run, inputs = export_torchscript(wrapped, meta, partial), ("uint8", "float")
            elif fmt == "onnx":
                run, inputs = export_onnx(wrapped, dict(meta, input_dtype=input_dtype), partial, input_dtype), \
                    (input_dtype,)
            elif fmt == "safetensors":
                run, inputs = export_safetensors(wrapped, meta, partial), ("uint8", "float")
            else:
                raise ExportError(f"--format {fmt}: choose one of {', '.join(FORMATS)}")
            check = compare(model, meta, run, x, source, inputs)
            check.shape = shape
        if not check.ok:
            raise ExportError(f"{out}: the {fmt} model's logits differ from PyTorch's by up to {check.max_diff:.3g} "
                              f"on {check.images} images ({check.source}), more than the tolerance "
                              f"{check.tolerance:.3g}; nothing was written. Please report this")
        os.replace(partial, out)
    finally:
        partial.unlink(missing_ok=True)
    return out, check


def check_out(out: Path, target: Path, given: bool = True) -> None:
    """ConfigError (one line) unless an export may be written at `out`: a file name (not a folder) in a folder
    this process can write in, and, where a file is there already, an earlier export, never the weights being
    exported or another file of the user's or of a run (config.toml, summary.json, a checkpoint...)."""
    where, fix = ("--out", "choose another --out") if given else ("", "give a writable --out")
    check_destination(out, where, fix)
    if not (out.exists() or out.is_symlink()):
        return
    weights = target / "model.safetensors" if target.is_dir() else target
    if real(out) in (real(weights), real(weights.with_suffix(".json"))):
        raise ConfigError(f"--out {out}: is the weights being exported ({real(weights)}), which an export would "
                          f"replace; {fix} (the default is {default_path(weights.parent, 'onnx').parent}/)")
    if not is_export(out):
        raise ConfigError(f"--out {out}: exists and is not a model `phalanx export` wrote (a run's weights, "
                          f"checkpoint or config, or a file of yours), which an export would replace; {fix}, or "
                          f"move that file away first")


def is_export(path: Path) -> bool:
    """`path` is a model `phalanx export` wrote, in any format: its `phalanx` metadata holds the `output` that
    `export` adds to model.json's contents (a run's own model.safetensors has `phalanx` metadata without it)."""
    def made_by_export(text) -> bool:
        try:
            meta = json.loads(text)
        except (TypeError, ValueError):
            return False
        return isinstance(meta, dict) and "output" in meta

    try:
        if zipfile.is_zipfile(path):  # torchscript: model.json's contents are the extra file phalanx.json
            with zipfile.ZipFile(path) as z:
                return any(made_by_export(z.read(n)) for n in z.namelist() if n.endswith("extra/phalanx.json"))
        with open(path, "rb") as f:
            head = f.read(8)
            size = int.from_bytes(head, "little") if len(head) == 8 else 0
            if 2 <= size <= 100 << 20:  # safetensors: the header's length, then the header (JSON)
                header = json.loads(f.read(size))
                return made_by_export((header.get("__metadata__") or {}).get("phalanx"))
        if head[:1] == b"\x08":  # an ONNX ModelProto starts with its ir_version (field 1, a varint)
            import onnx  # optional (phalanx[export]): only an ONNX export can be there
            proto = onnx.load(str(path), load_external_data=False)
            return any(p.key == "phalanx" and made_by_export(p.value) for p in proto.metadata_props)
    except Exception:  # unreadable, or another kind of file (onnx's parser raises its own errors): no export
        return False
    return False


@torch.no_grad()
def compare(model: nn.Module, meta: dict, run: Callable, x: torch.Tensor, source: str,
            inputs: tuple[str, ...], batch: int = 64) -> Check:
    """Largest |logit difference| between `run` and the PyTorch model over `x` (uint8 NCHW), fed to `run`
    as each of `inputs` (uint8 as it is, float as x / 255)."""
    normalize = Normalize(meta["mean"], meta["std"], torch.device("cpu"), False)
    max_diff, scale, agree = 0.0, 1.0, 0
    for lo in range(0, len(x), batch):
        xb = x[lo:lo + batch].contiguous()
        ref = model(normalize(xb)).float()
        scale = max(scale, float(ref.abs().max()))
        for kind in inputs:
            arr = xb.numpy() if kind == "uint8" else (xb.float() / 255.0).numpy()
            got = run(arr).float()
            max_diff = max(max_diff, float((got - ref).abs().max()))
            if kind == inputs[0]:
                agree += int((got.argmax(1) == ref.argmax(1)).sum())
    return Check(len(x), source, max_diff, TOLERANCE * scale, agree, inputs, meta["num_classes"])


def check_images(run_dir: Path, meta: dict, given: list[Path]) -> tuple[torch.Tensor, str]:
    """uint8 (N, C, H, W) images to check an export on, and where they came from: the files and folders
    given, else images spread over the test split of the run's prepared store."""
    size, ch = meta["image_size"], meta["in_channels"]
    if given:
        files = list_images(given)[:CHECK_IMAGES]
        return torch.stack([decode_chw(f, size, ch) for f in files]), f"{len(files)} image file(s) given"
    store = run_store(run_dir)
    if store is not None and store.shape == (size, size, ch):
        name = "test" if "test" in store.splits else "val" if "val" in store.splits else None
        if name is not None:
            return evenly_spaced(store[name], CHECK_IMAGES).contiguous(), f"{name} split of {store.path}"
    raise DataError(f"{run_dir}: the prepared store this run trained on is not on this machine; name test images "
                    f"to check the export on: phalanx export {run_dir} IMAGE|FOLDER ... --format F")


def run_store(run_dir: Path):
    """The prepared store named by the run's config.toml, when it exists here (None otherwise)."""
    cfg_path = run_dir / "config.toml"
    if not cfg_path.is_file():
        return None
    try:
        cfg = C.build_config(str(cfg_path), [])
        path, _ = store_path_for(cfg.data.path, cfg.data.cache_dir, auto_install=False, size=cfg.data.size,
                                 channels=cfg.data.channels)
        return open_store(path) if is_store(path) else None
    except (ConfigError, DataError, OSError):
        return None


def describe(path: Path, fmt: str, check: Check) -> str:
    """What `phalanx export` prints."""
    mb = path.stat().st_size / 2**20
    inputs = " and ".join(check.inputs)
    return (f"exported {path} ({fmt}, {mb:.2f} MB): {inputs} {check.shape} -> logits (N, {check.classes})\n"
            f"checked against the PyTorch model on {check.images} images ({check.source}), {inputs} input: "
            f"max |logit difference| {check.max_diff:.2e} (tolerance {check.tolerance:.2e}), top-1 agrees on "
            f"{check.top1_agree}/{check.images}")


"""`phalanx export`: the run's final model as TorchScript, ONNX or safetensors, checked against PyTorch."""
from __future__ import annotations

import sys
from pathlib import Path

from phalanx.commands.args import Command, Option, Parsed, Spec
from phalanx.errors import ConfigError
from phalanx.tools import export as X


def export(p: Parsed) -> int:
    v = p.values
    if v.format is None:
        raise ConfigError(f"--format is required: one of {', '.join(X.FORMATS)}")
    target = Path(p.positional[0])
    if not target.exists():
        raise ConfigError(f"{target}: no such run directory or weights file")
    try:
        path, check = X.export(target, v.format, Path(v.out) if v.out else None, [Path(x) for x in p.positional[1:]],
                               v.input)
    except X.ExportError as e:
        print(f"phalanx: error: {e}", file=sys.stderr)
        return 1
    print(X.describe(path, v.format, check), flush=True)
    return 0


EXPORT = Spec("phalanx export RUN_DIR|WEIGHTS [IMAGE|FOLDER...] --format torchscript|onnx|safetensors [--out PATH] "
              "[--input uint8|float]",
              """Write the run's final model with its input normalisation built in: it takes uint8 (0..255) or float
(0..1) images (N, C, H, W) and returns logits. The export is then run on real test images (those
named, else the test split of the run's prepared store) and compared with the PyTorch model; the
largest logit difference is printed and must be within 1e-4 x the largest |logit| (at least 1e-4).""",
              options=(Option("format", "torchscript (torch.jit.load), onnx (onnxruntime; pip install "
                              "phalanx[export]), or safetensors (state_dict + metadata; "
                              "phalanx.tools.export.load_safetensors_export)", choices=X.FORMATS),
                       Option("out", "default RUN_DIR/export/model.pt|.onnx|.safetensors; never the run's own "
                              "files nor another file that is not an export", Path, metavar="PATH"),
                       Option("input", "the input type of an ONNX graph, which has exactly one", default="uint8",
                              choices=("uint8", "float"))),
              positionals=(1, None), paths=True)

COMMANDS = {"export": Command(EXPORT, export)}

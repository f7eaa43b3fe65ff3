"""`phalanx export`: each format holds the model with its normalisation built in, takes uint8 or float
images, and matches the PyTorch model on real test images; a failed check leaves no file."""
import json
import shutil
import sys

import numpy as np
import pytest
import torch

from phalanx.commands import main
from phalanx.data.augment import Normalize
from phalanx.tools import export as X
from phalanx.train.evaluate import load_weights


def _reference(run_dir, x_uint8: torch.Tensor) -> torch.Tensor:
    model, meta = load_weights(run_dir)
    with torch.no_grad():
        return model(Normalize(meta["mean"], meta["std"], torch.device("cpu"), False)(x_uint8))


def _images(n: int = 5, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 1, 28, 28), dtype=torch.uint8, generator=g)


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_torchscript_export_takes_uint8_and_float_and_matches_pytorch(tiny_run, tmp_path, capsys):
    out = tmp_path / "m.pt"
    assert main(["export", str(tiny_run), "--format", "torchscript", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "max |logit difference|" in printed and "64 images (test split of" in printed
    extra = {"phalanx.json": ""}
    loaded = torch.jit.load(str(out), _extra_files=extra)
    meta = json.loads(extra["phalanx.json"])
    assert meta["num_classes"] == 10 and len(meta["classes"]) == 10
    x = _images()  # a batch size the trace never saw
    ref = _reference(tiny_run, x)
    torch.testing.assert_close(loaded(x), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loaded(x.float() / 255), ref, atol=1e-5, rtol=1e-5)


def test_onnx_export_matches_pytorch_in_onnxruntime(tiny_run, tmp_path, capsys):
    ort = pytest.importorskip("onnxruntime")
    out = tmp_path / "m.onnx"
    assert main(["export", str(tiny_run), "--format", "onnx", "--out", str(out)]) == 0
    line = capsys.readouterr().out.splitlines()[-1]
    diff = float(line.split("max |logit difference| ")[1].split()[0])
    tol = float(line.split("(tolerance ")[1].split(")")[0])
    assert diff <= tol <= 1e-3
    assert list(tmp_path.iterdir()) == [out]  # weights inside the file, no partial or external data left
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].type == "tensor(uint8)"
    assert json.loads(session.get_modelmeta().custom_metadata_map["phalanx"])["image_size"] == 28
    x = _images(7)
    got = session.run(None, {"images": x.numpy()})[0]
    np.testing.assert_allclose(got, _reference(tiny_run, x).numpy(), atol=1e-5, rtol=1e-5)


def test_safetensors_export_rebuilds_the_normalised_model(tiny_run, tmp_path):
    path, check = X.export(tiny_run, "safetensors", tmp_path / "m.safetensors")
    assert check.ok and check.max_diff < 1e-6 and check.inputs == ("uint8", "float")
    loaded = X.load_safetensors_export(path)
    x = _images()
    torch.testing.assert_close(loaded(x), _reference(tiny_run, x), atol=0, rtol=0)
    torch.testing.assert_close(loaded(x.float() / 255), _reference(tiny_run, x), atol=1e-5, rtol=1e-5)


def test_missing_onnxruntime_is_one_line_naming_the_extra(tiny_run, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime -> ImportError
    assert main(["export", str(tiny_run), "--format", "onnx", "--out", str(tmp_path / "m.onnx")]) == 1
    err = capsys.readouterr().err
    assert "pip install phalanx[export]" in err and err.count("\n") == 1
    assert not list(tmp_path.iterdir())


def test_a_run_without_its_store_is_checked_on_the_images_given(tiny_run, tmp_path, capsys):
    from PIL import Image
    run = tmp_path / "moved"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("export"))
    text = (run / "config.toml").read_text()
    (run / "config.toml").write_text(text.replace("cache_dir = \"", "cache_dir = \"/nonexistent"))
    assert main(["export", str(run), "--format", "safetensors"]) == 1
    err = capsys.readouterr().err
    assert "name test images" in err and err.count("\n") == 1
    (tmp_path / "imgs").mkdir()
    for i, img in enumerate(_images(3)):
        Image.fromarray(img[0].numpy()).save(tmp_path / "imgs" / f"{i}.png")
    assert main(["export", str(run), str(tmp_path / "imgs"), "--format", "safetensors"]) == 0
    assert "3 image file(s) given" in capsys.readouterr().out


def test_an_export_that_fails_its_check_leaves_no_file(tiny_run, tmp_path, monkeypatch):
    monkeypatch.setattr(X, "TOLERANCE", -1.0)
    with pytest.raises(X.ExportError, match="more than the tolerance"):
        X.export(tiny_run, "torchscript", tmp_path / "m.pt")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("argv,needle", [
    (["--format", "pickle"], "--format pickle: choose one of torchscript, onnx, safetensors"),
    ([], "--format is required"),
    (["--format", "onnx", "--input", "int8"], "--input int8: choose one of uint8, float"),
])
def test_bad_export_options_are_one_line(tiny_run, argv, needle, capsys):
    assert main(["export", str(tiny_run), *argv]) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1


def test_a_run_trained_on_crops_exports_a_model_of_crops_checked_as_evaluation_feeds_it(tiny_run, tmp_path, capsys):
    """model.json's crop_size: the export takes evaluation's resized, centre-cropped images, and says so."""
    from phalanx.data.geometry import eval_resize_crop
    ort = pytest.importorskip("onnxruntime")
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    meta = json.loads((run / "model.json").read_text())
    (run / "model.json").write_text(json.dumps(dict(meta, crop_size=24, eval_crop=0.875)))
    out = tmp_path / "m.onnx"
    assert main(["export", str(run), "--format", "onnx", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "images (N, C, 24, 24), resized so that the centre 0.875 of their side is 24 px" in printed
    assert "resized and centre-cropped as evaluation does" in printed
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape[1:] == [1, 24, 24]
    assert "24, 24" in json.loads(session.get_modelmeta().custom_metadata_map["phalanx"])["input"]
    x = eval_resize_crop(_images(6), 24, 0.875)  # what `phalanx eval` feeds the model
    got = session.run(None, {"images": x.numpy()})[0]
    np.testing.assert_allclose(got, _reference(run, x).numpy(), atol=1e-5, rtol=1e-5)


def test_an_op_the_onnx_exporter_cannot_translate_is_one_line_naming_it(tiny_run, tmp_path, monkeypatch, capsys):
    """torch 2.11's exporter had no translation for adaptive_max_pool2d: what a user sees is the op, not a traceback."""
    def fail(*args, **kwargs):
        try:
            raise RuntimeError("No ONNX function found for <OpOverload(op='aten.frobnicate', overload='default')>\n"
                               "more detail")
        except RuntimeError as cause:
            raise torch.onnx.OnnxExporterError("Failed to convert the exported program to an ONNX model.") from cause
    monkeypatch.setattr(torch.onnx, "export", fail)
    assert main(["export", str(tiny_run), "--format", "onnx", "--out", str(tmp_path / "m.onnx")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert "cannot convert this model" in err and "aten.frobnicate" in err and "--format torchscript" in err
    assert f"torch {torch.__version__}" in err
    assert not list(tmp_path.iterdir())


def _files(root) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("name", ["model.safetensors", "model.json", "config.toml", "summary.json",
                                  "metrics.jsonl", "logs/rank-0.log", "notes.txt"])
def test_an_export_never_replaces_a_file_of_the_run_or_of_the_user(tiny_run, tmp_path, capsys, name):
    """`phalanx export RUN --out RUN/model.safetensors` used to overwrite the trained weights (exit 0)."""
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    (run / "notes.txt").write_text("mine")
    out = run / name
    before = _files(run)
    assert main(["export", str(run), "--format", "safetensors", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"phalanx: error: --out {out}: ") and "Traceback" not in err, err
    assert ("is the weights being exported" if name in ("model.safetensors", "model.json") else
            "exists and is not a model `phalanx export` wrote") in err
    assert _files(run) == before
    assert main(["eval", str(run), "--data.cache_dir", str(tiny_run.parent / "cache"), "--nproc", "1"]) == 0


def test_an_export_replaces_an_earlier_export(tiny_run, tmp_path, capsys):
    for fmt, name in (("safetensors", "m.safetensors"), ("torchscript", "m.pt")):
        out = tmp_path / name
        for _ in range(2):
            assert main(["export", str(tiny_run), "--format", fmt, "--out", str(out)]) == 0, capsys.readouterr().err
        assert X.is_export(out)
    assert X.is_export(tmp_path / "m.pt") and not X.is_export(tiny_run / "model.safetensors")
    assert not X.is_export(tiny_run / "config.toml")

"""`phalanx predict` on image files and folders: the same answers as `phalanx eval`, in batches, as a
table, CSV or JSON; bad input is one line."""
import csv
import io
import json

import pytest
from PIL import Image

from phalanx.commands import main


def _test_split(run_dir):
    from phalanx.tools.export import run_store
    return run_store(run_dir)["test"]


@pytest.fixture(scope="module")
def test_images(tiny_run, tmp_path_factory):
    """The run's 64 test images as PNG files named in store order (`NNN-LABEL.png`), two folders deep."""
    split = _test_split(tiny_run)
    root = tmp_path_factory.mktemp("predict")
    for i, (img, label) in enumerate(zip(split.images, split.labels)):
        folder = root / "imgs" / ("a" if i < 40 else "b/c")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img[..., 0]).save(folder / f"{i:03d}-{label}.png")
    (root / "imgs" / "notes.txt").write_text("not an image: skipped in a folder")
    return root / "imgs"


def test_predict_agrees_with_eval_on_the_same_images(tiny_run, test_images, capsys):
    # eval as predict computes: one view, fp32, NCHW, and chunks of predict's batch size
    assert main(["eval", str(tiny_run), "--nproc", "1", "--tta_flip", "false", "--precision", "fp32",
                 "--model.channels_last", "false", "--eval_batch", "64"]) == 0
    evaluated = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert main(["predict", str(tiny_run), str(test_images), "--format", "json", "--top", "1", "--batch", "64"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(rows) == evaluated["count"] == 64
    labels = [r["file"].rsplit("-", 1)[1].removesuffix(".png") for r in rows]
    correct = sum(r["top"][0]["class"] == y for r, y in zip(rows, labels))
    assert correct == evaluated["correct"]
    assert len({r["top"][0]["class"] for r in rows}) > 1  # not one answer for every image


def test_table_csv_and_json_say_the_same_in_any_batch_size(tiny_run, test_images, capsys):
    out, first = {}, sorted((test_images / "a").iterdir())[0]
    for fmt, batch in (("json", "64"), ("csv", "5"), ("table", "1")):
        assert main(["predict", str(tiny_run), str(test_images / "b"), str(first), "--format", fmt,
                     "--batch", batch]) == 0
        out[fmt] = capsys.readouterr().out
    rows = [json.loads(line) for line in out["json"].splitlines()]
    assert len(rows) == 25 and rows[-1]["file"] == str(first) and len(rows[0]["top"]) == 3
    table = csv.DictReader(io.StringIO(out["csv"]))
    assert table.fieldnames == ["file", "top1", "p1", "top2", "p2", "top3", "p3"]
    for r, c in zip(rows, table):
        assert [t["class"] for t in r["top"]] == [c["top1"], c["top2"], c["top3"]]
        assert abs(r["top"][0]["p"] - float(c["p1"])) < 1e-6
    lines = out["table"].splitlines()
    assert lines[0].split() == ["file", "top-1", "p", "top-2", "p", "top-3", "p"] and len(lines) == 26
    for r, line in zip(rows, lines[1:]):
        assert line.split()[:3] == [r["file"], r["top"][0]["class"], f"{r['top'][0]['p']:.4f}"]


@pytest.mark.parametrize("what,needle,code", [
    ("notes.txt", "notes.txt: not a recognised image format", 1),
    ("missing.png", "missing.png: no such file or folder", 1),
])
def test_bad_input_is_one_line(tiny_run, test_images, what, needle, code, capsys):
    assert main(["predict", str(tiny_run), str(test_images / what)]) == code
    captured = capsys.readouterr()
    assert needle in captured.err and captured.err.count("\n") == 1 and captured.out == ""


def test_bad_predict_options_are_one_line(tiny_run, test_images, capsys):
    for opts, needle in ((["--format", "xml"], "choose one of table, csv, json"), (["--top", "0"], "--top 0"),
                         (["--topk", "3"], "unknown option --topk")):
        assert main(["predict", str(tiny_run), str(test_images), *opts]) == 2
        err = capsys.readouterr().err
        assert needle in err and err.count("\n") == 1


def test_an_empty_folder_is_one_line(tiny_run, tmp_path, capsys):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "readme.md").write_text("x")
    assert main(["predict", str(tiny_run), str(tmp_path)]) == 1
    assert "no image files in this folder or below" in capsys.readouterr().err

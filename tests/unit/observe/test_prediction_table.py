"""`phalanx predict`'s table (observe/console.py prediction_writer): one line per image, whatever the class and file
names hold; a newline or a tab in a name (a folder named so) is escaped as Python writes it, never printed raw."""
import csv
import io
import json
import shutil

import numpy as np
from PIL import Image

from phalanx.commands import main
from phalanx.observe.console import prediction_writer

ODD = ["line\nbreak", "tab\there", "bell\x07", "plain", "é-ok"]


def test_the_table_escapes_control_characters_and_keeps_its_columns(capsys):
    write = prediction_writer("table", 2, ["a\nb.png", "c.png"], ODD)
    write({"file": "a\nb.png", "top": [{"class": ODD[0], "p": 0.6}, {"class": ODD[1], "p": 0.3}]})
    write({"file": "c.png", "top": [{"class": ODD[2], "p": 0.5}, {"class": ODD[4], "p": 0.2}]})
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3, lines  # the header and one line per image
    assert lines[1].startswith("a\\nb.png") and "line\\nbreak" in lines[1] and "tab\\there" in lines[1]
    assert "bell\\x07" in lines[2] and "é-ok" in lines[2] and "\t" not in "".join(lines)
    assert len({len(x) for x in lines}) == 1  # the columns line up: every row as wide as the header


def test_csv_and_json_keep_the_names_as_they_are(capsys):
    for fmt in ("csv", "json"):
        write = prediction_writer(fmt, 1, ["a.png"], ODD)
        write({"file": "a.png", "top": [{"class": ODD[0], "p": 0.5}]})
    out = capsys.readouterr().out
    rows = list(csv.reader(io.StringIO(out.split("\n{")[0])))
    assert rows[1][1] == "line\nbreak"  # quoted by csv
    assert json.loads("{" + out.split("\n{")[1])["top"][0]["class"] == "line\nbreak"


def test_phalanx_predict_prints_one_line_per_image_for_classes_named_with_newlines(tiny_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    meta = json.loads((run / "model.json").read_text())
    meta["classes"] = [f"class\n{i}\tx" for i in range(meta["num_classes"])]
    (run / "model.json").write_text(json.dumps(meta))
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).save(tmp_path / f"img{i}.png")
    assert main(["predict", str(run), *(str(tmp_path / f"img{i}.png") for i in range(3)), "--top", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4 and all("class\\n" in x and "\\tx" in x for x in lines[1:]), lines

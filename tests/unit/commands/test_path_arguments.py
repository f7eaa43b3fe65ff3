"""Every path argument of every command goes through the one path checker (src/phalanx/paths.py, called from
commands/args.py): a name over 255 bytes, a symbolic link loop, a path in /proc or /sys, a read-only folder
where something is written, a folder where a file goes: one `phalanx: error:` line naming the path and the fix,
exit code 2, no traceback, and nothing on disk changed."""
import os
from pathlib import Path

import pytest

from phalanx.commands import main
from phalanx.paths import _shown


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every file (its bytes) and folder (None) under `root`, links not followed."""
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() and not p.is_symlink() else None)
            for p in sorted(root.rglob("*"))}


@pytest.fixture
def place(tmp_path) -> Path:
    (tmp_path / "loop").symlink_to("loop")
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.txt").write_text("mine")
    return tmp_path


BAD = {
    "long": lambda t: t / ("x" * 300),
    "long-inside": lambda t: t / "src" / ("é" * 200) / "x",
    "loop": lambda t: t / "loop" / "x",
    "proc": lambda t: Path("/proc/self/phalanx-x"),
    "sys": lambda t: Path("/sys/phalanx-x"),
}

COMMANDS = {  # {P}: the bad path; {T}: the test's folder
    "train --data": ["train", "--data", "{P}"],
    "train --resume": ["train", "--resume", "{P}"],
    "train --model.pretrained": ["train", "--model.pretrained", "{P}"],
    "train --recipe": ["train", "--recipe", "{P}"],
    "train --run_dir": ["train", "--run_dir", "{P}"],
    "train --out_dir": ["train", "--out_dir", "{P}"],
    "train --data.cache_dir": ["train", "--data.cache_dir", "{P}"],
    "tune --data": ["tune", "--data", "{P}"],
    "eval RUN": ["eval", "{P}"],
    "eval --data": ["eval", "{T}/src", "--data", "{P}"],
    "predict RUN": ["predict", "{P}", "{T}/src/a.txt"],
    "predict IMAGE": ["predict", "{T}/src", "{P}"],
    "export RUN": ["export", "{P}", "--format", "onnx"],
    "export --out": ["export", "{T}/src", "--format", "onnx", "--out", "{P}"],
    "report RUN": ["report", "{P}"],
    "report --out": ["report", "{T}/src", "--out", "{P}"],
    "data info": ["data", "info", "{P}"],
    "data verify": ["data", "verify", "{P}"],
    "data prepare SRC": ["data", "prepare", "{P}", "{T}/out"],
    "data prepare OUT": ["data", "prepare", "{T}/src", "{P}"],
}


@pytest.mark.parametrize("bad", list(BAD))
@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_path_argument_is_one_line_exit_2_and_changes_nothing(place, capsys, command, bad):
    path = BAD[bad](place)
    argv = [a.replace("{P}", str(path)).replace("{T}", str(place)) for a in COMMANDS[command]]
    before = snapshot(place)
    code = main(argv)
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("phalanx: error: ") and _shown(str(path)) in lines[0], err
    assert "Traceback" not in out + err
    assert snapshot(place) == before


def test_a_recipe_naming_a_bad_path_is_one_line(tmp_path, capsys):
    """The paths a recipe sets go through the same checker (tools/checks.py) as the command line's."""
    recipe = tmp_path / "r.toml"
    recipe.write_text(f'[data]\npath = "{tmp_path / ("x" * 300)}"\n')
    assert main(["train", "--recipe", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--data.path " in err and "File name too long" in err, err
    recipe.write_text(f'[model]\npretrained = "{tmp_path / ("x" * 300)}"\n')
    assert main(["train", "--recipe", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "model.pretrained=" in err and "Traceback" not in err, err
    recipe.write_text(f'out_dir = "/proc/self/runs"\n[data]\npath = "{tmp_path}/src"\n')
    assert main(["train", "--recipe", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--out_dir /proc/self/runs: " in err and "in /proc" in err, err


def test_a_read_only_destination_is_one_line_naming_it(place, capsys, monkeypatch):
    ro = place / "src"
    real_access = os.access  # root may write anywhere: a read-only folder is simulated for other users
    monkeypatch.setattr(os, "access", lambda p, mode: Path(p) != ro and real_access(p, mode))
    before = snapshot(place)
    for argv in (["export", str(place), "--format", "onnx", "--out", str(ro / "m.onnx")],
                 ["report", str(place), "--out", str(ro / "report")],
                 ["data", "prepare", str(place / "images"), str(ro / "store")],
                 ["train", "--run_dir", str(ro / "run")], ["train", "--out_dir", str(ro)]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"{ro} is read-only (no new files can be made in it)" in err, (argv, err)
    assert snapshot(place) == before


def test_a_folder_where_a_file_is_written_is_one_line(place, capsys):
    assert main(["export", str(place), "--format", "onnx", "--out", str(place / "src")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is a folder, and a file is to be written here; choose another --out" in err
    assert (place / "src" / "a.txt").read_text() == "mine"


def test_a_report_never_replaces_a_page_of_the_users(place, capsys):
    """`phalanx report RUN --out DIR` writes DIR/report.html and DIR/report/: a page there that `phalanx report`
    did not write is refused, and the folder left as it was; an earlier report is replaced."""
    from phalanx.commands.report import refuse_a_page_of_the_users
    (place / "src" / "report.html").write_text("<html>my own page</html>")
    before = snapshot(place)
    assert main(["report", str(place / "nowhere"), "--out", str(place / "src")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds a report.html that `phalanx report` did not write" in err, err
    assert snapshot(place) == before
    (place / "src" / "report.html").write_text('<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
                                               '<title>Phalanx report: run</title>')
    refuse_a_page_of_the_users(place / "src")  # an earlier report: replaced
    (place / "src" / "report.html").unlink()
    (place / "src" / "report").write_text("mine")
    assert main(["report", str(place / "nowhere"), "--out", str(place / "src")]) == 2
    assert "is a file, where the report's plots go" in capsys.readouterr().err

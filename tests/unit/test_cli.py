import pytest

from phalanx.cli import main


@pytest.mark.parametrize("argv,needle", [
    ([], "phalanx COMMAND"),
    (["train", "--help"], "--optim.lr="),
    (["eval", "--help"], "RUN_DIR|WEIGHTS"),
    (["predict", "--help"], "IMAGE"),
    (["data", "--help"], "prepare"),
    (["data", "prepare", "--help"], "--skip-bad"),
    (["bench", "--help"], "scaling"),
    (["models"], "phalanx_cnn"),
    (["export", "--help"], "--format torchscript|onnx|safetensors"),
    (["doctor", "--help"], "--backend"),
])
def test_every_command_explains_itself(argv, needle, capsys):
    try:
        code = main(argv + ([] if argv else ["--help"]))
    except SystemExit as e:  # argparse-based sub-commands exit after --help
        code = e.code
    out = capsys.readouterr().out
    assert code == 0
    assert needle in out


def test_unknown_command_suggests_the_closest(capsys):
    assert main(["trian"]) == 2
    assert "did you mean 'train'" in capsys.readouterr().err


def test_unexpected_positional_is_refused(capsys):
    assert main(["train", "fashion"]) == 2
    assert "unexpected argument 'fashion'" in capsys.readouterr().err


def test_missing_data_folder_is_one_clear_line(tmp_path, capsys):
    code = main(["train", "--data", str(tmp_path / "nope"), "--nproc", "1", "--out_dir", str(tmp_path / "runs")])
    err = capsys.readouterr().err
    assert code == 1
    assert "nope: no such file or folder" in err and err.count("\n") == 1
    assert not (tmp_path / "runs").exists()  # nothing written for a run that cannot start

import pytest

from phalanx.commands import main


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


def test_a_command_leaves_without_the_interpreter_teardown_but_after_what_exit_runs(tmp_path):
    """`leave` runs the atexit functions and flushes what is buffered, then exits with the command's code; a
    non-daemon thread still running gets the usual exit, which waits for it."""
    import subprocess
    import sys
    prog = ("import atexit, sys\n"
            "from phalanx.commands.outcome import leave\n"
            "atexit.register(lambda: print('atexit ran'))\n"
            "print('buffered', end=' ')\n"
            "leave(3)\n")
    r = subprocess.run([sys.executable, "-c", prog], capture_output=True, text=True, timeout=60)
    assert r.returncode == 3 and r.stdout == "buffered atexit ran\n", r
    done = tmp_path / "done"
    prog = ("import threading, time\n"
            "from phalanx.commands.outcome import leave\n"
            f"threading.Thread(target=lambda: (time.sleep(0.3), open({str(done)!r}, 'w').close())).start()\n"
            "leave(0)\n")
    r = subprocess.run([sys.executable, "-c", prog], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and done.exists(), r

"""The variables a launcher sets (RANK, WORLD_SIZE, LOCAL_RANK, ..., MASTER_ADDR/PORT): read once, checked, and
a value no launcher would set is one line with exit code 2, never int()'s traceback or a group that waits."""
import os
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from phalanx.errors import ConfigError
from phalanx.runtime.dist import LAUNCH_VARS, LaunchVars, launch_vars

# What a launcher's variables hold in the wild: numbers (in range or not), signs, spaces, other scripts' digits,
# empty strings, host names and garbage.
VALUES = st.one_of(st.integers(-3, 70_000).map(str), st.integers(-2 ** 70, 2 ** 70).map(str),
                   st.sampled_from(["", " 1", "1 ", "+1", "-0", "0x10", "1e3", "²", "٣", "1_0", "abc", "127.0.0.1",
                                    "localhost", "9" * 40, "\x00"]),
                   st.text(max_size=6))
ENVIRONS = st.dictionaries(st.sampled_from(LAUNCH_VARS), VALUES, max_size=len(LAUNCH_VARS))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ENVIRONS)
@example({"WORLD_SIZE": "abc", "LOCAL_RANK": "0"})
@example({"RANK": "0", "WORLD_SIZE": "2"})
@example({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "abc"})
@example({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "70000"})
@example({"RANK": "2", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1"})
@example({"LOCAL_RANK": "²"})
def test_any_launcher_environment_is_a_consistent_place_in_the_run_or_one_config_error_line(environ):
    try:
        v = launch_vars(environ)
    except ConfigError as e:
        line = str(e)
        assert "\n" not in line and "\r" not in line and len(line) < 400, line
        assert any(name in line for name in LAUNCH_VARS), line  # it names the variable
        return
    # Accepted: every value is one a launcher sets, and they agree with each other.
    assert 0 <= v.rank < v.world and v.local_rank >= 0 and v.local_world >= 1 and v.restart >= 0
    if "LOCAL_WORLD_SIZE" in environ:
        assert v.local_rank < v.local_world
    if v.world > 1:
        assert v.master_addr and v.master_port is not None and 1 <= v.master_port <= 65535
    for name, value in (("RANK", v.rank), ("WORLD_SIZE", v.world), ("LOCAL_RANK", v.local_rank)):
        if name in environ:
            assert int(environ[name]) == value


def test_no_launcher_means_one_process():
    assert launch_vars({}) == LaunchVars()


def test_torchruns_variables_are_read():
    v = launch_vars({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
                     "TORCHELASTIC_RESTART_COUNT": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"})
    assert v == LaunchVars(3, 4, 1, 2, 1, "127.0.0.1", 29500)


@pytest.mark.parametrize("environ,needle", [
    ({"WORLD_SIZE": "abc", "LOCAL_RANK": "0"}, "WORLD_SIZE='abc' in the environment"),
    ({"RANK": "0", "WORLD_SIZE": "2"}, "but MASTER_ADDR and MASTER_PORT are not"),
    ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "abc"},
     "MASTER_PORT='abc' in the environment: must be a TCP port"),
])
def test_phalanx_train_with_a_bad_launcher_variable_is_one_line_and_exit_2(tmp_path, environ, needle):
    # A fresh process, as a user's shell or a wrapper would start it: with LOCAL_RANK it is taken for a rank of a
    # user's own torchrun (commands/rank.py), without it for the launcher (commands/__init__.py).
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS and k != "TORCHELASTIC_ERROR_FILE"}
    env.update(environ, PHALANX_CACHE=str(tmp_path / "cache"))
    r = subprocess.run([sys.executable, "-m", "phalanx", "train", "--data", str(tmp_path / "no-data-needed"),
                        "--out_dir", str(tmp_path / "runs")], capture_output=True, text=True, env=env, timeout=120)
    err = r.stderr.strip().splitlines()
    assert r.returncode == 2, r.stderr
    assert len(err) == 1 and needle in err[0] and err[0].startswith("phalanx: error: "), r.stderr
    assert "Traceback" not in r.stdout + r.stderr
    assert not (tmp_path / "runs").exists()

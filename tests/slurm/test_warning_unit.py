"""SLURM's warning (USR1) before the ranks run: noted, not the end of the process (no daemons needed: runs in
`make test`)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys


def test_usr1_before_the_ranks_is_noted_from_the_interpreters_start_and_the_launcher_finds_it():
    # `python -m phalanx` notes USR1 while it imports torch; runtime/slurm.py picks the note up.
    env = dict(os.environ, SLURM_JOB_ID="7")
    r = subprocess.run([sys.executable, "-c", "import importlib.util, os, signal\n"
                        "src = open(importlib.util.find_spec('phalanx.__main__').origin).read()\n"
                        "exec(src.split('from phalanx.commands import entry')[0])\n"
                        "os.kill(os.getpid(), signal.SIGUSR1)\n"
                        "from phalanx.runtime import slurm\n"
                        "slurm.catch_warning()\n"
                        "print('warned', slurm.warned())\n"], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0 and "warned True" in r.stdout, r.stdout + r.stderr


def test_usr1_after_catch_warning_is_noted_not_fatal():
    r = subprocess.run([sys.executable, "-c", "import os, signal\n"
                        "from phalanx.runtime import slurm\n"
                        "assert not slurm.warned()\n"
                        "slurm.catch_warning()\n"
                        "os.kill(os.getpid(), signal.SIGUSR1)\n"
                        "print('warned', slurm.warned())\n"], capture_output=True, text=True, timeout=120,
                       env={k: v for k, v in os.environ.items() if k != "PHALANX_SLURM_WARNED"})
    assert r.returncode == 0 and "warned True" in r.stdout, r.stdout + r.stderr
    assert r.returncode != -signal.SIGUSR1

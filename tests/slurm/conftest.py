"""A real SLURM cluster of one node on this machine: munged, slurmctld and slurmd started here with a
configuration of our own (its ports, state and logs in a temporary folder), stopped by their process ids at the
end. Needs root and Debian's slurm-wlm and munge (`make test-slurm` installs them); without them every test
here skips with one line saying why."""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import wait_for  # noqa: F401 (the lane's tests import it from here)

DAEMONS = ("/usr/sbin/munged", "/usr/sbin/slurmctld", "/usr/sbin/slurmd")
CLIENTS = ("sbatch", "squeue", "scontrol", "sinfo", "scancel")
START_TIMEOUT_S = 60.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _why_not() -> str | None:
    if os.geteuid() != 0:
        return "the SLURM lane needs root (its daemons run as root here)"
    missing = [d for d in DAEMONS if not os.access(d, os.X_OK)] + [c for c in CLIENTS if not shutil.which(c)]
    if missing:
        return f"SLURM is not installed ({', '.join(missing)} missing): apt-get install slurm-wlm munge"
    return None


def _pid(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _stop(pid_files: list[Path]) -> None:
    for f in pid_files:
        pid = _pid(f)
        if pid:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
    deadline = time.monotonic() + 15
    for f in pid_files:
        pid = _pid(f)
        while pid and time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        else:
            if pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """{'env': the environment the clients need (SLURM_CONF), 'dir': the cluster's folder}."""
    why = _why_not()
    if why:
        pytest.skip(why)
    d = tmp_path_factory.mktemp("slurm")
    for sub in ("state", "spool", "log", "run", "munge"):
        (d / sub).mkdir()
    (d / "munge").chmod(0o700)
    key = d / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    host = socket.gethostname()
    cpus = os.cpu_count() or 2
    conf = d / "slurm.conf"
    conf.write_text(f"""ClusterName=phalanxtest
SlurmctldHost={host}(127.0.0.1)
AuthType=auth/munge
AuthInfo=socket={d}/munge/munge.socket
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={d}/run/slurmctld.pid
SlurmdPidFile={d}/run/slurmd.pid
SlurmctldLogFile={d}/log/slurmctld.log
SlurmctldDebug=debug
SlurmdLogFile={d}/log/slurmd.log
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/builtin
JobRequeue=1
MinJobAge=600
KillWait=20
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory=4000 State=UNKNOWN
PartitionName=test Nodes={host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
""")
    env = dict(os.environ, SLURM_CONF=str(conf))
    pid_files = [d / "munge" / "munged.pid", d / "run" / "slurmctld.pid", d / "run" / "slurmd.pid"]
    try:
        subprocess.run(["/usr/sbin/munged", f"--key-file={key}", f"--socket={d}/munge/munge.socket",
                        f"--pid-file={pid_files[0]}", f"--log-file={d}/munge/munged.log", f"--seed-file={d}/munge/seed",
                        "--force"], check=True, timeout=30, env=env)
        subprocess.run(["/usr/sbin/slurmctld", "-f", str(conf), "-i"], check=True, timeout=30, env=env)
        subprocess.run(["/usr/sbin/slurmd", "-f", str(conf)], check=True, timeout=30, env=env)
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            out = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, env=env, timeout=30)
            if out.stdout.strip() == "idle":
                break
            if time.monotonic() > deadline:
                logs = "".join((d / "log" / f).read_text()[-1500:] for f in ("slurmctld.log", "slurmd.log")
                               if (d / "log" / f).exists())
                pytest.fail(f"the SLURM node did not come up within {START_TIMEOUT_S:.0f} s: sinfo says "
                            f"{out.stdout.strip() or out.stderr.strip()}\n{logs}")
            time.sleep(0.5)
        yield {"env": env, "dir": d}
    finally:
        subprocess.run(["scancel", "--full", "-u", "root"], env=env, capture_output=True, timeout=30)
        _stop(pid_files[::-1])


def job_state(env: dict, job: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True, env=env, timeout=30)
    for word in out.stdout.split():
        if word.startswith("JobState="):
            return word.split("=", 1)[1]
    return "UNKNOWN"


def restart_count(env: dict, job: str) -> int:
    out = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True, env=env, timeout=30)
    for word in out.stdout.split():
        if word.startswith("Restarts="):
            return int(word.split("=", 1)[1])
    return -1



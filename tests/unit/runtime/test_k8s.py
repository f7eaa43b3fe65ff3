"""runtime/k8s.py: every field the two manifests of a run must hold, the YAML they are written as, and the pod's
script run by a real /bin/sh (with a stand-in `phalanx`): a stop before the end fails the pod, a finished run
does not. No Kubernetes cluster is reachable here: the manifests are checked field by field, not applied."""
from __future__ import annotations

import os
import shlex
import signal
import stat
import subprocess
import time
from pathlib import Path

import pytest

from phalanx import config as C
from phalanx.commands.args import parse
from phalanx.commands.train import COMMANDS as TRAIN
from phalanx.runtime import k8s

RUN = k8s.K8sRun(name="r50", image="registry.example/phalanx:0.1", run_dir="/runs/r50",
                 volume=k8s.Volume("runs", "/runs"), replicas=3, nproc="8", gpus=8, cpus="32", memory="200Gi",
                 max_restarts=4, grace_s=180, port=29500, namespace="ml",
                 data_volume=k8s.Volume("imagenet", "/data", read_only=True),
                 train_args=("--recipe", "imagefolder_224", "--data", "/data/imagenet", "--epochs", "3",
                             "--optim.lr=0.2"))


def pod_spec_of(doc: dict) -> dict:
    if doc["kind"] == "PyTorchJob":
        return doc["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
    return doc["spec"]["template"]["spec"]


def train_line(script: str) -> list[str]:
    line = next(x for x in script.splitlines() if x.startswith("phalanx train "))
    assert line.endswith(" &")
    return shlex.split(line[:-2])


def test_the_pytorchjob_has_a_master_and_workers_restarted_on_signals_within_the_backoff_limit():
    job = k8s.pytorchjob(RUN)
    assert (job["apiVersion"], job["kind"]) == ("kubeflow.org/v1", "PyTorchJob")
    assert job["metadata"] == {"name": "r50", "namespace": "ml", "labels": {"app.kubernetes.io/name": "phalanx"}}
    specs = job["spec"]["pytorchReplicaSpecs"]
    assert specs["Master"]["replicas"] == 1 and specs["Worker"]["replicas"] == 2  # 3 pods in all
    for spec in specs.values():
        assert spec["restartPolicy"] == "ExitCode"  # 128+N (killed, stopped early) restarts; 1-127 fails
        assert spec["template"]["spec"]["restartPolicy"] == "ExitCode"
    assert job["spec"]["runPolicy"]["backoffLimit"] == RUN.max_restarts == 4


def test_the_indexed_job_runs_one_pod_per_index_under_a_headless_service():
    service, job = k8s.manifests(RUN)["indexed-job.yaml"]
    assert (service["apiVersion"], service["kind"]) == ("v1", "Service")
    assert service["metadata"]["name"] == "r50" and service["metadata"]["namespace"] == "ml"
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"] is True
    assert service["spec"]["selector"] == {"job-name": "r50"}  # the label the Job controller puts on its pods
    assert service["spec"]["ports"] == [{"name": "rdzv", "port": 29500, "targetPort": 29500}]
    assert (job["apiVersion"], job["kind"]) == ("batch/v1", "Job")
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == spec["parallelism"] == 3
    assert spec["backoffLimit"] == RUN.max_restarts
    pod = spec["template"]["spec"]
    assert pod["subdomain"] == service["metadata"]["name"]  # pod K is r50-K.r50
    assert pod["restartPolicy"] == "Never"  # what a podFailurePolicy needs
    rules = spec["podFailurePolicy"]["rules"]
    assert rules[0] == {"action": "FailJob", "onExitCodes": {"containerName": "phalanx", "operator": "In",
                                                             "values": [2]}}  # a user's mistake: no retries
    assert rules[1] == {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]}  # a preemption


@pytest.mark.parametrize("kind, host", [("PyTorchJob", "r50-master-0"), ("Job", "r50-0.r50")])
def test_every_pod_runs_phalanx_train_with_the_rendezvous_on_the_first_pod(kind, host):
    doc = k8s.pytorchjob(RUN) if kind == "PyTorchJob" else k8s.indexed_job(RUN)
    pod = pod_spec_of(doc)
    assert pod["terminationGracePeriodSeconds"] == 180
    (c,) = pod["containers"]
    assert c["name"] == "phalanx" and c["image"] == RUN.image
    assert c["command"][:2] == ["/bin/sh", "-c"]
    script = c["command"][2]
    argv = train_line(script)
    assert argv[:2] == ["phalanx", "train"]
    # through Phalanx's own parser and config: the layout, the rendezvous and the user's options as given
    parsed = parse("train", TRAIN["train"].spec, argv[2:])
    cfg = C.build_config(parsed.recipe, parsed.pairs)
    p = cfg.parallel
    assert (p.nproc, p.nnodes, p.max_restarts) == ("8", 3, 4)
    assert p.rdzv_endpoint == f"{host}:29500" and p.rdzv_id == "r50"
    assert cfg.run_dir == "/runs/r50" and cfg.data.path == "/data/imagenet"
    assert cfg.epochs == 3 and cfg.optim.lr == 0.2 and parsed.recipe == "imagefolder_224"
    assert f"socket.getaddrinfo(sys.argv[1], None)' {host} " in script  # waits for the host's name, bounded
    assert f"[ $i -ge {k8s.DNS_WAIT_S} ]" in script
    assert ("unset RANK WORLD_SIZE MASTER_ADDR MASTER_PORT" in script) == (kind == "PyTorchJob")
    assert c["ports"] == [{"name": "rdzv", "containerPort": 29500}]
    assert c["resources"] == {"requests": {"cpu": "32", "memory": "200Gi"}, "limits": {"nvidia.com/gpu": 8}}


@pytest.mark.parametrize("kind", ["PyTorchJob", "Job"])
def test_the_run_directory_lies_on_the_claimed_volume_and_the_data_on_its_own(kind):
    pod = pod_spec_of(k8s.pytorchjob(RUN) if kind == "PyTorchJob" else k8s.indexed_job(RUN))
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["name"]: m for m in pod["containers"][0]["volumeMounts"]}
    assert volumes["run"]["persistentVolumeClaim"] == {"claimName": "runs"}
    assert mounts["run"]["mountPath"] == "/runs" and RUN.run_dir.startswith(mounts["run"]["mountPath"] + "/")
    assert volumes["data"]["persistentVolumeClaim"] == {"claimName": "imagenet", "readOnly": True}
    assert mounts["data"] == {"name": "data", "mountPath": "/data", "readOnly": True}
    assert volumes["dshm"] == {"name": "dshm", "emptyDir": {"medium": "Memory"}}
    assert mounts["dshm"]["mountPath"] == "/dev/shm"


def test_one_replica_has_no_rendezvous_and_no_workers():
    run = k8s.K8sRun(name="one", image="img", run_dir="/runs/one", volume=k8s.Volume("runs", "/runs"))
    job = k8s.pytorchjob(run)
    assert list(job["spec"]["pytorchReplicaSpecs"]) == ["Master"]
    script = pod_spec_of(job)["containers"][0]["command"][2]
    argv = train_line(script)
    assert not any(a.startswith(("--parallel.nnodes", "--parallel.rdzv")) for a in argv)
    assert "getaddrinfo" not in script and "ports" not in pod_spec_of(job)["containers"][0]
    assert "resources" not in pod_spec_of(job)["containers"][0] and "namespace" not in job["metadata"]
    assert k8s.indexed_job(run)["spec"]["completions"] == 1


def test_the_yaml_reads_back_as_the_same_documents():
    yaml = pytest.importorskip("yaml", reason="PyYAML reads the manifests back (pip install pyyaml)")
    odd = {"a": "yes", "b": "1", "c": "- x: y", "d": 'say "hi" #', "e": "", "f": [], "g": {}, "h": None,
           "i": "multi\n  line\n\nend\n", "j": "trailing \nspace\n", "k": "ü", "key with space": [{"x": [1, 2]}],
           "l": "no newline\nat the end", "m": [[1], {"n": True}], "o": 1.5, "p": "@at"}
    for docs in (k8s.manifests(RUN)["indexed-job.yaml"], k8s.manifests(RUN)["pytorchjob.yaml"], [odd, {"z": 1}]):
        assert list(yaml.safe_load_all(k8s.to_yaml(docs))) == docs


def test_the_script_is_a_literal_block_a_reader_can_follow():
    text = k8s.to_yaml([k8s.indexed_job(RUN)])
    assert "            - |\n              set -u\n" in text
    assert "              exit \"$STATUS\"\n" in text


def _fake_phalanx(bin_dir: Path, body: str) -> None:
    bin_dir.mkdir(parents=True, exist_ok=True)
    f = bin_dir / "phalanx"
    f.write_text("#!/bin/sh\n" + body)
    f.chmod(f.stat().st_mode | stat.S_IEXEC)


def _run_script(tmp_path: Path, body: str, signal_after_s: float | None = None) -> tuple[int, Path]:
    run_dir = tmp_path / "run"
    run_dir.mkdir(parents=True)
    run = k8s.K8sRun(name="t", image="img", run_dir=str(run_dir), volume=k8s.Volume("runs", str(tmp_path)))
    _fake_phalanx(tmp_path / "bin", body)
    script = k8s.pod_script(run, "Job")
    env = dict(os.environ, PATH=f"{tmp_path / 'bin'}:{os.environ['PATH']}", RUN_DIR=str(run_dir))
    p = subprocess.Popen(["/bin/sh", "-c", script], env=env, start_new_session=True)
    try:
        if signal_after_s is not None:
            deadline = time.monotonic() + 20
            while not (run_dir / "started").exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            p.send_signal(signal.SIGTERM)  # what the kubelet sends the container's first process
        return p.wait(timeout=30), run_dir
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)


def test_a_finished_run_ends_the_pod_with_0_and_a_user_error_with_2(tmp_path):
    code, _ = _run_script(tmp_path / "a", 'touch "$RUN_DIR/model.safetensors"; exit 0\n')
    assert code == 0
    code, _ = _run_script(tmp_path / "b", "exit 2\n")
    assert code == 2


def test_a_run_stopped_by_sigterm_before_its_end_fails_the_pod_so_that_it_is_replaced(tmp_path):
    # the stand-in checkpoints on SIGTERM and exits 0, as `phalanx train` does; no final weights yet
    body = ('trap \'echo checkpoint > "$RUN_DIR/stopped"; exit 0\' TERM\ntouch "$RUN_DIR/started"\n'
            'i=0; while [ $i -lt 200 ]; do sleep 0.1; i=$((i + 1)); done\nexit 0\n')
    code, run_dir = _run_script(tmp_path, body, signal_after_s=0)
    assert (run_dir / "stopped").exists()  # the signal reached phalanx through the shell's trap
    assert code == k8s.STOPPED_EXIT == 143

"""`phalanx k8s manifest`: the two files it writes, and one line for what cannot go into them."""
from __future__ import annotations

import pytest

from phalanx.commands import main

BASE = ["k8s", "manifest", "--image", "img:1", "--volume", "runs:/runs", "--run_dir", "/runs/r1"]


def test_the_manifests_are_written_into_the_folder_with_the_training_options(tmp_path, capsys):
    yaml = pytest.importorskip("yaml", reason="PyYAML reads the manifests back (pip install pyyaml)")
    out = tmp_path / "k8s"
    assert main([*BASE, "--name", "c10", "--replicas", "2", "--nproc", "4", "--gpus", "4", "--grace_s", "300",
                 "--max_restarts", "5", "--out", str(out), "--", "--epochs", "3", "--optim.lr=0.2"]) == 0
    said = capsys.readouterr().out
    assert f"wrote {out / 'pytorchjob.yaml'}" in said and f"wrote {out / 'indexed-job.yaml'}" in said
    (job,) = yaml.safe_load_all((out / "pytorchjob.yaml").read_text())
    service, indexed = yaml.safe_load_all((out / "indexed-job.yaml").read_text())
    assert job["kind"] == "PyTorchJob" and job["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"] == 1
    assert job["spec"]["runPolicy"]["backoffLimit"] == 5 and indexed["spec"]["backoffLimit"] == 5
    assert service["kind"] == "Service" and indexed["spec"]["completions"] == 2
    for doc in (job, indexed):
        pod = (doc["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"] if doc["kind"] == "PyTorchJob"
               else doc["spec"]["template"]["spec"])
        assert pod["terminationGracePeriodSeconds"] == 300
        script = pod["containers"][0]["command"][2]
        assert ("phalanx train --run_dir /runs/r1 --nproc 4 --parallel.max_restarts 5 --parallel.nnodes 2 "
                "--parallel.rdzv_endpoint ") in script
        assert "--parallel.rdzv_id c10 --epochs 3 --optim.lr=0.2 &" in script


@pytest.mark.parametrize("argv, says", [
    (["--out", "o"], "--image is required"),
    (["--image", "i", "--volume", "runs:/runs", "--run_dir", "/runs/r", "--name", "R_1", "--out", "o"],
     "--name 'R_1': a DNS label"),
    (["--image", "i", "--volume", "runs", "--run_dir", "/runs/r", "--out", "o"], "--volume 'runs': give CLAIM:MOUNT"),
    (["--image", "i", "--volume", "runs:/runs", "--run_dir", "/elsewhere/r", "--out", "o"],
     "--run_dir /elsewhere/r: must lie under the volume's mount /runs"),
    (["--image", "i", "--volume", "runs:/runs", "--run_dir", "/runs/r", "--nproc", "x", "--out", "o"],
     "--nproc x: a number of ranks per pod, or auto"),
    ([*BASE[2:], "--out", "o", "--", "--nproc", "2"], "--parallel.nproc after `--`: the manifest sets it; give --nproc"),
    ([*BASE[2:], "--out", "o", "--", "--rdzv-endpoint", "h:1"], "give --port to `phalanx k8s manifest`"),
    ([*BASE[2:], "--out", "o", "--", "--epochs", "two"], "epochs='two'"),
    ([*BASE[2:], "--out", "o", "--", "--optim.lrr", "0.1"], "unknown option 'optim.lrr'"),
    ([*BASE[2:], "--out", "o", "--replicas", "0"], "--replicas 0: must be a whole number >= 1"),
    ([*BASE[2:], "--out", "o", "--namespace", "ML team"], "--namespace 'ML team': a DNS label"),
])
def test_what_cannot_go_into_a_manifest_is_one_line(tmp_path, capsys, monkeypatch, argv, says):
    monkeypatch.chdir(tmp_path)
    assert main(["k8s", "manifest", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert says in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "o").exists()  # nothing written

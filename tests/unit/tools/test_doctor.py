"""`phalanx doctor`: passes on a machine that can train, and names each problem in one line."""
import json

import pytest

from phalanx.commands import main
from phalanx.tools import doctor
from tests.conftest import run_phalanx


def test_doctor_passes_on_this_machine_and_reports_every_section(tmp_path):
    r = run_phalanx(["doctor", "--json", "--out_dir", tmp_path / "runs"], tmp_path / "cache", timeout=120)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    report = json.loads(r.stdout)
    assert report["ok"] and report["problems"] == [] and r.stderr == ""
    assert {"python", "torch", "torchvision", "phalanx"} <= set(report["versions"])
    cpu = report["cpu"]
    assert cpu["cores_usable"] >= 1 and set(cpu["isa"]) == {"AVX2", "AVX-512", "AVX-512 BF16", "AMX"}
    gloo = next(b for b in report["backends"] if b["backend"] == "gloo")
    assert gloo["ok"] and gloo["ranks"] == 2 and gloo["latency_us"] > 0 and gloo["busbw_gbs"] > 0
    assert report["matmul"][0]["dtype"] == "float32" and report["matmul"][0]["gflops"] > 0
    assert set(report["storage"]) == {"shm", "cache", "output"} and report["storage"]["output"]["writable"]
    assert "present" in report["dataset"]
    assert report["layout"]["nproc"] >= 1 and report["layout"]["why"]
    assert report["seconds"] > 0  # how long it took is a figure of the report, not a test: the machine is shared


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="NCCL may work on a machine with GPUs")
def test_an_absent_backend_is_one_clear_problem_and_a_non_zero_exit(capsys):
    assert main(["doctor", "--backend", "nccl"]) == 1
    captured = capsys.readouterr()
    problems = captured.err.splitlines()
    assert len(problems) == 1 and problems[0].startswith("phalanx doctor: problem: backend nccl: ")
    assert "--backend gloo" in problems[0]
    assert "nccl: FAILS" in captured.out


def test_an_unwritable_or_full_folder_is_a_problem(tmp_path, monkeypatch):
    problems = []
    monkeypatch.setattr(doctor.os, "access", lambda path, mode: "locked" not in str(path))
    (tmp_path / "locked").mkdir()
    info = doctor.storage_info(str(tmp_path / "cache"), str(tmp_path / "locked" / "runs"), problems)
    assert not info["output"]["writable"] and info["cache"]["writable"]
    assert len(problems) == 1 and "runs: not writable" in problems[0] and "--out_dir" in problems[0]
    monkeypatch.setattr(doctor, "MIN_FREE_GIB", 1e9)
    problems.clear()
    doctor.storage_info(str(tmp_path / "cache"), str(tmp_path), problems)
    assert len(problems) == 2 and all("GiB free" in p for p in problems)

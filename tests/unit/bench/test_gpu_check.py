"""`make gpu-check` runs once, offline, on a GPU machine: its check bodies run here first, on the CPU with tiny
sizes, so that an API they call cannot have moved under them (the CUDA-only parts are skipped in one line)."""
import importlib.util
import json
from pathlib import Path

import pytest

from tests.conftest import make_idx_dataset

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_phalanx_step_and_plain_loop_side_by_side_on_a_small_input_resnet(gpu_check):
    row = gpu_check.phalanx_vs_plain("resnet18", 16, 3, 10, batch=2, steps=1, compile_=False, device="cpu",
                                     extra=(("model.small_input", "true"), ("threads_per_rank", "1")), warmup=1)
    assert row["phalanx_img_s"] > 0 and row["plain_img_s"] > 0
    assert row["overhead"] == pytest.approx(1 - row["phalanx_img_s"] / row["plain_img_s"], abs=0.05)  # rounding
    assert row["precision"] == "fp32" and row["optimizer_fused"] is False  # fused where the device has it: CUDA


def test_sync_free_steps_run_the_loops_own_functions(gpu_check, tmp_path):
    data = make_idx_dataset(tmp_path / "idx", 256, 64)
    row = gpu_check.sync_free_steps(str(data), "phalanx_cnn", 3, device="cpu", run_dir=tmp_path / "run", debug=False,
                                    extra=(("data.cache_dir", str(tmp_path / "cache")), ("global_batch", "16"),
                                           ("model.width", "8"), ("threads_per_rank", "1"), ("precision", "fp32")))
    # 16 steps an epoch: the loss is read every 4; warm-up 5 steps, then 3 checked, one of them (step 8) a read
    assert row["ok"] and row["read_every"] == 4 and row["checked_steps"] == 3 and row["read_steps"] == 1, row
    logged = [json.loads(x)["step"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert logged == [4, 8]


def test_checks_that_need_cuda_say_so_in_one_line(gpu_check, tmp_path):
    import torch
    if torch.cuda.is_available():
        pytest.skip("a GPU is here: the checks run for real under make gpu-check")
    for name in ("sync_free", "resnet50_overhead", "cifar_resnet", "nvjpeg_loader", "prefetch"):
        assert gpu_check.CHECKS[name][0](tmp_path) == {
            "skipped": "no CUDA device (torch.cuda.is_available() is False)"}, name


def test_generated_jpegs_are_what_training_would_decode_on_the_gpu(gpu_check, tmp_path):
    import torch

    from phalanx.data.streaming import ImageFolderStream, decodes_on_device
    root = gpu_check.make_jpeg_folder(tmp_path / "j", 8, 32)
    ds = ImageFolderStream(root, 16, 3, "all")
    assert len(ds) == 8 and len(ds.classes) == 4
    assert decodes_on_device(ds, torch.device("cuda", 0)) and not decodes_on_device(ds, torch.device("cpu"))


def test_the_checks_fit_the_budget_in_order(gpu_check):
    names = list(gpu_check.CHECKS)
    assert names[:2] == ["device", "sync_free"] and names[-1] == "recipe_1gpu_16ep"
    # The per-check limits of the checks run before the expendable last one fit a 400 s budget with room
    # for a slow one; each check is cut at its own limit (or at what is left of the budget).
    assert sum(limit for _, limit in list(gpu_check.CHECKS.values())) < 1100


def test_torchs_notice_about_the_sync_debug_mode_is_not_counted_as_a_sync(gpu_check):
    # what the first H100 run (torch 2.11) recorded as phalanx_cnn's only "sync"
    assert gpu_check.is_debug_mode_notice(UserWarning(
        "Synchronization debug mode is a prototype feature and does not yet detect all synchronizing operations "
        "(Triggered internally at /pytorch/torch/csrc/cuda/Module.cpp:900.)"))
    assert not gpu_check.is_debug_mode_notice(UserWarning("called a synchronizing CUDA operation"))

"""Runs shared by the multi-process tests: each is trained once per session, on first use."""
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import run_phalanx

# Same arithmetic on every rank count: one thread per rank, fp32, deterministic kernels.
EXACT = ["--threads_per_rank", "1", "--precision", "fp32", "--deterministic", "true", "--progress", "false",
         "--model.channels_last", "false"]
# 600 train images / 60 per step = 10 steps per epoch; 2 epochs = 20 steps.
BASE = ["--epochs", "2", "--global_batch", "60", "--model.width", "16", "--optim.lr", "0.05", "--eval_every", "2",
        "--ckpt.at_epoch_end", "true"]


def cmd(data, run_dir, nproc, *extra):
    return ["train", "--data", data, "--nproc", nproc, "--run_dir", run_dir, *BASE, *EXACT, *extra]


def assert_same_weights(a: Path, b: Path, exact=True):
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        if exact:
            assert torch.equal(wa[k], wb[k]), f"{k} differs"
        else:
            torch.testing.assert_close(wb[k], wa[k], rtol=1e-5, atol=1e-6, msg=k)


def trained_once(out: Path, cache_dir: Path, command: Callable[..., list]) -> Callable[..., Path]:
    """`get(nproc, *extra)` -> the run directory (in `out`) of an uninterrupted `phalanx` run of
    `command(run_dir, nproc, *extra)`, trained on first use and reused after."""
    done: dict = {}

    def get(nproc: int, *extra: str) -> Path:
        key = (nproc, extra)
        if key not in done:
            run_dir = out / f"run{len(done)}-n{nproc}"
            r = run_phalanx(command(run_dir, nproc, *extra), cache_dir)
            assert r.returncode == 0, r.stdout + r.stderr
            done[key] = run_dir
        return done[key]

    return get


@pytest.fixture(scope="session")
def reference_runs(tmp_path_factory, cache_dir, small_idx):
    """`reference_runs(nproc, *extra)` -> the run directory of an uninterrupted `cmd(...)` run (BASE, EXACT;
    BatchNorm and EMA 0.98 unless `extra` says otherwise), trained once per session."""
    return trained_once(tmp_path_factory.mktemp("reference"), cache_dir,
                        lambda run_dir, nproc, *extra: cmd(small_idx, run_dir, nproc, *extra))

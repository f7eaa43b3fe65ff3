"""PyTorch/XLA on PJRT's CPU client: run by `make test-xla` in .venv-xla (torch 2.9.0 + torch_xla 2.9.0) with
PJRT_DEVICE=CPU and CPU_NUM_DEVICES=2. Every run is trained once per session, on first use."""
import importlib.util
from pathlib import Path

import pytest

from tests.conftest import make_idx_dataset, run_phalanx

if importlib.util.find_spec("torch_xla") is None:  # the main environment: these tests need .venv-xla
    collect_ignore_glob = ["test_*.py"]

# 512 images / 32 per step = 16 steps per epoch; runs stop at step 8 (or 16). GroupNorm: per-image statistics,
# so 2 XLA devices sharing each batch and 2 gloo ranks splitting it compute the same function (BatchNorm's
# statistics differ by design: over the whole batch on XLA, over each rank's half under DDP). GELU, not ReLU:
# with the whitened stem (its filters come in +/- pairs) ReLU's inputs sit exactly at its kink, where XLA and
# oneDNN round to different sides: measured, weights 6e-8 apart gave gradients 4e-4 apart on XLA (not on CPU),
# and after 8 steps the raw weights were 1.7e-3 apart. With GELU (or no whitening) they stay ~1e-7 apart.
RECIPE = ["--epochs", "1", "--global_batch", "32", "--model.width", "8", "--model.norm", "group", "--model.act", "gelu",
          "--optim.lr", "0.1", "--eval_batch", "100", "--precision", "fp32", "--deterministic", "true",
          "--threads_per_rank", "1", "--progress", "false", "--ckpt.at_epoch_end", "false"]
XLA_ENV = {"PJRT_DEVICE": "CPU", "CPU_NUM_DEVICES": "2"}


@pytest.fixture(scope="session")
def xla_data(tmp_path_factory) -> Path:
    return make_idx_dataset(tmp_path_factory.mktemp("xla-idx"), 512, 250)


def train(data: Path, run_dir: Path, cache: Path, device: str, steps: int, *extra: str, fault: str = ""):
    """`phalanx train` of RECIPE on `device` (xla: 2 PJRT CPU devices, one process; cpu: 2 gloo ranks)."""
    nproc = "1" if device == "xla" else "2"
    env = dict(XLA_ENV, PHALANX_FAULT=fault) if fault else dict(XLA_ENV)
    r = run_phalanx(["train", "--data", data, "--device", device, "--nproc", nproc, "--max_steps", str(steps),
                     "--run_dir", run_dir, *RECIPE, *extra], cache, env_extra=env, timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    return r


@pytest.fixture(scope="session")
def runs(tmp_path_factory, cache_dir, xla_data):
    """`runs(name)`: the run directory of one of the session's uninterrupted runs, trained on first use."""
    out = tmp_path_factory.mktemp("xla-runs")
    recipes = {"xla8": ("xla", 8), "xla16": ("xla", 16), "gloo8": ("cpu", 8),
               # the EMA updated every 2 steps (--ema_every)
               "xla8-ema2": ("xla", 8, "--ema_every", "2"), "xla16-ema2": ("xla", 16, "--ema_every", "2"),
               "gloo8-ema2": ("cpu", 8, "--ema_every", "2")}
    done: dict = {}

    def get(name: str) -> Path:
        if name not in done:
            device, steps, *extra = recipes[name]
            train(xla_data, out / name, cache_dir, device, steps, *extra)
            done[name] = out / name
        return done[name]

    return get


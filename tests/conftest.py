import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FASHION = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One prepared-store cache for the whole session (prepares Fashion-MNIST once)."""
    d = Path(os.environ.get("PHALANX_TEST_CACHE") or tmp_path_factory.mktemp("phalanx-cache"))
    return d


def run_phalanx(args, cache: Path, timeout=600, env_extra=None, cwd=None) -> subprocess.CompletedProcess:
    """`python -m phalanx ARGS` in a fresh process, output captured."""
    # PHALANX_SLURM=0: a test suite run inside a SLURM allocation launches as on any machine (tests/slurm submits
    # its own jobs, with their own environment).
    env = dict(os.environ, PHALANX_CACHE=str(cache), PYTHONUNBUFFERED="1", PHALANX_SLURM="0")
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "phalanx", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=cwd)


@pytest.fixture(scope="session")
def fashion_available():
    if not (FASHION / "train-images-idx3-ubyte.gz").exists():
        pytest.skip("Fashion-MNIST is not installed (make test installs it)")
    return FASHION


def make_idx_dataset(folder: Path, n_train: int, n_test: int, seed: int = 0, size: int = 28) -> Path:
    """A small MNIST-format dataset whose labels depend on the pixels (so it is learnable)."""
    import gzip
    import struct

    import numpy as np

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)

    def write(name, arr):
        header = bytes([0, 0, 8, arr.ndim]) + b"".join(struct.pack(">I", d) for d in arr.shape)
        (folder / name).write_bytes(gzip.compress(header + arr.astype(np.uint8).tobytes()))

    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.integers(0, 10, n)
        images = rng.integers(0, 60, (n, size, size))
        for i, y in enumerate(labels):  # a bright bar whose row encodes the class
            images[i, 2 + 2 * y: 4 + 2 * y, 4:24] = 230
        write(f"{prefix}-images-idx3-ubyte.gz", images)
        write(f"{prefix}-labels-idx1-ubyte.gz", labels)
    return folder


@pytest.fixture(scope="session")
def small_idx(tmp_path_factory) -> Path:
    """600 train / 1001 test images: 1001 is divisible by none of 2, 3 (or by the eval chunk)."""
    return make_idx_dataset(tmp_path_factory.mktemp("small-idx"), 600, 1001)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """A finished run directory in a few seconds: 8 steps of a width-8 house CNN on 256 generated images
    (64 test images), trained in this process; its config names the cache holding its prepared store."""
    from phalanx.commands import main

    root = tmp_path_factory.mktemp("tiny-run")
    data = make_idx_dataset(root / "idx", 256, 64)
    run_dir = root / "run"
    code = main(["train", "--data", str(data), "--data.cache_dir", str(root / "cache"), "--nproc", "1",
                 "--epochs", "1", "--max_steps", "8", "--global_batch", "32", "--model.width", "8", "--ema", "0",
                 "--optim.lr", "0.4", "--progress", "false", "--ckpt.at_epoch_end", "false", "--run_dir", str(run_dir)])
    assert code == 0 and (run_dir / "model.safetensors").is_file()
    return run_dir


def wait_for(pred, timeout: float, what: str, every: float = 0.2):
    """pred()'s first true value, polled every `every` s; an AssertionError naming `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"{what}: not within {timeout:.0f} s")

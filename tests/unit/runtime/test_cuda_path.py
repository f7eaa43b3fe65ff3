"""The CUDA path, as far as a CPU machine can run it: the settings the CUDA accelerator makes, the layouts it
refuses with one line, fused optimizers, the compile mode, and which loader decodes a streamed folder.

What needs a GPU to run (the settings' effect, a sync-free step, nvJPEG) is `make gpu-check`'s."""
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from phalanx import config as C
from phalanx import runtime
from phalanx.config import OptimConfig, ParallelConfig
from phalanx.errors import ConfigError
from phalanx.runtime import CPUAccelerator, CUDAAccelerator
from phalanx.runtime.dist import check_ranks_fit, resolve_backend
from phalanx.runtime.launch import start_method

pytestmark = pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")


class OneGPU(CUDAAccelerator):
    """A node with one CUDA GPU, as the layout checks see it."""

    @classmethod
    def is_available(cls) -> bool:
        return True

    def device_count(self) -> int:
        return 1

    def describe(self) -> str:
        return "a test GPU x 1"


@pytest.fixture
def restore_backend_flags():
    saved = (torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision())
    yield
    torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32 = saved[:2]
    torch.set_float32_matmul_precision(saved[2])


def test_cuda_sets_cudnn_autotuning_and_tf32_unless_told_otherwise(restore_backend_flags):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no deprecation noise in a user's log (torch 2.9-2.11 warn on these)
        CUDAAccelerator().configure_training(deterministic=False, tf32=True)
        assert torch.backends.cudnn.benchmark and torch.backends.cudnn.allow_tf32
        assert torch.get_float32_matmul_precision() == "high"
        CUDAAccelerator().configure_training(deterministic=True, tf32=False)
        assert not torch.backends.cudnn.benchmark and not torch.backends.cudnn.allow_tf32
        assert torch.get_float32_matmul_precision() == "highest"


def test_cpu_training_settings_are_left_as_they_are(restore_backend_flags):
    torch.set_float32_matmul_precision("highest")
    CPUAccelerator().configure_training(deterministic=False, tf32=True)
    assert torch.get_float32_matmul_precision() == "highest" and not torch.backends.cudnn.benchmark


def test_tf32_and_compile_mode_are_config_fields_with_help():
    cfg = C.build_config(None, [("tf32", "false"), ("model.compile_mode", "max-autotune")])
    assert cfg.tf32 is False and cfg.model.compile_mode == "max-autotune"
    with pytest.raises(ConfigError, match="model.compile_mode"):
        C.build_config(None, [("model.compile_mode", "fastest")])
    text = C.help_text()
    assert "--tf32" in text and "TensorFloat-32" in text and "--model.compile_mode" in text


def test_more_ranks_than_gpus_is_one_line_unless_the_backend_lets_them_share():
    gpu = OneGPU()
    assert resolve_backend(ParallelConfig(), gpu) == "nccl"
    with pytest.raises(ConfigError) as e:
        check_ranks_fit(gpu, 2, resolve_backend(ParallelConfig(), gpu))
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("parallel.nproc=2: more ranks on this node than its 1 CUDA device(s)")
    assert "--nproc 1" in msg and "--parallel.backend gloo" in msg
    check_ranks_fit(gpu, 1, "nccl")
    check_ranks_fit(gpu, 2, resolve_backend(ParallelConfig(backend="gloo"), gpu))  # the GPU check's 2 ranks
    check_ranks_fit(CPUAccelerator(), 64, "gloo")  # CPU ranks are not bound to devices


def test_fork_with_cuda_is_refused(monkeypatch):
    with pytest.raises(ConfigError, match=r"^parallel.start_method='fork': CUDA cannot be used in a forked process"):
        C.build_config(None, [("device", "cuda"), ("parallel.start_method", "fork")])
    monkeypatch.setitem(runtime.KINDS, "cuda", OneGPU)  # --device auto on a GPU machine
    with pytest.raises(ConfigError, match="use --parallel.start_method spawn"):
        start_method(ParallelConfig(start_method="fork"), "auto")
    assert start_method(ParallelConfig(), "auto") == "spawn"
    assert start_method(ParallelConfig(start_method="fork"), "cpu") == "fork"


def test_fused_optimizers_where_the_accelerator_has_them():
    from phalanx.train.schedule import build_optimizer
    net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    for name in ("sgd", "adamw"):
        assert build_optimizer(net, OptimConfig(name=name), fused=True).defaults["fused"] is True
        assert not build_optimizer(net, OptimConfig(name=name)).defaults.get("fused")
    assert "fused" not in build_optimizer(net, OptimConfig(name="adadelta"), fused=True).defaults
    assert CUDAAccelerator.fused_optimizers and not CPUAccelerator.fused_optimizers


def _folder(root, suffixes):
    for c, suffix in zip(("a", "b"), suffixes):
        (root / c).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((12, 12, 3), 40 * i, np.uint8)).save(root / c / f"{i}{suffix}")
    return root


def test_a_streamed_jpeg_folder_is_decoded_on_the_gpu_and_anything_else_by_cpu_workers(tmp_path):
    from phalanx.data.streaming import ImageFolderStream, decodes_on_device
    jpegs = ImageFolderStream(_folder(tmp_path / "jpeg", (".jpg", ".JPEG")), 8, split="all")
    mixed = ImageFolderStream(_folder(tmp_path / "mixed", (".jpg", ".png")), 8, split="all")
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert decodes_on_device(jpegs, cuda) and not decodes_on_device(mixed, cuda)
    assert not decodes_on_device(jpegs, cpu)


def test_cpu_streaming_still_decodes_in_workers(tmp_path):
    from phalanx.config import AugmentConfig
    from phalanx.data.augment import Normalize
    from phalanx.data.sampler import GlobalSampler
    from phalanx.data.streaming import ImageFolderStream, StreamTrainLoader
    ds = ImageFolderStream(_folder(tmp_path / "jpeg", (".jpg", ".jpg")), 8, split="all")
    cpu = torch.device("cpu")
    loader = StreamTrainLoader(ds, GlobalSampler(len(ds), 2, seed=0), AugmentConfig(crop_pad=0, flip=False),
                               Normalize([0.0] * 3, [1.0] * 3, cpu, False), cpu, seed=0, workers=0)
    assert not loader.on_device and loader.loader.dataset is ds and not ds.encoded
    batch = next(loader.epoch(0))
    assert batch.x.shape == (2, 3, 8, 8) and batch.x.dtype == torch.float32
    # uniform grey images: every pixel of the batch is the image's level (decoded, not encoded bytes)
    levels = sorted({round(float(v) * 255) for v in batch.x.unique()})
    assert all(v in (0, 40, 80) for v in levels), levels


def test_phalanx_train_refuses_more_ranks_than_gpus_before_preparing_any_data(monkeypatch, tmp_path, capsys):
    from phalanx.commands import main
    from phalanx.commands import train as train_command
    monkeypatch.setitem(runtime.KINDS, "cuda", OneGPU)
    # Patched where the launcher calls it: patching the data module instead would be bound, for good, into
    # commands/train.py by its first import here, and fail every later training of the session.
    monkeypatch.setattr(train_command, "open_on_node", lambda *a, **k: pytest.fail("data prepared before the refusal"))
    assert main(["train", "--nproc", "2", "--run_dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "parallel.nproc=2: more ranks on this node than its 1 CUDA device(s)" in err
    assert not (tmp_path / "run").exists()

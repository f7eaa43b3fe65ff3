"""The XLA kind as the main environment sees it (no torch_xla there): absent, explained in one line, refused
where its layout does not fit. Training on XLA devices is tested in tests/xla (make test-xla)."""
import pytest
import torch

from phalanx import config as C
from phalanx import runtime
from phalanx.errors import ConfigError
from phalanx.runtime import xla


def test_device_xla_without_torch_xla_says_how_to_install_it(monkeypatch):
    monkeypatch.setattr(xla, "has_torch_xla", lambda: False)
    assert not runtime.XLAAccelerator.is_available()
    with pytest.raises(ConfigError, match=r"torch_xla\) is not installed here; pip install 'phalanx\[xla\]'") as e:
        runtime.accelerator("xla")
    assert "\n" not in str(e.value)


def test_device_xla_without_a_tpu_names_the_cpu_client(monkeypatch):
    monkeypatch.setattr(xla, "has_torch_xla", lambda: True)
    monkeypatch.setattr(xla, "tpu_chips", lambda: 0)
    monkeypatch.delenv("PJRT_DEVICE", raising=False)
    with pytest.raises(ConfigError, match="no TPU on this host; .* set PJRT_DEVICE=CPU"):
        runtime.accelerator("xla")


def test_auto_passes_over_xla_when_it_is_absent(monkeypatch):
    monkeypatch.setattr(xla, "has_torch_xla", lambda: False)
    assert runtime.accelerator("auto").kind == ("cuda" if torch.cuda.is_available() else "cpu")


def test_the_step_hooks_do_nothing_on_cpu():
    acc = runtime.CPUAccelerator()
    t = torch.ones(4, 2)
    assert acc.shard_batch(t) is t and acc.compiled_graphs() is None
    acc.step_barrier()


@pytest.mark.parametrize("flag, value, field", [("parallel.nproc", "2", "parallel.nproc"),
                                                ("parallel.nnodes", "2", "parallel.nnodes"),
                                                ("parallel.strategy", "fsdp", "parallel.strategy"),
                                                ("model.compile", "true", "model.compile")])
def test_xla_runs_one_spmd_process_per_host_and_refuses_what_does_not_fit(flag, value, field):
    with pytest.raises(ConfigError, match=f"{field}=.*--device xla"):
        C.build_config(None, [("device", "xla"), (flag, value)])


def test_a_bare_torchrun_of_several_ranks_on_xla_is_one_line_before_any_process_group(monkeypatch):
    from phalanx.config import ParallelConfig
    from phalanx.runtime import dist as rdist
    monkeypatch.setattr(xla, "has_torch_xla", lambda: True)
    monkeypatch.setenv("PJRT_DEVICE", "CPU")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")  # as torchrun sets them (without, launch_vars refuses first)
    monkeypatch.setenv("MASTER_PORT", "29500")
    monkeypatch.setattr(rdist.dist, "init_process_group", lambda *a, **k: pytest.fail("joined a process group"))
    with pytest.raises(ConfigError, match=r"^--device xla: this process is rank 1 of 4 \(started by torchrun\?\)") as e:
        rdist.init(ParallelConfig(), "xla")
    assert "\n" not in str(e.value) and "without torchrun" in str(e.value)

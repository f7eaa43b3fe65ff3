"""The XLA accelerator in this process: 2 PJRT CPU devices as one SPMD mesh."""
import pytest
import torch

from phalanx import runtime
from phalanx.errors import ConfigError
from phalanx.train.precision import Precision

pytestmark = pytest.mark.xla


@pytest.fixture(scope="module")
def xla():
    acc = runtime.accelerator("xla")
    return acc, acc.bind(0)


def test_auto_picks_xla_where_a_device_is_named(xla):
    assert runtime.accelerator("auto").kind == "xla"  # PJRT_DEVICE=CPU is set by make test-xla
    assert xla[0].device_count() == 2 and xla[1].type == "xla"
    assert xla[0].auto_nproc(512)[0] == 1


def test_precision_policy_bf16_when_asked_fp32_by_default_on_the_cpu_client_fp16_refused(xla):
    acc, device = xla
    assert Precision.from_config("auto", acc).name == "fp32"  # bf16 on a TPU: XLA:CPU only emulates it
    prec = Precision.from_config("bf16", acc)
    assert prec.name == "bf16" and prec.scaler is None
    conv = torch.nn.Conv2d(1, 4, 3).to(device)
    with prec.autocast():
        out = conv(torch.ones(2, 1, 8, 8, device=device))
    assert out.dtype == torch.bfloat16
    with pytest.raises(ConfigError, match="precision=fp16: XLA devices compute in bfloat16"):
        Precision.from_config("fp16", acc)


def test_a_batch_is_split_over_the_mesh_and_the_step_is_one_graph(xla):
    import torch_xla

    acc, device = xla
    x = acc.shard_batch(torch.arange(8.0).reshape(4, 2).to(device))
    assert "devices=[2,1]" in torch_xla._XLAC._get_xla_sharding_spec(x)
    before = acc.compiled_graphs()
    for _ in range(3):
        y = (x * 2).sum(0)
        acc.step_barrier()
    assert acc.compiled_graphs() == before + 1  # the same traced step, compiled once
    assert y.cpu().tolist() == [24.0, 32.0]


def test_rng_state_round_trip_and_a_cpu_state_loads(xla):
    acc, device = xla
    st = acc.rng_state()
    assert set(st) == {"torch", "xla"} and all(t.dtype == torch.uint8 for t in st.values())
    a = torch.rand(3, device=device).cpu()
    acc.set_rng_state(st)
    assert torch.equal(torch.rand(3, device=device).cpu(), a)
    acc.set_rng_state({"torch": torch.get_rng_state()})  # written on CPU: no XLA generator state


def test_batches_sent_from_the_host_by_the_loader_thread_equal_resident_ones(xla, tmp_path):
    """Data too large to keep on the device is gathered and sent by a background thread (MpDeviceLoader's
    job), two batches ahead: the augmented batches equal those gathered from a resident copy and on CPU."""
    from phalanx.config import AugmentConfig
    from phalanx.data.augment import Normalize
    from phalanx.data.loader import TrainLoader
    from phalanx.data.sampler import GlobalSampler
    from phalanx.data.sources import open_on_node
    from tests.conftest import make_idx_dataset

    acc, device = xla
    store = open_on_node(str(make_idx_dataset(tmp_path / "idx", 96, 8)), str(tmp_path / "cache"), False, 0, 0, 0)
    split = store["train"]
    sampler = GlobalSampler(len(split), 32, 0, 1, 0, 1)
    got = {}
    for name, dev, resident in (("cpu", torch.device("cpu"), False), ("resident", device, True),
                                ("sent", device, False)):
        loader = TrainLoader(split, sampler, AugmentConfig(cutout=4), Normalize(store.mean, store.std, dev, True),
                             dev, 0, prefetch=True, resident=resident)
        assert loader.prefetch == (name == "sent")
        got[name] = [(b.x.cpu(), b.y.cpu()) for b in loader.epoch(0)]
    assert len(got["cpu"]) == 3
    for name in ("resident", "sent"):
        for (xc, yc), (x, y) in zip(got["cpu"], got[name]):
            assert torch.equal(yc, y) and torch.allclose(xc, x, atol=1e-6), name

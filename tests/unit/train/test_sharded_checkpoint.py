"""Sharded (DCP) checkpoints in one process: the write is sealed like a full one, the read is checked
and builds nothing but DCP's metadata classes (multi-rank writes and reshards: tests/dist/test_fsdp.py)."""
import json
import pickle
import warnings

import pytest
import torch

from phalanx.config import Config
from phalanx.errors import CheckpointError
from phalanx.models import build_model
from phalanx.parallel.model_state import averaged_model
from phalanx.train import checkpoint as ckpt
from phalanx.train import sharded_checkpoint as sc
from phalanx.train.schedule import build_optimizer


def _trained(width=8, seed=0):
    torch.manual_seed(seed)
    net = build_model("phalanx_cnn", 10, 1, 28, width)
    opt = build_optimizer(net, Config().optim)
    ema = averaged_model(net, 0.9)
    for _ in range(2):
        net(torch.randn(4, 1, 28, 28)).sum().backward()
        opt.step()
        opt.zero_grad()
        ema.update_parameters(net)
    return net, opt, ema


def _save(root, net, opt, ema):
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
    state = {"position": {"epoch": 0, "step": 2, "global_step": 2}, "scheduler": {}, "scaler": None, "history": [],
             "world": 1, "rng": {"0": {"torch": torch.get_rng_state()}}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DCP warns that it runs without a process group
        return sc.save(root, 2, get_model_state_dict(net), get_optimizer_state_dict(net, opt), state,
                       ema.state_dict(), keep=2, rank=0)


def _load(path, net, opt, ema):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sc.load_into(path, net, opt, ema)


def test_save_then_load_gives_back_model_optimizer_and_ema(tmp_path):
    net, opt, ema = _trained()
    path = _save(tmp_path / "checkpoints", net, opt, ema)
    assert path.name == "step-00000002" and (tmp_path / "checkpoints" / "latest").read_text() == path.name
    assert {".metadata", "__0_0.distcp", "COMPLETE", "state.json", "rng.safetensors"} == {p.name for p in
                                                                                          path.iterdir()}
    got = ckpt.load(path)
    assert got["sharded"] and got["model"] is None and got["state"]["format"] == "dcp"
    net2, opt2, ema2 = _trained(seed=1)
    _load(path, net2, opt2, ema2)
    for a, b in zip(net.state_dict().values(), net2.state_dict().values()):
        assert torch.equal(a, b)
    for a, b in zip(ema.state_dict().values(), ema2.state_dict().values()):
        assert torch.equal(a, b)
    for p, q in zip(net.parameters(), net2.parameters()):
        if p in opt.state:
            assert torch.equal(opt.state[p]["momentum_buffer"], opt2.state[q]["momentum_buffer"])


def test_another_models_checkpoint_is_one_line(tmp_path):
    path = _save(tmp_path, *_trained(width=8))
    with pytest.raises(CheckpointError, match="weights do not match the model") as e:
        _load(path, *_trained(width=16))
    assert "\n" not in str(e.value)


def _reseal(path):
    """Rewrite COMPLETE for the files as they are now (a tamperer who also rewrites the marker)."""
    files = sorted(p.name for p in path.iterdir() if p.name != "COMPLETE")
    (path / "COMPLETE").write_text(json.dumps({"files": {f: ckpt.sha256_file(path / f) for f in files}}))


class _Payload:
    def __reduce__(self):
        import os
        return (os.system, ("touch PWNED",))


def test_metadata_is_never_unpickled_beyond_dcp_classes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = _save(tmp_path / "c", *_trained())
    (path / ".metadata").write_bytes(pickle.dumps(_Payload()))
    _reseal(path)
    with pytest.raises(CheckpointError, match=r"\.metadata: not a DCP metadata file .*os") as e:
        _load(path, *_trained())
    assert "\n" not in str(e.value)
    assert not (tmp_path / "PWNED").exists()


def test_a_truncated_shard_fails_its_checksum(tmp_path):
    path = _save(tmp_path, *_trained())
    shard = path / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:50])
    with pytest.raises(CheckpointError, match="__0_0.distcp: checksum mismatch"):
        ckpt.load(path)
    _reseal(path)  # even with the marker rewritten, DCP's read fails in one line naming the folder
    with pytest.raises(CheckpointError, match="cannot read the sharded checkpoint") as e:
        _load(path, *_trained())
    assert "\n" not in str(e.value)


def test_an_unlisted_shard_or_unknown_format_is_refused(tmp_path):
    path = _save(tmp_path, *_trained())
    (path / "__7_0.distcp").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="not listed"):
        ckpt.load(path)
    (path / "__7_0.distcp").unlink()
    st = json.loads((path / "state.json").read_text())
    (path / "state.json").write_text(json.dumps(dict(st, format="zip")))
    _reseal(path)
    with pytest.raises(CheckpointError, match="field 'format'"):
        ckpt.load(path)

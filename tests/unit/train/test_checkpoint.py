import json

import pytest
import torch

from phalanx.errors import CheckpointError
from phalanx.models import build_model
from phalanx.train import checkpoint as ckpt


def _state():
    torch.manual_seed(0)
    m = build_model("phalanx_cnn", 10, 1, 28, 8)
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    m(torch.randn(4, 1, 28, 28)).sum().backward()
    opt.step()
    return m, opt


def _save(tmp_path, step=5, keep=3):
    m, opt = _state()
    state = {"position": {"epoch": 0, "step": step, "global_step": step}, "rng": {"0": {"torch": torch.get_rng_state()}}}
    return ckpt.save(tmp_path / "checkpoints", step, m.state_dict(), opt.state_dict(), state, keep=keep), m, opt


def test_pack_unpack_keeps_int_keys_tuples_and_tensors():
    _, opt = _state()
    sd = opt.state_dict()
    tensors = {}
    packed = json.loads(json.dumps(ckpt.pack(sd, tensors)))  # really through JSON
    back = ckpt.unpack(packed, tensors)
    assert set(back["state"]) == set(sd["state"]) and all(isinstance(k, int) for k in back["state"])
    for k, v in sd["state"].items():
        assert torch.equal(back["state"][k]["momentum_buffer"], v["momentum_buffer"])
    assert back["param_groups"] == sd["param_groups"]


def test_save_then_load_restores_everything(tmp_path):
    path, m, opt = _save(tmp_path)
    got = ckpt.load(path)
    for k, v in m.state_dict().items():
        assert torch.equal(got["model"][k], v)
    opt2 = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    opt2.load_state_dict(got["optim"])
    assert got["state"]["position"]["global_step"] == 5
    rng = got["state"]["rng"]["0"]["torch"]
    assert rng.dtype == torch.uint8 and torch.equal(rng, torch.get_rng_state())  # nothing drew since the save
    assert (tmp_path / "checkpoints" / "latest").read_text() == path.name


def test_keeps_only_the_last_k(tmp_path):
    for s in (1, 2, 3, 4):
        _save(tmp_path, s, keep=2)
    names = sorted(p.name for p in (tmp_path / "checkpoints").glob("step-*"))
    assert names == ["step-00000003", "step-00000004"]


@pytest.mark.parametrize("damage", ["truncate", "bitflip", "marker"])
def test_damaged_checkpoint_is_refused_and_the_previous_one_used(tmp_path, damage):
    old, _, _ = _save(tmp_path, 3)
    new, _, _ = _save(tmp_path, 6)
    f = new / "model.safetensors"
    if damage == "truncate":
        f.write_bytes(f.read_bytes()[:-100])
    elif damage == "bitflip":
        b = bytearray(f.read_bytes())
        b[len(b) // 2] ^= 0x01
        f.write_bytes(bytes(b))
    else:
        (new / ckpt.MARKER).unlink()
    with pytest.raises(CheckpointError) as e:
        ckpt.load(new)
    msg = str(e.value)
    assert "\n" not in msg
    assert ("model.safetensors: checksum mismatch" in msg) if damage != "marker" else ("incomplete checkpoint" in msg)
    assert ckpt.find_latest(tmp_path) == old


def test_a_checkpoint_of_another_model_is_refused_with_one_line(tmp_path):
    path, _, _ = _save(tmp_path)
    other = build_model("phalanx_cnn", 10, 1, 28, 16)
    with pytest.raises(CheckpointError, match=r"model.safetensors: weights do not match the model \(shape"):
        ckpt.load_into(other, ckpt.load(path)["model"], path / "model.safetensors")


def test_nothing_is_unpickled(tmp_path):
    path, _, _ = _save(tmp_path)
    kinds = {p.suffix for p in path.iterdir()}
    assert kinds <= {".safetensors", ".json", ""}, kinds

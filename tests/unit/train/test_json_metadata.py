"""Every JSON metadata file a checkpoint or exported model is read from (state.json, COMPLETE,
model.json), whatever it holds, gives either a loaded checkpoint/model or one CheckpointError line
naming the file: never a KeyError, TypeError or other traceback."""
import json
import shutil

import pytest
import torch
from hypothesis import HealthCheck, event, example, given, settings

from phalanx.durable import sha256_file
from phalanx.errors import CheckpointError
from phalanx.models import build_model
from phalanx.train import checkpoint as ckpt
from phalanx.train.evaluate import load_weights
from phalanx.train.finish import export_weights
from tests.unit.train.json_documents import file_contents

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _checkpoint(root):
    torch.manual_seed(0)
    m = build_model("phalanx_cnn", 10, 1, 28, 8)
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    m(torch.randn(4, 1, 28, 28)).sum().backward()
    opt.step()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    state = {"position": {"epoch": 1, "step": 2, "global_step": 7}, "scheduler": sched.state_dict(),
             "scaler": None, "history": [{"epoch": 1, "acc": 0.5}], "world": 1, "global_batch": 8,
             "config": {"seed": 0}, "reason": "test", "rng": {"0": {"torch": torch.get_rng_state()}}}
    return ckpt.save(root / "checkpoints", 7, m.state_dict(), opt.state_dict(), state)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return _checkpoint(tmp_path_factory.mktemp("run"))


def _one_line(e: BaseException, path) -> None:
    msg = str(e)
    assert "\n" not in msg and str(path) in msg, msg


def _write_listed(ckpt_dir, name: str, content: bytes) -> None:
    """Write a file of the checkpoint and its digest in COMPLETE, as a careful forger would."""
    (ckpt_dir / name).write_bytes(content)
    marker = json.loads((ckpt_dir / ckpt.MARKER).read_text())
    marker["files"][name] = sha256_file(ckpt_dir / name)
    (ckpt_dir / ckpt.MARKER).write_text(json.dumps(marker))


def test_state_json_of_any_content_loads_or_is_one_checkpoint_error(checkpoint):
    spath = checkpoint / "state.json"
    original, marker = spath.read_bytes(), (checkpoint / ckpt.MARKER).read_bytes()
    valid = json.loads(original)

    @SETTINGS
    @given(file_contents(valid))
    @example(b"[]")
    @example(b"\xff\xfe not utf-8")
    @example(json.dumps(dict(valid, position={"epoch": 0, "step": 0})).encode())
    @example(json.dumps(dict(valid, position={"epoch": 0, "step": 0, "global_step": 0, "x": 1})).encode())
    @example(json.dumps(dict(valid, optim={"__tensor__": "optim.999"})).encode())
    @example(json.dumps(dict(valid, optim={"__dict__": 3})).encode())
    @example(json.dumps(dict(valid, rng={"__list__": [1], "tuple": False})).encode())
    @example(json.dumps({k: v for k, v in valid.items() if k != "scheduler"}).encode())
    def check(content):
        _write_listed(checkpoint, "state.json", content)
        try:
            got = ckpt.load(checkpoint)
        except CheckpointError as e:
            _one_line(e, spath)
            event("refused")
            return
        event("loaded")
        st = got["state"]
        assert set(st["position"]) == {"epoch", "step", "global_step"} and isinstance(st["scheduler"], dict)
        assert isinstance(got["optim"]["param_groups"], list)

    try:
        check()
    finally:
        spath.write_bytes(original)
        (checkpoint / ckpt.MARKER).write_bytes(marker)
    assert ckpt.load(checkpoint)["state"]["position"]["global_step"] == 7


def test_complete_marker_of_any_content_verifies_or_is_one_checkpoint_error(checkpoint):
    mpath = checkpoint / ckpt.MARKER
    original = mpath.read_bytes()
    valid = json.loads(original)

    @SETTINGS
    @given(file_contents(valid))
    @example(b"null")
    @example(json.dumps(dict(valid, files={})).encode())
    @example(json.dumps(dict(valid, files=dict(valid["files"], **{"../../etc/passwd": "0" * 64}))).encode())
    @example(json.dumps(dict(valid, files=dict(valid["files"], **{"/etc/hostname": "0" * 64}))).encode())
    @example(json.dumps(dict(valid, global_step="7")).encode())
    def check(content):
        mpath.write_bytes(content)
        try:
            got = ckpt.load(checkpoint)
        except CheckpointError as e:
            _one_line(e, checkpoint)
            event("refused")
            return
        event("loaded")
        assert got["state"]["position"]["global_step"] == 7

    try:
        check()
    finally:
        mpath.write_bytes(original)
    assert ckpt.find_latest(checkpoint) == checkpoint


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    run = tmp_path_factory.mktemp("exported")
    model = build_model("phalanx_cnn", 3, 1, 28, 8)
    meta = {"model": "phalanx_cnn", "width": 8, "norm": "batch", "act": "relu", "num_classes": 3,
            "in_channels": 1, "image_size": 28, "classes": ["a", "b", "c"], "mean": [0.5], "std": [0.25],
            "ema": False}
    export_weights(model, run / "model.safetensors", meta)
    return run


def test_model_json_of_any_content_loads_or_is_one_checkpoint_error(exported):
    mpath = exported / "model.json"
    original = mpath.read_bytes()
    valid = json.loads(original)

    @SETTINGS
    @given(file_contents(valid))
    @example(b"\"phalanx_cnn\"")
    @example(json.dumps(dict(valid, num_classes=10**12)).encode())
    @example(json.dumps(dict(valid, width=4096, num_classes=2**20)).encode())
    @example(json.dumps(dict(valid, model="resnet18")).encode())
    @example(json.dumps(dict(valid, model="mnist_net", image_size=1)).encode())
    @example(json.dumps(dict(valid, norm="group", width=3)).encode())
    @example(json.dumps(dict(valid, classes=["a"])).encode())
    @example(json.dumps(dict(valid, in_channels=True)).encode())
    def check(content):
        mpath.write_bytes(content)
        try:
            model, meta = load_weights(exported)
        except CheckpointError as e:
            _one_line(e, exported)
            event("refused")
            return
        event("loaded")
        assert len(meta["classes"]) == meta["num_classes"] and len(meta["mean"]) == meta["in_channels"]
        assert model(torch.zeros(1, meta["in_channels"], 28, 28)).shape == (1, meta["num_classes"])

    try:
        check()
    finally:
        mpath.write_bytes(original)
    assert load_weights(exported)[1] == valid


def test_a_checkpoint_written_by_save_passes_every_check(tmp_path):
    path = _checkpoint(tmp_path)
    shutil.copytree(path, tmp_path / "copy")
    got = ckpt.load(tmp_path / "copy")
    assert got["state"]["reason"] == "test" and got["ema"] is None

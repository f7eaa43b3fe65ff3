import errno
import json
import os

import pytest
import torch
from safetensors.torch import save_file as safetensors_save_file

from phalanx.errors import CheckpointError
from phalanx.models import build_model
from phalanx.parallel.model_state import load_into
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
    state = {"position": {"epoch": 0, "step": step, "global_step": step}, "scheduler": {"last_epoch": step},
             "rng": {"0": {"torch": torch.get_rng_state()}}}
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
        load_into(other, ckpt.load(path)["model"], path / "model.safetensors")


def test_nothing_is_unpickled(tmp_path):
    path, _, _ = _save(tmp_path)
    kinds = {p.suffix for p in path.iterdir()}
    assert kinds <= {".safetensors", ".json", ""}, kinds


# ----------------------------------------------------------------------------- hardening (issue 17)

def _rewrite_marker(ckpt_dir, change):
    """Apply `change` to the checkpoint's COMPLETE marker (a dict) and write it back."""
    marker = json.loads((ckpt_dir / ckpt.MARKER).read_text())
    change(marker)
    (ckpt_dir / ckpt.MARKER).write_text(json.dumps(marker))


@pytest.mark.parametrize("name", ["../outside.bin", "/etc/hostname", "sub/model.safetensors", "..", ".", "",
                                  "a\\b", "nul\0byte"])
def test_a_marker_naming_a_file_outside_its_folder_is_refused_naming_marker_and_name(tmp_path, name):
    path, _, _ = _save(tmp_path)
    (tmp_path / "checkpoints" / "outside.bin").write_bytes(b"secret")
    digest = "0" * 64
    _rewrite_marker(path, lambda m: m["files"].__setitem__(name, digest))
    with pytest.raises(CheckpointError) as e:
        ckpt.verify(path)
    msg = str(e.value)
    assert "\n" not in msg and str(path / ckpt.MARKER) in msg and repr(name) in msg
    assert "not a plain file name" in msg
    assert ckpt.find_latest(tmp_path) is None


def test_a_listed_file_that_is_a_symlink_is_refused(tmp_path):
    path, _, _ = _save(tmp_path)
    outside = tmp_path / "elsewhere.safetensors"
    (path / "model.safetensors").rename(outside)
    (path / "model.safetensors").symlink_to(outside)
    with pytest.raises(CheckpointError, match=r"model.safetensors: a symbolic link"):
        ckpt.verify(path)


def test_a_file_that_load_reads_must_be_listed_in_the_marker(tmp_path):
    path, _, _ = _save(tmp_path)
    _rewrite_marker(path, lambda m: m["files"].pop("state.json"))
    with pytest.raises(CheckpointError, match=r"state.json: not listed in .*COMPLETE"):
        ckpt.load(path)


def test_stale_partial_writes_are_removed_before_a_save(tmp_path, monkeypatch):
    root = tmp_path / "checkpoints"
    root.mkdir()
    stale = root / ".step-00000004.tmp-999999999"  # a writer that is gone (ran out of space, say)
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"x" * 1000)
    seen_before_write = []
    real_save_file = ckpt.save_file

    def save_file(tensors, filename, *a, **kw):
        seen_before_write.append(stale.exists())
        return real_save_file(tensors, filename, *a, **kw)

    monkeypatch.setattr(ckpt, "save_file", save_file)
    _save(tmp_path, 5)
    assert seen_before_write and not any(seen_before_write)  # gone before the first file was written
    assert not stale.exists()


def test_a_full_disk_is_one_line_and_leaves_no_partial_folder(tmp_path, monkeypatch):
    old, _, _ = _save(tmp_path, 3)
    root = tmp_path / "checkpoints"
    calls = []

    def full(tensors, filename, *a, **kw):
        calls.append(filename)
        if len(calls) == 2:  # the model was written, the optimizer state does not fit
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(filename))
        return safetensors_save_file(tensors, filename, *a, **kw)

    monkeypatch.setattr(ckpt, "save_file", full)
    with pytest.raises(CheckpointError) as e:
        _save(tmp_path, 6)
    assert str(e.value) == (f"{root}: cannot write the checkpoint (No space left on device); free space or set "
                            f"--ckpt.keep lower")
    assert e.value.__cause__ is None and e.value.__suppress_context__
    assert sorted(p.name for p in root.iterdir()) == ["latest", old.name]  # no partial folder, nothing else lost
    assert ckpt.find_latest(tmp_path) == old


def test_a_safetensors_io_error_is_the_same_one_line(tmp_path, monkeypatch):
    from safetensors import SafetensorError

    def full(tensors, filename, *a, **kw):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(ckpt, "save_file", full)
    with pytest.raises(CheckpointError, match=r"cannot write the checkpoint \(No space left on device\); free space"):
        _save(tmp_path, 6)
    assert not list((tmp_path / "checkpoints").glob(".step-*"))


def _corrupt(ckpt_dir):
    f = ckpt_dir / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-10])


def test_find_latest_reports_the_checkpoints_it_skipped(tmp_path):
    old, _, _ = _save(tmp_path, 3)
    mid, _, _ = _save(tmp_path, 6)
    new, _, _ = _save(tmp_path, 9)
    _corrupt(new)
    (mid / ckpt.MARKER).unlink()
    skipped = []
    assert ckpt.find_latest(tmp_path, skipped) == old
    assert [p for p, _ in skipped] == [new, mid]
    assert "checksum mismatch" in skipped[0][1] and "incomplete checkpoint" in skipped[1][1]
    assert all("\n" not in why for _, why in skipped)
    assert ckpt.find_latest(tmp_path) == old  # the argument stays optional


def test_find_latest_of_a_checkpoint_folder_reports_it_when_invalid(tmp_path):
    path, _, _ = _save(tmp_path)
    _corrupt(path)
    skipped = []
    assert ckpt.find_latest(path, skipped) is None
    assert skipped and skipped[0][0] == path


def test_set_aside_renames_and_never_deletes(tmp_path):
    root = tmp_path / "checkpoints"
    first, _, _ = _save(tmp_path, 6)
    _corrupt(first)
    files = sorted(p.name for p in first.iterdir())
    moved = ckpt.set_aside(first)
    assert moved == root / "step-00000006.corrupt" and not first.exists()
    assert sorted(p.name for p in moved.iterdir()) == files
    again, _, _ = _save(tmp_path, 6)
    _corrupt(again)
    assert ckpt.set_aside(again) == root / "step-00000006.corrupt-2"
    third, _, _ = _save(tmp_path, 6)
    _corrupt(third)
    assert ckpt.set_aside(third) == root / "step-00000006.corrupt-3"


def test_set_aside_folders_are_never_pruned_nor_resumed_from(tmp_path):
    root = tmp_path / "checkpoints"
    bad, _, _ = _save(tmp_path, 9, keep=1)
    aside = ckpt.set_aside(bad)  # valid inside: still never a candidate
    for s in (1, 2, 3):
        _save(tmp_path, s, keep=1)
    assert aside.is_dir() and ckpt.verify(aside)
    assert sorted(p.name for p in root.glob("step-*")) == ["step-00000003", "step-00000009.corrupt"]
    assert ckpt.find_latest(tmp_path) == root / "step-00000003"


def test_a_corrupt_checkpoint_at_the_step_being_written_is_set_aside(tmp_path):
    path, _, _ = _save(tmp_path, 6)
    _corrupt(path)
    again, _, _ = _save(tmp_path, 6)
    assert again == path and ckpt.verify(again)
    assert (path.parent / "step-00000006.corrupt").is_dir()


def test_a_real_write_error_from_safetensors_is_one_line(tmp_path):
    """Not a monkeypatch: the file size limit makes the kernel refuse safetensors' own write."""
    import subprocess
    import sys
    code = f"""
import resource, signal, torch
from phalanx.parallel.model_state import load_into
from phalanx.train import checkpoint as ckpt
from phalanx.errors import CheckpointError
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write() then fails with EFBIG instead of killing us
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
try:
    ckpt.save({str(tmp_path)!r}, 1, {{"w": torch.zeros(10000)}}, {{"state": {{}}, "param_groups": []}},
              {{"position": {{"epoch": 0, "step": 1, "global_step": 1}}, "scheduler": {{}}}})
except CheckpointError as e:
    print("ERROR", e)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.startswith("ERROR ") and out.stdout.count("\n") == 1, (out.stdout, out.stderr)
    assert f"{tmp_path}: cannot write the checkpoint (File too large)" in out.stdout
    assert not list(tmp_path.glob(".step-*")) and not list(tmp_path.glob("step-*"))

"""In-memory snapshots: the file format, the two slots, the marker written last, the restart plan, the memory check."""
import os
import subprocess
import sys

import pytest
import torch

from phalanx.errors import ConfigError
from phalanx.train import snapshot as S


def a_state():
    g = torch.Generator().manual_seed(0)
    return {"model": {"w": torch.randn(3, 4, generator=g), "n": torch.tensor(7), "h": torch.randn(5).bfloat16()},
            "optim": {"state": {0: {"momentum_buffer": torch.randn(3, 4, generator=g)}},
                      "param_groups": [{"lr": 0.1, "params": [0], "betas": (0.9, 0.99)}]},
            "ema": None,
            "state": {"position": {"epoch": 1, "step": 2, "global_step": 12}, "history": [{"acc": 0.5}],
                      "rng": {"0": {"torch": torch.get_rng_state()}}}}


def write(slots: S.Slots, step: int, sd=None, commit=True) -> S.Marker:
    tensors: list = []
    skeleton = S.flatten(sd or a_state(), tensors)
    places, nbytes = S.layout(tensors)
    m = S.Marker(S.VERSION, slots.run, slots.holder, slots.origin, step, 2, 2, False, nbytes, places, skeleton)
    if commit:
        slots.write(m, tensors)
    else:  # a rank killed mid-write: the slot is taken, its bytes half there, its marker never written
        slot, mapped = slots.begin(nbytes)
        mapped[: nbytes // 2].fill_(1)
    return m


def assert_same(a, b):
    assert type(a) is type(b)
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    else:
        assert a == b


def test_a_snapshot_reads_back_bit_for_bit_with_int_keys_tuples_and_bf16(tmp_path):
    slots = S.Slots(tmp_path, "run1", "host-1", S.REPLICA)
    sd = a_state()
    write(slots, 12, sd)
    [(path, marker)] = S.held(tmp_path, "run1", "host-1")
    m, data = S.load_slot(path)
    back = S.unflatten(m.skeleton, S.read_tensors(data, m.tensors))
    assert_same(sd, back)
    # each tensor has memory of its own (torch.set_rng_state crashes on a view at an offset of shared bytes)
    torch.set_rng_state(back["state"]["rng"]["0"]["torch"])
    assert back["model"]["w"].untyped_storage().data_ptr() != back["model"]["n"].untyped_storage().data_ptr()


def test_two_slots_and_a_kill_mid_write_leaves_the_previous_snapshot(tmp_path):
    slots = S.Slots(tmp_path, "run1", "host-1", S.REPLICA)
    write(slots, 3)
    write(slots, 6)
    assert sorted(m.step for _, m in S.held(tmp_path, "run1", "host-1")) == [3, 6]
    write(slots, 9, commit=False)  # overwrites the older slot (3): its marker goes first
    assert [m.step for _, m in S.held(tmp_path, "run1", "host-1")] == [6]
    # a restarted rank (a new process, new mappings) writes the slot that is not the valid one
    again = S.Slots(tmp_path, "run1", "host-1", S.REPLICA)
    write(again, 9)
    assert sorted(m.step for _, m in S.held(tmp_path, "run1", "host-1")) == [6, 9]
    write(again, 12)
    assert sorted(m.step for _, m in S.held(tmp_path, "run1", "host-1")) == [9, 12]
    assert len(list(tmp_path.glob("*.bin"))) == 2, "never more than two copies of the state"


def test_a_torn_marker_or_a_short_data_file_is_no_snapshot(tmp_path):
    slots = S.Slots(tmp_path, "run1", "host-1", S.REPLICA)
    write(slots, 3)
    [(path, _)] = S.held(tmp_path, "run1", "host-1")
    path.write_text(path.read_text()[:-10])
    assert S.held(tmp_path, "run1", "host-1") == []
    write(slots, 6)
    [(path, m)] = S.held(tmp_path, "run1", "host-1")
    with open(path.with_suffix(".bin"), "r+b") as f:
        f.truncate(m.nbytes - 1)
    assert S.held(tmp_path, "run1", "host-1") == []


def test_snapshots_are_not_checkpoints(tmp_path):
    from phalanx.train.checkpoint import find_latest
    slots = S.Slots(tmp_path, "run1", "host-1", S.REPLICA)
    write(slots, 3)
    assert find_latest(tmp_path) is None
    assert not list(tmp_path.rglob("COMPLETE"))


def held_by(*items, disk=-1):
    return [(list(i), disk) for i in items]


def test_the_plan_takes_the_newest_step_that_covers_every_rank():
    # DDP: one replica anywhere serves every rank; rank 1's node lost its memory, rank 0's copy is sent to it.
    everyone = held_by([("r", 12, 2, 1, False), ("r", 9, 2, 1, False)], [], disk=10)
    plan = S.choose(everyone, world=2, local_world=1, sharded=False)
    assert plan == S.Plan(12, [(0, "r"), (0, "r")])
    # not newer than the checkpoint on disk: the disk checkpoint is resumed
    assert S.choose(held_by([("r", 9, 2, 1, False)], [], disk=10), 2, 1, False) is None
    # FSDP on 2 nodes: rank 0 kept its shards of 12 and its peer's; rank 1 (lost) has none -> 12 from rank 0
    everyone = held_by([("0", 12, 2, 1, True), ("1", 12, 2, 1, True), ("0", 9, 2, 1, True), ("1", 9, 2, 1, True)],
                       [], disk=10)
    assert S.choose(everyone, 2, 1, True) == S.Plan(12, [(0, "0"), (0, "1")])
    # the peer copy of 12 never arrived (killed mid-exchange): 9 is the newest step covering both ranks
    everyone = held_by([("0", 12, 2, 1, True), ("0", 9, 2, 1, True), ("1", 9, 2, 1, True)], [], disk=6)
    assert S.choose(everyone, 2, 1, True) == S.Plan(9, [(0, "0"), (0, "1")])
    # shards of another world size, or a replicated snapshot for a sharded run, never serve
    assert S.choose(held_by([("0", 12, 4, 2, True), ("1", 12, 4, 2, True)], [], disk=-1), 2, 1, True) is None
    assert S.choose(held_by([("r", 12, 2, 1, False)], [], disk=-1), 2, 1, True) is None


def test_snapshot_cadence_skips_epoch_ends():
    assert S.due(3, 12, 2, 10)
    assert not S.due(3, 13, 3, 10)
    assert not S.due(5, 10, 10, 10), "an epoch's end has its evaluation and checkpoint"
    assert not S.due(0, 12, 2, 10)


def test_too_little_shared_memory_is_refused_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(S, "free_bytes", lambda root: 100 * 2**20)
    S.check_room(tmp_path, need=300 * 2**20, have=250 * 2**20, every=10)  # most of it is in place already
    with pytest.raises(ConfigError) as e:
        S.check_room(tmp_path, need=300 * 2**20, have=0, every=10)
    line = str(e.value)
    assert "\n" not in line and "need 300 MiB" in line and "has 100 MiB free" in line
    assert "--ckpt.snapshot_every 0" in line and "--shm-size" in line


def test_stale_snapshots_of_a_dead_agent_go_and_a_live_ones_stay(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    for pid in (dead.pid, os.getpid()):
        write(S.Slots(tmp_path, "run1", S.holder_tag(pid), S.REPLICA), 3)
    assert S.remove_stale(tmp_path, "run1") == 2
    left = {m.holder for _, m in S.held(tmp_path, "run1", S.holder_tag(os.getpid()))}
    assert left == {S.holder_tag(os.getpid())}
    assert S.remove(tmp_path, "run1", S.holder_tag(os.getpid())) == 2
    assert list(tmp_path.iterdir()) == []


def test_snapshots_are_taken_only_where_a_restarted_group_can_read_them(tmp_path):
    from types import SimpleNamespace
    env = SimpleNamespace(rank=0, world=2, local_rank=0, local_world=2)
    run_dir = tmp_path / "run"
    assert S.Snapshots.for_run(10, str(tmp_path), run_dir, env, False, elastic=True) is not None
    assert S.Snapshots.for_run(10, str(tmp_path), run_dir, env, False, elastic=False) is None  # --max-restarts 0
    assert S.Snapshots.for_run(0, str(tmp_path), run_dir, env, False, elastic=True) is None  # off
    assert S.Snapshots.for_run(10, str(tmp_path), run_dir, SimpleNamespace(rank=0, world=1, local_rank=0,
                                                                           local_world=1), False, True) is None
    with pytest.raises(ConfigError, match=r"--ckpt.snapshot_dir .*/nowhere: no such folder"):
        S.Snapshots.for_run(10, str(tmp_path / "nowhere"), run_dir, env, False, elastic=True)

"""Asynchronous checkpoints: the staged copy is the state at the step, writes run one at a time in order, a
failed write is one line at the next wait, and the file a background write seals loads like a synchronous one."""
import threading
import time

import pytest
import torch

from phalanx.config import CheckpointConfig
from phalanx.errors import CheckpointError
from phalanx.models import build_model
from phalanx.train import checkpoint as ckpt
from phalanx.train.checkpoint_writer import CheckpointWriter, asynchronous, stage


def test_the_staged_copy_does_not_move_with_training():
    w = torch.ones(3)
    state = {"model": {"w": w}, "history": [{"acc": 0.5}], "rng": (torch.arange(2),)}
    staged = stage(state)
    w.add_(1)
    state["history"].append({"acc": 0.6})
    state["history"][0]["acc"] = 0.0
    assert torch.equal(staged["model"]["w"], torch.ones(3)) and staged["history"] == [{"acc": 0.5}]
    assert isinstance(staged["rng"], tuple) and staged["model"]["w"].data_ptr() != w.data_ptr()


def test_a_replicated_model_is_written_in_the_background_and_a_sharded_one_in_the_step():
    assert asynchronous(CheckpointConfig(), sharded=False)
    assert asynchronous(CheckpointConfig(async_="true"), sharded=False)
    assert not asynchronous(CheckpointConfig(async_="false"), sharded=False)
    assert not asynchronous(CheckpointConfig(), sharded=True)
    assert not asynchronous(CheckpointConfig(async_="true"), sharded=True)  # DCP writes it in the step, for now


def test_writes_run_one_at_a_time_in_the_order_given():
    writer, order = CheckpointWriter(enabled=True), []
    gate = threading.Event()

    def slow():
        gate.wait(10)
        order.append("first")

    writer.submit(slow, time.perf_counter())
    t = threading.Thread(target=lambda: writer.submit(lambda: order.append("second"), time.perf_counter()))
    t.start()
    time.sleep(0.2)
    assert order == [] and t.is_alive(), "the second checkpoint must wait for the first to be sealed"
    gate.set()
    t.join(10)
    writer.close()
    assert order == ["first", "second"] and len(writer.blocked_s) == 2


def test_a_failed_background_write_is_its_one_line_at_the_next_wait(caplog):
    writer = CheckpointWriter(enabled=True)

    def fail():
        raise CheckpointError("runs/x/checkpoints: cannot write the checkpoint (No space left on device)")

    writer.submit(fail, time.perf_counter())
    with pytest.raises(CheckpointError, match="No space left"):
        writer.wait()
    writer.submit(fail, time.perf_counter())
    writer.close(raise_errors=False)  # a run already failing: logged, not raised
    assert "No space left" in caplog.text


def test_a_checkpoint_written_in_the_background_loads_as_the_state_of_its_step(tmp_path):
    model = build_model("phalanx_cnn", 10, 1, 28, 8)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(4, 1, 28, 28)).sum().backward()
    opt.step()
    want = {k: v.clone() for k, v in model.state_dict().items()}
    state = {"position": {"epoch": 0, "step": 1, "global_step": 1}, "scheduler": {"last_epoch": 1},
             "rng": {"0": {"torch": torch.get_rng_state()}}}
    m, o, s = stage((model.state_dict(), opt.state_dict(), state))
    writer = CheckpointWriter(enabled=True)
    writer.submit(lambda: ckpt.save(tmp_path, 1, m, o, s), time.perf_counter())
    with torch.no_grad():  # training goes on while the write runs
        for p in model.parameters():
            p.add_(1.0)
    writer.close()
    loaded = ckpt.load(ckpt.find_latest(tmp_path))
    assert all(torch.equal(loaded["model"][k], want[k]) for k in want)
    assert loaded["state"]["position"]["global_step"] == 1


def test_the_next_checkpoint_is_staged_into_the_previous_ones_memory():
    writer = CheckpointWriter(enabled=True)
    w = torch.ones(1000)
    first = writer.stage({"w": w, "step": 1})
    writer.submit(lambda: None, time.perf_counter())
    w.add_(1)
    second = writer.stage({"w": w, "step": 2})
    writer.close()
    assert second["w"].data_ptr() == first["w"].data_ptr() and torch.equal(second["w"], torch.full((1000,), 2.0))
    assert second["step"] == 2 and second is not first

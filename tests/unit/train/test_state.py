"""TrainState: one state_dict that a checkpoint saves and a resume loads, and the training step."""
import torch

from phalanx.config import Config
from phalanx.data.loader import Batch
from phalanx.models import build_model
from phalanx.parallel.ddp import DDPStrategy
from phalanx.parallel.model_state import averaged_model
from phalanx.runtime import CPUAccelerator
from phalanx.runtime.dist import DistEnv
from phalanx.train import checkpoint as ckpt
from phalanx.train.precision import Precision
from phalanx.train.schedule import build_optimizer, build_scheduler
from phalanx.train.state import Position, TrainState
from phalanx.train.step import train_step


def make_state(ema: float = 0.9) -> TrainState:
    cfg = Config()
    cfg.model.channels_last = False
    torch.manual_seed(0)
    strategy = DDPStrategy(cfg, DistEnv())  # one process: no DDP wrapper
    model = strategy.wrap(build_model("phalanx_cnn", 10, 1, 28, 8, "batch", "relu"))
    opt = build_optimizer(strategy.plain, cfg.optim)
    return TrainState(model=model, strategy=strategy, optimizer=opt,
                      scheduler=build_scheduler(opt, cfg.sched, 20, 10),
                      precision=Precision.from_config("fp32", CPUAccelerator()),
                      ema=averaged_model(strategy.plain, ema) if ema else None, accel=CPUAccelerator())


def batches(n: int, micro: int = 1, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    for s in range(n):
        for m in range(micro):
            yield Batch(s, m, torch.randn(16, 1, 28, 28, generator=g), torch.randint(0, 10, (16,), generator=g),
                        torch.arange(16))


def run_steps(state: TrainState, first: int, n: int) -> list[float]:
    losses = []
    for b in list(batches(first + n))[first:]:
        loss, stepped = train_step(state, b, accum=1, loss_scale=1 / 16, label_smoothing=0.1)
        assert stepped
        losses.append(float(loss))
        state.position.global_step += 1
    return losses


def test_state_dict_through_a_checkpoint_continues_exactly(tmp_path):
    a = make_state()
    run_steps(a, 0, 3)
    a.history.append({"acc": 0.5})
    sd = a.state_dict()
    drawn_after_save = torch.rand(4)
    assert set(sd) == {"model", "optim", "ema", "state"}
    assert sd["state"]["position"] == {"epoch": 0, "step": 0, "global_step": 3} and sd["state"]["world"] == 1
    path = ckpt.save(tmp_path / "checkpoints", 3, sd["model"], sd["optim"], dict(sd["state"], reason="test"), sd["ema"])
    b = make_state()
    b.load_state_dict(ckpt.load(path), path, rank=0)
    assert torch.equal(torch.rand(4), drawn_after_save)  # the RNG continues where the checkpoint left it
    assert b.position == Position(0, 0, 3) and b.history == [{"acc": 0.5}]
    assert b.scheduler.last_epoch == a.scheduler.last_epoch == 3
    # the same next steps, to the bit: weights, momentum, schedule and EMA all came back
    assert run_steps(a, 3, 2) == run_steps(b, 3, 2)
    for (k, va), vb in zip(a.ema.state_dict().items(), b.ema.state_dict().values()):
        assert torch.equal(va, vb), k


def test_accumulated_micro_batches_step_once_with_the_large_batch_gradient():
    one, two = make_state(ema=0), make_state(ema=0)
    big = next(batches(1))
    halves = [Batch(0, m, big.x[8 * m:8 * m + 8], big.y[8 * m:8 * m + 8], big.idx[:8]) for m in (0, 1)]
    # GroupNorm-free check of the arithmetic: BatchNorm sees 8 images per micro-batch, so compare
    # gradients of a model in eval mode (running statistics, no batch statistics).
    for s in (one, two):
        s.model.eval()
    _, stepped = train_step(one, big, accum=1, loss_scale=1 / 16)
    assert stepped
    steps = [train_step(two, h, accum=2, loss_scale=1 / 16)[1] for h in halves]
    assert steps == [False, True]
    for (k, p1), p2 in zip(one.plain.state_dict().items(), two.plain.state_dict().values()):
        torch.testing.assert_close(p1, p2, rtol=1e-5, atol=1e-6, msg=k)

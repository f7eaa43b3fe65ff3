"""No host synchronisation in a training step: on a device where reading a value back waits for the queued work
(CUDA), the loop reads the loss and the ranks' agreement (preemption, checkpoints by time) every N steps only.

Counted on CPU by wrapping (not replacing) torch's own ways of reading a tensor's value on the host, and the
object collectives, around the loop's own step functions; the device is the CPU accelerator with one thing
changed, `host_reads_sync` (what the CUDA accelerator says). `make gpu-check`'s `sync_free` runs the same
steps on a GPU under torch.cuda.set_sync_debug_mode, which flags every synchronising operation.
"""
import collections
import contextlib
import json
import os
import socket
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from phalanx import config as C
from phalanx.runtime import CPUAccelerator
from tests.conftest import make_idx_dataset

# 256 training images / 16 per step = 16 steps an epoch: the loss is logged every 16 // 4 = 4 steps.
N = 4
TINY = [("global_batch", "16"), ("model.width", "8"), ("precision", "fp32"), ("progress", "false"),
        ("threads_per_rank", "1"), ("epochs", "1"), ("tune", "false"), ("eval_batch", "64"),
        ("ckpt.at_epoch_end", "false")]


class ReadsSync(CPUAccelerator):
    """The CPU, as the loop sees a GPU: reading a value back would wait for the queued step."""
    host_reads_sync = True


class HostReads:
    """Counts, per step, the calls that bring a tensor's value to the host (and object collectives)."""

    TENSOR = ("item", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__")
    DIST = ("broadcast_object_list", "all_gather_object", "gather_object", "scatter_object_list")

    def __init__(self):
        self.by_step: collections.Counter = collections.Counter()
        self.what: dict[int, list[str]] = collections.defaultdict(list)
        self.step = None

    def _wrap(self, owner, name: str):
        orig = getattr(owner, name)

        def counted(*args, **kwargs):
            if self.step is not None:
                self.by_step[self.step] += 1
                self.what[self.step].append(name)
            return orig(*args, **kwargs)

        return counted

    @contextlib.contextmanager
    def installed(self):
        saved = []
        for owner, names in ((torch.Tensor, self.TENSOR), (dist, self.DIST)):
            for name in names:
                saved.append((owner, name, vars(owner).get(name)))
                setattr(owner, name, self._wrap(owner, name))
        try:
            yield self
        finally:
            for owner, name, before in saved:
                if before is None:
                    delattr(owner, name)
                else:
                    setattr(owner, name, before)

    @contextlib.contextmanager
    def at(self, step: int):
        self.step = step
        try:
            yield
        finally:
            self.step = None


def open_run(data: Path, cache: Path, run_dir: Path):
    from phalanx.runtime import dist as rdist
    from phalanx.train.setup import setup
    cfg = C.build_config(None, [("data.path", str(data)), ("data.cache_dir", str(cache)), ("run_dir", str(run_dir)),
                                *TINY])
    env = rdist.init(cfg.parallel, "cpu")
    env.accel = ReadsSync()
    return setup(cfg, env)


def run_steps(run, k: int, preempt_at: int | None = None) -> tuple[HostReads, int | None]:
    """k optimizer steps through the loop's own functions (train_step, then after_optimizer_step's cadence);
    host reads counted per step (the loader's host-side gathering is outside the count). Returns the reads
    and the step after which the ranks agreed to stop (None: they did not)."""
    from phalanx.observe.console import Progress, TrainMeter
    from phalanx.train import cadence, loop
    from phalanx.train.step import train_step
    cfg, env = run.cfg, run.env
    meter, progress, timer = TrainMeter(env.device), Progress(run.total_steps, 0, False), loop.Timer()
    preempt = cadence.Preemption()
    batches = run.loader.epoch(0)
    reads, stopped = HostReads(), None
    try:
        with reads.installed():
            for step in range(1, k + 1):
                batch = next(batches)
                if step == preempt_at:  # as a SIGTERM on this rank only would
                    preempt.requested = True
                with reads.at(step):
                    loss_sum, _ = train_step(run.state, batch, cfg.grad_accum, env.world / cfg.global_batch,
                                             cfg.optim.label_smoothing, cfg.optim.grad_clip)
                    meter.add(loss_sum, len(batch.y))
                    if loop.after_optimizer_step(run, batch, meter, progress, 0, timer, preempt):
                        stopped = step
                        break
    finally:
        preempt.restore()
        batches.close()
    return reads, stopped


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_idx_dataset(tmp_path_factory.mktemp("sync-idx") / "idx", 256, 64)


def test_one_rank_reads_the_loss_every_n_steps_and_nothing_between(data, tmp_path):
    from phalanx.runtime import dist as rdist
    try:
        run = open_run(data, tmp_path / "cache", tmp_path / "run")
        reads, stopped = run_steps(run, 12)
        run.metrics.close()
    finally:
        rdist.teardown()
    assert stopped is None
    # One read per logged loss (steps 4, 8, 12), none in the 9 steps between: the EMA's update count, the
    # norm statistics and the optimizer stay on the device.
    assert dict(reads.by_step) == {4: 1, 8: 1, 12: 1}, dict(reads.what)
    logged = [json.loads(x)["step"] for x in (run.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert logged == [4, 8, 12]


# ----------------------------------------------------------------------------- two ranks (gloo)

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, port: int, data: str, root: str) -> None:
    """One of two spawned ranks: 12 steps (rank 1 'signalled' after step 5), then rank 0 working alone."""
    from phalanx.runtime import dist as rdist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2")
    out: dict = {}
    run = open_run(Path(data), Path(root) / "cache", Path(root) / "run")
    reads, out["stopped"] = run_steps(run, 12, preempt_at=5 if rank == 1 else None)
    out["reads"] = {str(k): v for k, v in reads.by_step.items()}
    out["what"] = {str(k): v for k, v in reads.what.items()}
    env = run.env
    # The training steps' short collective timeout; rank 0 then works alone for 4x as long.
    rdist.set_collective_timeout(0.5, env)
    t0 = time.monotonic()
    try:
        with rdist.rank0_alone(env):
            if rank == 0:
                time.sleep(2.0)
        out["bracketed"] = "ok"
    except RuntimeError as e:
        out["bracketed"] = str(e).splitlines()[0]
    out["bracketed_s"] = round(time.monotonic() - t0, 2)
    out["timeout_after"] = env.timeout_now_s
    try:  # the same wait without the bracket: what a long write did to the other ranks before
        if rank == 0:
            time.sleep(2.0)
        dist.barrier()
        out["unbracketed"] = "ok"
    except RuntimeError as e:
        out["unbracketed"] = str(e).splitlines()[0]
    (Path(root) / f"rank{rank}.json").write_text(json.dumps(out))
    os._exit(0)  # the group is broken by the unbracketed timeout: no teardown


@pytest.fixture(scope="module")
def two_ranks(data, tmp_path_factory) -> list[dict]:
    import torch.multiprocessing as mp
    root = tmp_path_factory.mktemp("two-ranks")
    # spawn: this process's thread pools must not be inherited half-initialised by forked ranks
    mp.start_processes(_rank, args=(_free_port(), str(data), str(root)), nprocs=2, start_method="spawn")
    return [json.loads((root / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.slow  # two spawned ranks: ~27 s on 2 shared cores
def test_two_ranks_read_flags_every_n_steps_and_stop_after_the_same_step(two_ranks):
    for r, got in enumerate(two_ranks):
        # Rank 1 got the signal after step 5; the ranks agree at step 8 (the next multiple of N = 4),
        # and both stop after it.
        assert got["stopped"] == 8, (r, got)
        # Steps 4 and 8: the logged loss and the agreement; nothing in between.
        assert got["reads"] == {"4": 2, "8": 2}, (r, got["what"])


@pytest.mark.slow
def test_ranks_waiting_while_rank0_works_alone_do_not_time_out(two_ranks):
    for r, got in enumerate(two_ranks):
        assert got["bracketed"] == "ok" and got["bracketed_s"] >= 1.9, (r, got)
        assert got["timeout_after"] == 0.5  # the training timeout is back after the bracket
    # Without the bracket, rank 1 times out waiting for rank 0 (the test can fail).
    assert "timed out" in two_ranks[1]["unbracketed"].lower(), two_ranks[1]

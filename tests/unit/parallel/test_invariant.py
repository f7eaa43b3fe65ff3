"""World-size-invariant training's pieces: the fixed-order sum, the micro-batch combiner on real gloo groups of 1, 2
and 4 processes, and the configurations it refuses (whole runs at 1, 2 and 4 ranks: tests/dist/test_invariant.py)."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from phalanx.config import build_config, invariant_world_error
from phalanx.errors import ConfigError
from phalanx.parallel.invariant import bit_reversed, fixed_order_sum, loss_scale, micro_steps, summation_order
from tests.conftest import ROOT


def _awkward(n: int) -> list[torch.Tensor]:
    """float32 values whose sum depends on the order of the additions: 1e8 absorbs a 1 (its ulp is 8)."""
    g = torch.Generator().manual_seed(n)
    big = torch.tensor([1e8, 1.0, -1e8, 1.0, 0.5])[torch.arange(n) % 5]
    return [torch.cat([b.expand(4), torch.randn(60, generator=g) * b]) for b in big]


def test_fixed_order_sum_is_one_pairwise_tree_over_the_indices():
    p = _awkward(5)
    assert torch.equal(fixed_order_sum(p), ((p[0] + p[1]) + (p[2] + p[3])) + p[4])
    left = p[0] + p[1] + p[2] + p[3] + p[4]
    assert not torch.equal(fixed_order_sum(p), left)  # the values do tell the orders apart
    one = fixed_order_sum(p[:1])
    assert torch.equal(one, p[0]) and one is not p[0]  # a new tensor: the caller's slot is not aliased


def test_bit_reversed_order():
    assert bit_reversed(1) == [0] and bit_reversed(2) == [0, 1]
    assert bit_reversed(8) == [0, 4, 2, 6, 1, 5, 3, 7]
    assert summation_order(6) == [0, 1, 2, 3, 4, 5] and summation_order(4) == [0, 2, 1, 3]


@pytest.mark.parametrize("n", [2, 4, 8, 16])
def test_each_rank_adding_its_own_micro_batches_first_gives_the_one_tree_sum(n):
    # What the combiner does for a power-of-two count: rank r of W holds j = m*W + r, adds them over
    # bit_reversed(K), and the ranks' partial sums are added over bit_reversed(W): the tree over
    # summation_order(n), bit for bit, for every W.
    p = _awkward(n)
    one_tree = fixed_order_sum([p[j] for j in summation_order(n)])
    for world in (w for w in (1, 2, 4, 8, 16) if n % w == 0):
        k = n // world
        partial = [fixed_order_sum([p[m * world + r] for m in bit_reversed(k)]) for r in range(world)]
        assert torch.equal(fixed_order_sum([partial[r] for r in bit_reversed(world)]), one_tree), world
    # and the order matters: the natural order's tree gives other bits here
    assert not torch.equal(fixed_order_sum(p), one_tree) or n <= 2


def _cfg(*pairs: str):
    it = iter(pairs)
    return build_config(None, list(zip(it, it)))


def test_a_world_size_not_dividing_the_micro_batch_count_is_refused_in_one_line():
    with pytest.raises(ConfigError) as e:
        _cfg("parallel.invariant", "true", "parallel.micro_batch", "32", "global_batch", "256", "parallel.nproc", "3")
    msg = str(e.value)
    assert "\n" not in msg
    assert "8 micro-batches" in msg and "3 ranks" in msg and "(1, 2, 4, 8)" in msg and "--parallel.micro_batch" in msg
    for nproc in ("1", "2", "4", "8"):  # the divisors are accepted
        _cfg("parallel.invariant", "true", "parallel.micro_batch", "32", "parallel.nproc", nproc)
    # without invariant mode, 3 ranks are fine
    _cfg("parallel.micro_batch", "32", "parallel.nproc", "3")


def test_the_rank_refuses_a_world_the_launcher_could_not_check():
    cfg = _cfg("parallel.invariant", "true", "parallel.micro_batch", "32")  # --nproc auto
    assert [micro_steps(cfg, w) for w in (1, 2, 4, 8)] == [8, 4, 2, 1]
    with pytest.raises(ConfigError, match="8 micro-batches of parallel.micro_batch=32, which 3 ranks"):
        micro_steps(cfg, 3)
    assert invariant_world_error(256, 32, 6) is not None and invariant_world_error(256, 64, 4) is None
    plain = _cfg("grad_accum", "2")
    assert micro_steps(plain, 3) == 2  # not invariant: grad_accum, any world
    assert loss_scale(cfg, 4) == 1 / 256 and loss_scale(plain, 4) == 4 / 256


@pytest.mark.parametrize("pairs,field,says", [
    (("parallel.micro_batch", "30"), "parallel.micro_batch=30", "must divide global_batch=256"),
    (("parallel.micro_batch", "0"), "parallel.micro_batch=0", "must be >= 1"),
    (("grad_accum", "2"), "grad_accum=2", "--parallel.micro_batch sets"),
    (("parallel.micro_batch", "7", "global_batch", "56", "augment.mixup", "0.2"), "parallel.micro_batch=7",
     "must be even with mixup/CutMix"),
    (("parallel.strategy", "fsdp", "parallel.shard_size", "2"), "parallel.shard_size=2",
     "hybrid sharding is not world-size invariant"),
])
def test_what_invariant_mode_refuses(pairs, field, says):
    with pytest.raises(ConfigError) as e:
        _cfg("parallel.invariant", "true", *pairs)
    assert str(e.value).startswith(field) and says in str(e.value) and "\n" not in str(e.value)


# Each process: the strategy's combiner over its micro-batches (j = m*W + r) of one global batch, from the same
# weights; it writes the combined gradients and norm statistics.
SCRIPT = textwrap.dedent("""
    import sys, torch, torch.distributed as dist, torch.nn as nn, torch.nn.functional as F
    from safetensors.torch import save_file
    from phalanx.parallel.invariant import MicroBatchCombiner
    torch.set_num_threads(1)
    world, out, count = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    if world > 1:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if world > 1 else 0
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3),
                        nn.BatchNorm2d(8, momentum=None), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(8, 5))
    for m in net.modules():  # statistics a previous step left: the update must start from them
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.fill_(0.25); m.running_var.fill_(2.0); m.num_batches_tracked.fill_(3)
    g = torch.Generator().manual_seed(1)
    micro = 4
    x, y = torch.randn(count * micro, 3, 12, 12, generator=g) * 3, torch.randint(0, 5, (count * micro,), generator=g)
    comb = MicroBatchCombiner(net, count, world, rank)
    for m in range(count // world):
        j = m * world + rank
        with comb.micro_batch(last=m == count // world - 1):
            F.cross_entropy(net(x[j * micro:(j + 1) * micro]), y[j * micro:(j + 1) * micro],
                            reduction="sum").mul(1 / (count * micro)).backward()
    sd = {f"grad.{k}": p.grad.contiguous() for k, p in net.named_parameters()}
    sd.update({f"buf.{k}": b for k, b in net.named_buffers()})
    save_file(sd, f"{out}/c{count}-w{world}-r{rank}.safetensors")
    if world > 1:
        dist.destroy_process_group()
""")


def _launch(tmp_path, world: int, count: int) -> subprocess.CompletedProcess:
    if world == 1:
        cmd = [sys.executable, str(tmp_path / "s.py"), "1", str(tmp_path), str(count)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(world),
               str(tmp_path / "s.py"), str(world), str(tmp_path), str(count)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))


def _combined(tmp_path, count: int, worlds: tuple[int, ...]) -> dict:
    """{(world, rank): the gradients and buffers the combiner left on that rank}; every rank equal to the first."""
    from safetensors.torch import load_file
    (tmp_path / "s.py").write_text(SCRIPT)
    for world in worlds:
        r = _launch(tmp_path, world, count)
        assert r.returncode == 0, r.stdout + r.stderr
    got = {(w, r): load_file(tmp_path / f"c{count}-w{w}-r{r}.safetensors") for w in worlds for r in range(w)}
    ref = got[(1, 0)]
    for key, sd in got.items():
        assert sd.keys() == ref.keys()
        for k in ref:
            assert torch.equal(sd[k], ref[k]), f"{count} micro-batches, (world, rank) {key}: {k}"
    return ref


@pytest.mark.slow  # 20 s of process groups: `make test` keeps the power-of-two case (1, 2, 4 ranks)
def test_combiner_of_6_micro_batches_gives_the_same_bits_at_1_2_and_3_ranks(tmp_path):
    # not a power of two: every micro-batch's gradient is exchanged and summed in the order 0..5
    ref = _combined(tmp_path, 6, (1, 2, 3))
    assert int(ref["buf.1.num_batches_tracked"]) == 4


def test_combiner_gives_every_rank_the_same_bits_at_1_2_and_4_ranks(tmp_path):
    import torch.nn as nn
    import torch.nn.functional as F
    ref = _combined(tmp_path, 8, (1, 2, 4))
    # and the values are the right ones: the sum of the micro-batches' gradients, torch's BatchNorm update
    # with the mean of their statistics (to rounding: here summed in another order)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3),
                        nn.BatchNorm2d(8, momentum=None), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(8, 5))
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 3, 12, 12, generator=g) * 3, torch.randint(0, 5, (32,), generator=g)
    for j in range(8):
        F.cross_entropy(net(x[j * 4:(j + 1) * 4]), y[j * 4:(j + 1) * 4], reduction="sum").mul(1 / 32).backward()
    for k, p in net.named_parameters():
        torch.testing.assert_close(ref[f"grad.{k}"], p.grad, rtol=1e-5, atol=1e-6)
    h = x[:, :, :, :]
    first = nn.functional.conv2d(h, net[0].weight, net[0].bias)
    chunks = first.split(4)
    mean = torch.stack([c.mean((0, 2, 3)) for c in chunks]).mean(0)
    var = torch.stack([c.var((0, 2, 3), unbiased=True) for c in chunks]).mean(0)
    torch.testing.assert_close(ref["buf.1.running_mean"], 0.9 * 0.25 + 0.1 * mean)
    torch.testing.assert_close(ref["buf.1.running_var"], 0.9 * 2.0 + 0.1 * var)
    assert int(ref["buf.1.num_batches_tracked"]) == int(ref["buf.4.num_batches_tracked"]) == 4  # one per step
    # momentum None: the cumulative average, 1 / num_batches_tracked = 1/4 of the new statistics
    assert not torch.allclose(ref["buf.4.running_mean"], torch.full((8,), 0.25))


def test_the_invariant_strategy_trains_the_plain_model_on_one_thread():
    import copy

    import torch.nn.functional as F

    from phalanx.models import build_model
    from phalanx.parallel.strategy import build_strategy
    from phalanx.runtime.dist import DistEnv
    cfg = _cfg("parallel.invariant", "true", "parallel.micro_batch", "8", "global_batch", "32")
    torch.manual_seed(0)
    net = build_model("phalanx_cnn", 10, 1, 28, 8, "batch", "relu")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        env = DistEnv()
        s = build_strategy(cfg, env)
        model = s.wrap(net)
        assert torch.get_num_threads() == 1 and env.threads == 1  # whatever the rank was started with
        twin = copy.deepcopy(model)  # the same weights and memory format
        g = torch.Generator().manual_seed(2)
        x, y = torch.randn(32, 1, 28, 28, generator=g), torch.randint(0, 10, (32,), generator=g)
        for m in range(4):
            with s.no_sync(m == 3):
                F.cross_entropy(model(x[8 * m:8 * m + 8]), y[8 * m:8 * m + 8], reduction="sum").mul(1 / 32).backward()
        grads = []
        for m in range(4):  # each micro-batch's gradient alone (on the same one thread), then the tree of M = 4
            twin.zero_grad(set_to_none=True)
            F.cross_entropy(twin(x[8 * m:8 * m + 8]), y[8 * m:8 * m + 8], reduction="sum").mul(1 / 32).backward()
            grads.append([p.grad.clone() for p in twin.parameters()])
    finally:
        torch.set_num_threads(threads)
    assert model is s.plain and s.ddp is None  # no DDP: its all-reduce's order depends on the world size
    for i, p in enumerate(model.parameters()):
        want = fixed_order_sum([grads[j][i] for j in summation_order(4)])
        assert torch.equal(p.grad, want), i
    bn = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bn and all(int(m.num_batches_tracked) == 1 for m in bn)  # one update per step, not per micro-batch


def test_a_rows_sum_does_not_depend_on_the_rows_beside_it():
    from phalanx.parallel.invariant import pairwise_row_sums, row_square_sums
    g = torch.Generator().manual_seed(3)
    full = torch.randn(13, 7, 5, generator=g) * torch.logspace(-6, 6, 13)[:, None, None]
    whole = row_square_sums(full)
    for world in (2, 3, 4):  # the shards of FSDP2 (torch.chunk over dim 0)
        assert torch.equal(torch.cat([row_square_sums(c) for c in full.chunk(world)]), whole)
    # the fixed tree itself: ((a0 + a1) + (a2 + a3)) + a4 for five columns
    x = torch.randn(3, 5, generator=g, dtype=torch.float64)
    assert torch.equal(pairwise_row_sums(x), ((x[:, 0] + x[:, 1]) + (x[:, 2] + x[:, 3])) + x[:, 4])
    assert row_square_sums(torch.empty(0, 4)).shape == (0,) and row_square_sums(torch.tensor(3.0)).item() == 9.0


def test_the_fixed_order_norm_is_the_same_from_whole_gradients_and_from_disjoint_shards():
    from phalanx.parallel.invariant import clip_by_norm_, fixed_order_norm, pairwise_row_sums, row_square_sums
    g = torch.Generator().manual_seed(4)
    grads = [torch.randn(6, 3, 3, 3, generator=g), torch.randn(6, generator=g) * 1e3, torch.randn(10, 7, generator=g)]
    offsets = [0, 6, 12]
    whole = fixed_order_norm(list(zip(grads, offsets)), 22, torch.device("cpu"))
    torch.testing.assert_close(whole, torch.linalg.vector_norm(torch.cat([t.flatten() for t in grads])))
    for world in (2, 3):  # each rank fills only its own rows (FSDP2's dim-0 chunks) of the vector of row sums
        vecs = [torch.zeros(22) for _ in range(world)]
        for rank, vec in enumerate(vecs):
            for t, first in zip(grads, offsets):
                c = -(-t.shape[0] // world)
                shard = t[rank * c:(rank + 1) * c]
                start = first + min(rank * c, t.shape[0])
                vec[start:start + shard.shape[0]] = row_square_sums(shard)
        for order in (vecs, vecs[::-1]):  # an all_reduce in any order: disjoint entries, x + 0 = x
            total = order[0].clone()
            for v in order[1:]:
                total = total + v
            assert torch.equal(pairwise_row_sums(total.view(1, -1))[0].sqrt(), whole)
    clipped = [t.clone() for t in grads]
    clip_by_norm_(clipped, whole, 1.0)
    ref = [torch.nn.Parameter(torch.zeros_like(t)) for t in grads]
    for r, t in zip(ref, grads):
        r.grad = t.clone()
    torch.nn.utils.clip_grad_norm_(ref, 1.0)  # torch's clip, to rounding
    for a, b in zip(clipped, ref):
        torch.testing.assert_close(a, b.grad)
    assert not torch.allclose(clipped[1], grads[1])

"""tools/plan.py, the scaling model of `phalanx bench plan`, against numbers worked by hand (in the comments)."""
import json
import math

import pytest

from phalanx.commands import main
from phalanx.models import build_model
from phalanx.tools import plan
from phalanx.tools.plan import Cluster, Link, Options, Workload

# One 1000x1000 matrix and its 1000 biases: 1,001,000 parameters, 4,004,000 bytes of fp32 gradients.
W = Workload(((1000, 1000), (1000,)), compute_s=0.1)
SLOW = Link(1e9, 1e-5)  # 1 GB/s, 10 us


def test_bandwidths_in_bits_and_bytes():
    assert plan.parse_rate("100Gb/s") == 12.5e9
    assert plan.parse_rate("100Gbit/s") == 12.5e9
    assert plan.parse_rate("400Gbps") == 50e9
    assert plan.parse_rate("25GB/s") == 25e9
    assert plan.parse_rate("900 GB/s") == 900e9
    assert plan.parse_rate("1.5MB/s") == 1.5e6
    for bad in ("fast", "100", "0Gb/s", "-3GB/s", "10XB/s"):
        with pytest.raises(ValueError, match="100Gb/s"):
            plan.parse_rate(bad)


def test_ring_and_tree_all_reduce_by_hand():
    link = Link(1e10, 1e-5)
    # ring, 4 ranks, 100 MB: 2*3/4 * 1e8/1e10 = 0.015 s, + 2*3 * 10 us = 60 us
    assert plan.ring_allreduce_s(1e8, 4, link) == pytest.approx(0.01506)
    # tree: 2 * 1e8/1e10 = 0.02 s, + 2*ceil(log2 4) * 10 us = 40 us
    assert plan.tree_allreduce_s(1e8, 4, link) == pytest.approx(0.02004)
    assert plan.allreduce_s(1e8, 4, link) == pytest.approx(0.01506)  # large payload: ring
    # 1 kB over 64 ranks: ring 2*63/64*1e3/1e10 + 126 * 10 us = 1.2602 ms; tree 2e-7 + 12 * 10 us = 0.1202 ms
    assert plan.ring_allreduce_s(1e3, 64, link) == pytest.approx(1.2601969e-3)
    assert plan.allreduce_s(1e3, 64, link) == pytest.approx(1.202e-4)  # small payload, many ranks: tree
    # all-gather of a 100 MB whole over 4 ranks: 3/4 * 1e8/1e10 = 7.5 ms + 3 * 10 us
    assert plan.allgather_s(1e8, 4, link) == pytest.approx(0.00753)
    assert plan.ring_allreduce_s(1e8, 1, link) == 0 == plan.allgather_s(1e8, 1, link)
    # 5 buckets pay the latency 5 times: 15 ms + 5 * 60 us
    assert plan.ring_allreduce_s(1e8, 4, link, calls=5) == pytest.approx(0.0153)


def test_powersgd_layers_follow_torchs_rule():
    # conv 64x32x3x3 viewed as n=64 x m=288: (64+288)*1 = 352 numbers, and 352*2 < 18432 -> compressed
    assert plan.powersgd_layer((64, 32, 3, 3), 1) == (True, 352)
    assert plan.powersgd_layer((64, 32, 3, 3), 4) == (True, 4 * 352)
    assert plan.powersgd_layer((10,), 1) == (False, 10)  # 1-D: (10+1)*2 >= 10, sent as is
    assert plan.powersgd_layer((4, 4), 4) == (False, 16)  # (4+4)*4*2 >= 16: not worth it
    got = plan.powersgd_bytes(W.shapes, 1)
    # the matrix: (1000+1000)*1 numbers; the biases: 1000 uncompressed -> 3000 * 4 bytes
    assert got["bytes"] == 12000 and got["compressed_layers"] == 1
    # error feedback: a copy of every gradient (4,004,000) + warm-start P and Q (8,000)
    assert got["memory_bytes"] == 4_004_000 + 8_000


def test_ddp_and_its_compressions_by_hand():
    c = Cluster(2, 1, SLOW, SLOW)
    o = Options(overlap=0.0)
    ddp = plan.plan_ddp(W, c, o)
    # ring over 2 ranks: 1 * 4.004e6/1e9 = 4.004 ms + 2 * 10 us; compute 0.1/2 = 50 ms; nothing overlapped
    assert ddp.comm_ms == pytest.approx(4.024)
    assert ddp.step_ms == pytest.approx(54.024)
    assert ddp.comm_share == pytest.approx(4.024 / 54.024)
    assert ddp.memory_gib * plan.GiB == pytest.approx(3 * 4_004_000)  # weights, gradients, momentum
    assert ddp.bytes_per_rank == 4_004_000
    bf16 = plan.plan_ddp(W, c, o, "bf16")
    assert bf16.bytes_per_rank == 2_002_000
    assert bf16.comm_ms == pytest.approx(2.022)  # 2.002 ms + 20 us
    psgd = plan.plan_ddp(W, c, o, "powersgd")
    # 12,000 bytes in 3 collectives (uncompressed part, P, Q): 0.012 ms + 3 * 20 us = 0.072 ms (tree: 0.084)
    assert psgd.bytes_per_rank == 12000
    assert psgd.comm_ms == pytest.approx(0.072)
    assert psgd.step_ms < bf16.step_ms < ddp.step_ms


def test_ddp_overlap_hides_all_but_the_last_bucket():
    c = Cluster(2, 1, SLOW, SLOW)
    ddp = plan.plan_ddp(W, c, Options(overlap=1.0, bucket_bytes=1e6))
    # 5 buckets: 4.004 ms + 5 * 20 us = 4.104 ms, all under 33.3 ms of backward but the last bucket's
    # 1e6/1e9 s + 20 us = 1.02 ms
    assert ddp.comm_ms == pytest.approx(4.104)
    assert ddp.exposed_ms == pytest.approx(1.02)
    assert ddp.step_ms == pytest.approx(51.02)
    # overlap 5% of the 33.33 ms backward: 1.667 ms hidden, 2.437 ms exposed
    assert plan.plan_ddp(W, c, Options(overlap=0.05, bucket_bytes=1e6)).exposed_ms == pytest.approx(4.104 - 5 / 3)
    # overlap 10%: 3.333 ms would be hidden, but never the last bucket: 1.02 ms
    assert plan.plan_ddp(W, c, Options(overlap=0.1, bucket_bytes=1e6)).exposed_ms == pytest.approx(1.02)


def test_fsdp_by_hand():
    w = Workload(W.shapes, compute_s=0.1, optim_s=0.02, activation_bytes=4e6)
    fsdp = plan.plan_fsdp(w, Cluster(4, 1, Link(1e9, 0.0), Link(1e9, 0.0)), Options(overlap=0.0))
    # all-gather of 4,004,000 bytes over 4 ranks: 3/4 * 4.004 ms = 3.003 ms, twice (forward, backward), and the
    # reduce-scatter as much: 9.009 ms; compute 25 ms, optimizer on a quarter 5 ms
    assert fsdp.comm_ms == pytest.approx(9.009)
    assert fsdp.step_ms == pytest.approx(39.009)
    # a quarter of 12,012,000 bytes of state + the one unit (the model) gathered twice (8,008,000) + 1e6 of activations
    assert fsdp.memory_gib * plan.GiB == pytest.approx(3_003_000 + 8_008_000 + 1_000_000)
    assert fsdp.bytes_per_rank == 3 * 4_004_000
    once = plan.plan_fsdp(w, Cluster(4, 1, Link(1e9, 0.0), Link(1e9, 0.0)),
                          Options(overlap=0.0, reshard_after_forward=False))
    assert once.comm_ms == pytest.approx(6.006)


def test_hsdp_moves_the_gradient_across_nodes_once():
    fast, slow = Link(1e10, 0.0), Link(1e9, 0.0)
    c = Cluster(2, 2, slow, fast)  # 2 nodes x 2 GPUs
    hsdp = plan.plan_hsdp(W, c, Options(overlap=0.0))
    # within a node (2 ranks, 10 GB/s): 1/2 * 4.004e6/1e10 = 0.2002 ms, three times; across the 2 nodes, each
    # rank's half of the gradient, the two sharing 1 GB/s: 2*1/2 * 2.002e6/(0.5e9) = 4.004 ms
    assert hsdp.parts["allreduce_nodes"] == pytest.approx(4.004)
    assert hsdp.comm_ms == pytest.approx(3 * 0.2002 + 4.004)
    # flat DDP over the 4 ranks runs at the slower link: 2*3/4 * 4.004 ms = 6.006 ms
    assert plan.plan_ddp(W, c, Options(overlap=0.0)).comm_ms == pytest.approx(6.006)
    # state sharded over the node's 2 ranks, not all 4
    assert hsdp.memory_gib * plan.GiB == pytest.approx(12_012_000 / 2 + 8_008_000)
    one_node = plan.plan_hsdp(W, Cluster(4, 1, slow, fast), Options())
    assert one_node.comm_ms == pytest.approx(plan.plan_fsdp(W, Cluster(4, 1, slow, fast), Options()).comm_ms)


def test_table_and_json_hold_every_strategy():
    c = Cluster(8, 4, Link(12.5e9, 1e-5), Link(3e11, 3e-6))
    rows = plan.plan(W, c)
    assert [r.strategy for r in rows] == list(plan.STRATEGIES)
    text = plan.table(rows, c, W, Options())
    assert "4 node(s) x 8 GPU(s) = 32 ranks" in text
    assert all(line.split()[0] in plan.STRATEGIES for line in text.splitlines()[3:])
    out = plan.as_json(rows, c, W, Options())
    json.dumps(out)
    for r in out["rows"]:
        assert math.isclose(r["comm_share"], r["exposed_ms"] / r["step_ms"])


def test_bench_plan_prints_a_table_and_json(capsys):
    args = ["bench", "plan", "--gpus", "8", "--nodes", "2", "--link", "100Gb/s", "--width", "16",
            "--compute-ms", "40", "--optim-ms", "1", "--activation-gib", "0.5"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "2 node(s) x 8 GPU(s) = 16 ranks" in out and "ddp_powersgd" in out
    assert main([*args, "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["world"] == 16 and len(got["rows"]) == 5 and got["compute_source"] == "given"
    ddp = got["rows"][0]
    assert ddp["step_ms"] == pytest.approx(40 / 16 + 1 + ddp["exposed_ms"])
    for bad, says in ((["--link", "fast"], "100Gb/s"), (["--overlap", "2"], "from 0 to 1"),
                      (["--latency-us", "nan"], "finite")):
        assert main([*args, *bad]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and says in err[0], err


def test_measured_activations_scale_with_the_batch():
    eight = plan.measure_step("phalanx_cnn", 8, 28, 1, 10, 8, "fp32", steps=0)
    scaled = plan.measure_step("phalanx_cnn", 8, 28, 1, 10, 32, "fp32", steps=0, max_batch=8)
    assert scaled["measured_batch"] == 8 and scaled["activation_bytes"] == 4 * eight["activation_bytes"]
    # by hand, a lower bound: the stem's conv output alone is 8 images x 8 channels x 28 x 28 fp32 = 200,704 bytes
    assert eight["activation_bytes"] > 8 * 8 * 28 * 28 * 4
    timed = plan.measure_step("phalanx_cnn", 8, 28, 1, 10, 16, "fp32", steps=1)
    assert timed["compute_s"] > 0 and timed["optim_s"] > 0
    described = plan.describe_model("phalanx_cnn", 8, 28, 1, 10)
    assert sum(math.prod(s) for s in described["shapes"]) == sum(
        q.numel() for q in build_model("phalanx_cnn", 10, 1, 28, 8).parameters())
    assert len(described["unit_params"]) == 6  # the stem and each conv block (parallel/fsdp.py shard_units)

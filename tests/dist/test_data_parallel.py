"""Real multi-process runs through PyTorch's elastic launcher, gloo on loopback."""
import json
import socket
import subprocess
import sys
import time
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import run_phalanx

pytestmark = pytest.mark.dist

# Same arithmetic on every rank count: one thread per rank, fp32, deterministic kernels.
EXACT = ["--threads_per_rank", "1", "--precision", "fp32", "--deterministic", "true", "--progress", "false",
         "--model.channels_last", "false"]


def train(cache, data, out, nproc, *extra, steps=6, batch=60, env_extra=None, timeout=300):
    run_dir = out / f"n{nproc}-{abs(hash(extra)) % 10**8}"
    r = run_phalanx(["train", "--data", data, "--nproc", nproc, "--epochs", "1", "--max_steps", steps,
                     "--global_batch", batch, "--model.width", "16", "--optim.lr", "0.05", "--run_dir", run_dir,
                     "--ckpt.at_epoch_end", "false", *EXACT, *extra], cache, env_extra=env_extra, timeout=timeout)
    return r, run_dir


def weights(run_dir):
    return load_file(Path(run_dir) / "model.safetensors")


def test_two_ranks_through_the_elastic_launcher(cache_dir, small_idx, tmp_path):
    r, run_dir = train(cache_dir, small_idx, tmp_path, 2)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "launching 2 rank(s)" in r.stdout
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world"] == 2 and summary["global_step"] == 6
    for k in (0, 1):  # every rank writes its own log, rank 0 alone prints
        log = (run_dir / "logs" / f"rank-{k}.log").read_text()
        assert f"rank {k}/2" in log
    assert r.stdout.count("final test accuracy") == 1


@pytest.mark.slow
def test_forked_and_spawned_ranks_train_the_same_weights(cache_dir, small_idx, tmp_path):
    # On CPU the launcher forks its ranks (they inherit the imported torch); spawn starts fresh
    # interpreters. The arithmetic must not notice.
    rf, df = train(cache_dir, small_idx, tmp_path, 2, "--parallel.start_method", "fork")
    rs, ds = train(cache_dir, small_idx, tmp_path, 2, "--parallel.start_method", "spawn")
    assert rf.returncode == 0 and rs.returncode == 0, rf.stdout + rf.stderr + rs.stdout + rs.stderr
    a, b = weights(df), weights(ds)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    for r in (rf, rs):
        assert r.stdout.count("final test accuracy") == 1


def test_two_nodes_by_c10d_rendezvous_on_loopback(cache_dir, small_idx, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run_dir = tmp_path / "two-nodes"
    env = dict(os.environ, PHALANX_CACHE=str(cache_dir))
    base = [sys.executable, "-m", "phalanx", "train", "--data", str(small_idx), "--nproc", "1", "--nnodes", "2",
            "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv_id", "t2n", "--epochs", "1", "--max_steps", "4",
            "--global_batch", "60", "--model.width", "16", "--run_dir", str(run_dir), "--ckpt.at_epoch_end",
            "false", *EXACT, "--parallel.init_timeout_s", "120"]
    procs = [subprocess.Popen(base + ["--node-rank", str(k)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, env=env) for k in (0, 1)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n---\n".join(outs)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world"] == 2
    assert (run_dir / "logs" / "rank-0.log").is_file() and (run_dir / "logs" / "rank-1.log").is_file()


def _export_random_weights(folder: Path) -> Path:
    from phalanx.models import build_model
    from phalanx.train.finish import export_weights
    torch.manual_seed(3)
    m = build_model("phalanx_cnn", 10, 1, 28, 16)
    # Non-trivial BatchNorm statistics, so eval-mode normalisation is exercised.
    for mod in m.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.5, 0.5)
            mod.running_var.uniform_(0.5, 2.0)
    folder.mkdir(parents=True, exist_ok=True)
    meta = {"model": "phalanx_cnn", "width": 16, "norm": "batch", "num_classes": 10, "in_channels": 1,
            "image_size": 28, "classes": [str(i) for i in range(10)], "mean": [0.2], "std": [0.3]}
    export_weights(m, folder / "model.safetensors", meta)
    return folder / "model.safetensors"


def test_eval_is_identical_for_1_2_3_ranks(cache_dir, small_idx, tmp_path):
    w = _export_random_weights(tmp_path / "w")
    results = []
    for n in (1, 2, 3):
        # 1001 test images in chunks of 100: 11 chunks, divided by none of 2 and 3; no padding anywhere.
        r = run_phalanx(["eval", w, "--data", small_idx, "--nproc", n, "--eval_batch", "100", *EXACT], cache_dir)
        assert r.returncode == 0, r.stdout + r.stderr
        results.append(json.loads(r.stdout.strip().splitlines()[-1]))
    assert [x["world"] for x in results] == [1, 2, 3]
    assert all(x["count"] == 1001 for x in results)
    assert results[0]["correct"] == results[1]["correct"] == results[2]["correct"]
    assert results[0]["correct_top5"] == results[1]["correct_top5"] == results[2]["correct_top5"]
    assert results[0]["correct_top5"] > results[0]["correct"]  # random weights: top-5 finds more than top-1
    assert results[0]["loss"] == results[1]["loss"] == results[2]["loss"]  # bit-identical, not just close


def test_two_and_three_ranks_match_one_rank_weights(cache_dir, small_idx, tmp_path):
    # GroupNorm: no per-rank batch statistics, so the maths is exactly that of the global batch.
    # GELU: ReLU's exact zeros make max-pool ties, whose gradient routing depends on the kernel
    # path that the per-rank batch size selects; that is not a property of data parallelism.
    # 60 images per step: 30+30 on 2 ranks, 20+20+20 on 3; augmentation is drawn per global batch.
    args = ("--model.norm", "group", "--model.act", "gelu")
    runs = {}
    for n in (1, 2, 3):
        r, run_dir = train(cache_dir, small_idx, tmp_path, n, *args)
        assert r.returncode == 0, r.stdout + r.stderr
        runs[n] = weights(run_dir)
    w0 = torch.nn.utils.parameters_to_vector([runs[1][k] for k in sorted(runs[1])])
    moved = (w0 - torch.nn.utils.parameters_to_vector(
        [weights_init for weights_init in _init_weights(args)])).abs().max()
    assert moved > 1e-3  # training did something
    for n in (2, 3):
        for k in runs[1]:
            torch.testing.assert_close(runs[n][k], runs[1][k], rtol=1e-5, atol=1e-6, msg=f"{n} ranks, {k}")


def _init_weights(args):
    from phalanx.models import build_model
    torch.manual_seed(0)
    m = build_model("phalanx_cnn", 10, 1, 28, 16, "group", "gelu")
    sd = m.state_dict()
    return [sd[k] for k in sorted(sd)]


def test_gradient_accumulation_equals_the_larger_batch(cache_dir, small_idx, tmp_path):
    args = ("--model.norm", "group", "--model.act", "gelu")
    r1, d1 = train(cache_dir, small_idx, tmp_path, 1, *args)
    r2, d2 = train(cache_dir, small_idx, tmp_path, 2, *args, "--grad_accum", "3")
    assert r1.returncode == 0 and r2.returncode == 0, r2.stdout + r2.stderr
    a, b = weights(d1), weights(d2)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=k)


@pytest.mark.parametrize("action,rank", [("exit", 1),
                                         # a stalled rank costs the collective timeout plus torch's 30 s SIGKILL wait
                                         pytest.param("stop", 1, marks=pytest.mark.slow),
                                         # the stalled rank hosts the process-group store: only its silence tells
                                         pytest.param("stop", 0, marks=pytest.mark.slow),
                                         pytest.param("hang", 1, marks=pytest.mark.slow)])
def test_a_rank_that_dies_or_stalls_stops_the_run_with_a_message(cache_dir, small_idx, tmp_path, action, rank):
    t0 = time.monotonic()
    r, run_dir = train(cache_dir, small_idx, tmp_path, 2, "--parallel.timeout_s", "10", steps=9,
                       env_extra={"PHALANX_FAULT": f"step:{rank}:3:{action}"}, timeout=240)
    elapsed = time.monotonic() - t0
    out = r.stdout + r.stderr
    # The failing rank's exit code (exit: 3; a stall: the healthy rank that named it exits 1).
    assert r.returncode == (3 if action == "exit" else 1)
    # A stopped (SIGSTOP) or hung rank is SIGKILLed by the agent 30 s after its SIGTERM, which it cannot handle.
    assert elapsed < 150, f"took {elapsed:.0f}s"
    # One line names the failing rank; torch's report (traceback, Root Cause table) is not shown.
    err = [x for x in r.stderr.strip().splitlines() if x.startswith("phalanx: ")]
    assert len(err) == 1 and "Traceback" not in out and "Root Cause" not in out, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    if action == "exit":
        assert last == f"phalanx: rank 1 exited with code 3; its log: {run_dir}/logs/rank-1.log", last
        assert "phalanx: rank 0 stopped while" not in out  # the peer's own line stays in its log
        assert "phalanx: rank 0 stopped while" in (run_dir / "logs" / "rank-0.log").read_text()
    else:
        # the healthy rank timed out waiting for the stalled one; it names it, not itself
        assert last.startswith(f"phalanx: rank {rank} stalled"), last
        assert f"rank-{rank}.log" in last
        assert f"phalanx: rank {1 - rank} stopped while" not in out
        # detected within the collective timeout (10 s) and the check-in window (5 s), plus a margin
        healthy = (run_dir / "logs" / f"rank-{1 - rank}.log").read_text().splitlines()
        stamp = [x for x in healthy if " ERROR " in x][0][:23]
        detected = time.mktime(time.strptime(stamp[:19], "%Y-%m-%d %H:%M:%S")) + int(stamp[20:]) / 1000
        stepped = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        last_step = max(x["unix_time"] for x in stepped if x.get("event") == "train" and x["step"] <= 3)
        assert detected - last_step < 10 + 5 + 15, f"detected {detected - last_step:.1f} s after step 2"
    assert not (run_dir / "model.safetensors").exists()


@pytest.mark.slow  # ~10 s; test_loader.py::test_every_index_of_an_epoch_is_seen_once_across_ranks covers the fast lane
def test_no_sample_is_seen_twice_in_an_epoch_across_3_ranks(cache_dir, small_idx, tmp_path):
    # 600 images, global batch 64 over 3 ranks (21/21/22 per step): 9 steps per epoch, 24-image tail.
    r, run_dir = train(cache_dir, small_idx, tmp_path, 3, "--log_samples", "true", "--epochs", "2", steps=0,
                       batch=64)
    assert r.returncode == 0, r.stdout + r.stderr
    seen = {}  # epoch -> list of indices over all ranks
    for k in range(3):
        for line in (run_dir / "logs" / f"samples-rank-{k}.jsonl").read_text().splitlines():
            row = json.loads(line)
            assert len(row["idx"]) in (21, 22)
            seen.setdefault(row["epoch"], []).extend(row["idx"])
    assert sorted(seen) == [0, 1]
    for epoch, idx in seen.items():
        assert len(idx) == 9 * 64 and len(set(idx)) == len(idx), f"epoch {epoch}: duplicates"
        assert set(idx) <= set(range(600))
    assert seen[0] != seen[1]  # a new permutation every epoch


@pytest.mark.slow
def test_a_two_rank_run_listens_on_loopback_only(cache_dir, small_idx, tmp_path):
    # The rendezvous store (the launcher's agent), the process-group store (rank 0) and gloo's
    # connections (each rank) all listen; none may be reachable from another machine.
    from tests.sockets import is_loopback, listening_addresses, process_tree
    run_dir = tmp_path / "run"
    argv = [sys.executable, "-m", "phalanx", "train", "--data", str(small_idx), "--nproc", "2", "--epochs", "40",
            "--global_batch", "60", "--model.width", "16", "--run_dir", str(run_dir), *EXACT]
    env = dict(os.environ, PHALANX_CACHE=str(cache_dir), PYTHONUNBUFFERED="1")
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        t0 = time.monotonic()
        while not ((run_dir / "metrics.jsonl").exists() and '"train"' in (run_dir / "metrics.jsonl").read_text()):
            assert p.poll() is None and time.monotonic() - t0 < 120, "training did not start"
            time.sleep(0.2)
        pids = process_tree(p.pid)
        listening = listening_addresses(pids)
    finally:
        p.terminate()  # a preemption: checkpoint, exit
        out = p.communicate(timeout=60)[0]
    assert len(pids) >= 3, pids  # the launcher and its two ranks
    assert len(listening) >= 3, (listening, out)  # two stores and gloo's listeners at least
    assert all(is_loopback(addr) for addr, _ in listening), listening

"""Data parallelism on 2 XLA devices (PJRT's CPU client, one SPMD process) against 2 gloo ranks on CPU."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import run_phalanx
from tests.xla.conftest import XLA_ENV, train

pytestmark = pytest.mark.xla

# fp32 on both sides; what differs is the order of floating-point sums (XLA:CPU's fused convolutions and
# reductions, the GSPMD all-reduce of two half-batch gradients, against oneDNN and gloo's), ~1e-7 relative
# per operation, grown over 8 SGD steps with momentum to at most ~1e-5 here.
ATOL, RTOL = 1e-4, 1e-4


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "model.safetensors")


def max_difference(a: Path, b: Path) -> float:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], atol=ATOL, rtol=RTOL, msg=k)
    return max((wa[k].float() - wb[k].float()).abs().max().item() for k in wa)


def metrics(run_dir: Path, event: str) -> list[dict]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["event"] == event]


def test_two_xla_devices_train_like_two_gloo_ranks(runs):
    xla, gloo = runs("xla8"), runs("gloo8")
    sx, sg = (json.loads((d / "summary.json").read_text()) for d in (xla, gloo))
    assert sx["world"] == 1 and sg["world"] == 2 and sx["global_step"] == sg["global_step"] == 8
    print(f"max |w_xla - w_gloo| after 8 steps: {max_difference(gloo, xla):.3g}")
    for a, b in zip(metrics(xla, "train"), metrics(gloo, "train")):
        assert a["step"] == b["step"] and a["loss"] == pytest.approx(b["loss"], abs=ATOL)
    assert sx["correct"] == sg["correct"] and sx["loss"] == pytest.approx(sg["loss"], abs=ATOL)


def test_compiled_graphs_do_not_grow_with_the_number_of_steps(runs):
    # Each run ends with one evaluation, which reports the graphs compiled so far: 16 steps compile no more
    # than 8 (same kinds of step, log and evaluation), so no step, learning rate or log line adds one.
    c8, c16 = (metrics(runs(name), "eval")[-1]["compiled_graphs"] for name in ("xla8", "xla16"))
    print(f"compiled graphs: {c8} after 8 steps, {c16} after 16")
    assert 0 < c8 == c16


def test_an_ema_updated_every_2_steps_trains_like_gloo_and_compiles_a_fixed_set_of_graphs(runs):
    """--ema_every 2: the exported average is the gloo run's (the device-side factors, decay**2 and the first
    update's copy, are right on XLA), and 16 steps compile no more graphs than 8.

    A step's graph depends on whether the EMA updates at it and whether the loss is read (the log, every 4
    steps here): the kinds of graph are the combinations of the two cadences, a bounded set. With an
    ema_every that divides the log's 4, 8 steps have met them all; with 3, an update first falls on a log step
    at step 12 (measured: 9 graphs after 8 steps, 10 after 16)."""
    print(f"max |ema_xla - ema_gloo| after 8 steps: {max_difference(runs('gloo8-ema2'), runs('xla8-ema2')):.3g}")
    every, second = weights(runs("xla8")), weights(runs("xla8-ema2"))
    assert max((every[k] - second[k]).abs().max().item() for k in every) > 10 * ATOL  # the setting reached XLA
    c8, c16 = (metrics(runs(name), "eval")[-1]["compiled_graphs"] for name in ("xla8-ema2", "xla16-ema2"))
    print(f"compiled graphs with --ema_every 2: {c8} after 8 steps, {c16} after 16")
    assert 0 < c8 == c16


def test_evaluation_on_xla_equals_evaluation_on_cpu(runs, cache_dir, xla_data):
    run_dir = runs("xla8")
    got = {}
    for device in ("xla", "cpu"):
        r = run_phalanx(["eval", run_dir, "--data", xla_data, "--device", device, "--eval_batch", "100",
                         "--precision", "fp32"], cache_dir, env_extra=XLA_ENV, timeout=600)
        assert r.returncode == 0, r.stdout + r.stderr
        got[device] = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["xla"]["count"] == got["cpu"]["count"] == 250
    assert got["xla"]["correct"] == got["cpu"]["correct"]
    assert got["xla"]["loss"] == pytest.approx(got["cpu"]["loss"], rel=1e-6)
    trained = json.loads((run_dir / "summary.json").read_text())  # the evaluation during training, on XLA
    assert trained["correct"] == got["cpu"]["correct"] and trained["loss"] == pytest.approx(got["cpu"]["loss"],
                                                                                            rel=1e-6)


@pytest.mark.parametrize("first, then", [("xla", "cpu"), ("cpu", "xla")])
def test_a_checkpoint_resumes_on_the_other_device(runs, cache_dir, xla_data, tmp_path, first, then):
    """Preempted (SIGTERM) at step 4 on one device, resumed on the other: the weights of step 8 match the
    uninterrupted run of the resuming device."""
    run_dir = tmp_path / f"{first}-then-{then}"
    r = train(xla_data, run_dir, cache_dir, first, 8, fault="step:0:4:term")
    assert "checkpoint written" in r.stdout + r.stderr or (run_dir / "checkpoints" / "step-00000004").is_dir()
    state = json.loads((run_dir / "checkpoints" / "step-00000004" / "state.json").read_text())
    assert state["position"]["global_step"] == 4 and not (run_dir / "model.safetensors").exists()
    r = train(xla_data, run_dir, cache_dir, then, 8)
    assert "resumed from" in r.stdout and "step 4" in r.stdout, r.stdout
    assert json.loads((run_dir / "summary.json").read_text())["global_step"] == 8
    max_difference(runs("xla8" if then == "xla" else "gloo8"), run_dir)

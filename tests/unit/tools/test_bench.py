"""`phalanx bench` parts that run in one process: the step split, the loader alone, the PNG."""
import json

import pytest

from phalanx.tools import bench


@pytest.mark.parametrize("nproc", [1, 2])
def test_step_split_adds_up_and_counts_the_gradient_bytes(nproc):
    r = bench.step_split(nproc, width=8, global_batch=64)
    n_params = sum(p.numel() for p in __import__("phalanx.models", fromlist=["build_model"]).build_model(
        "phalanx_cnn", 10, 1, 28, 8).parameters())
    assert r["img_s"] > 0 and r["compute_ms"] > 0 and r["optimizer_ms"] >= 0
    if nproc == 1:
        assert r["grad_mb"] == 0 and r["bus_gb_s"] is None
    else:  # the all-reduce carries every gradient, fp32
        assert r["grad_mb"] == pytest.approx(4 * n_params / 2**20, rel=1e-3) and r["allreduce_ms"] > 0
    assert 0 <= r["comm_fraction"] < 1


def test_loader_alone(small_idx, cache_dir, monkeypatch):
    monkeypatch.setenv("PHALANX_CACHE", str(cache_dir))
    out = bench.loader_rate(str(small_idx), global_batch=64, steps=3)
    assert out["img_s"] > 0


def test_plot_of_all(tmp_path):
    pytest.importorskip("matplotlib")
    out = {"scaling": [{"nproc": 1, "img_s": 1000.0}, {"nproc": 2, "img_s": 1500.0}],
           "step_split": [{"nproc": n, "compute_ms": 100.0 / n, "allreduce_ms": 2.0 * (n - 1), "optimizer_ms": 1.0}
                          for n in (1, 2)],
           "loader": {"img_s": 30000.0},
           "flops": {"model": "phalanx_cnn", "achieved_flop_s": 8e10, "matmul_peak_flop_s": 1.5e11,
                     "fraction_of_peak": 0.53}}
    bench.plot(out, tmp_path / "bench.png")
    from PIL import Image
    im = Image.open(tmp_path / "bench.png")
    assert im.size[0] > 1000 and len(set(im.convert("RGB").getdata())) > 20
    assert json.dumps(out)

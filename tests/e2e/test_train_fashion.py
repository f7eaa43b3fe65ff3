"""End to end on real Fashion-MNIST: what a user runs, what a user reads."""
import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from phalanx.models import build_model
from tests.conftest import run_phalanx

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def short_run(tmp_path_factory, cache_dir, fashion_available):
    out = tmp_path_factory.mktemp("runs")
    r = run_phalanx(["train", "--nproc", "1", "--epochs", "1", "--max_steps", "160", "--global_batch", "256",
                     "--optim.lr", "0.2", "--ema", "0", "--progress", "false", "--out_dir", out], cache_dir)
    assert r.returncode == 0, r.stdout + r.stderr
    run_dir = Path(next(p for p in out.iterdir() if p.is_dir()))
    return run_dir, r.stdout


def test_short_training_reaches_80_percent(short_run):
    run_dir, stdout = short_run
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["acc"] >= 0.80, summary
    assert summary["count"] == 10000
    assert f"final test accuracy {100 * summary['acc']:.2f}%" in stdout
    assert str(run_dir) in stdout


def test_run_directory_tells_the_story(short_run):
    run_dir, _ = short_run
    for name in ("config.toml", "metrics.jsonl", "model.safetensors", "model.json", "logs/rank-0.log",
                 "summary.json"):
        assert (run_dir / name).is_file(), name
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert any(e["event"] == "train" for e in events) and any(e["event"] == "eval" for e in events)


def test_exported_weights_load_into_the_plain_model_class(short_run):
    run_dir, _ = short_run
    meta = json.loads((run_dir / "model.json").read_text())
    sd = load_file(run_dir / "model.safetensors")
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in sd)
    model = build_model(meta["model"], meta["num_classes"], meta["in_channels"], meta["image_size"], meta["width"])
    model.load_state_dict(sd)  # strict: every key matches


def test_eval_command_reproduces_the_run_accuracy(short_run, cache_dir):
    run_dir, _ = short_run
    summary = json.loads((run_dir / "summary.json").read_text())
    r = run_phalanx(["eval", run_dir, "--nproc", "1"], cache_dir)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["correct"] == summary["correct"]
    assert res["count"] == 10000


def test_predict_classifies_an_image_file(short_run, cache_dir, tmp_path):
    from PIL import Image

    from phalanx.data.sources import load_store
    run_dir, _ = short_run
    store = load_store("fashion_mnist", str(cache_dir))
    img = store["test"].images[0][..., 0]
    Image.fromarray(img).save(tmp_path / "x.png")
    r = run_phalanx(["predict", run_dir, tmp_path / "x.png", "--format", "json"], cache_dir)
    assert r.returncode == 0, r.stderr
    row = json.loads(r.stdout.strip().splitlines()[-1])
    assert row["top"][0]["class"] in store.classes and 0 < row["top"][0]["p"] <= 1

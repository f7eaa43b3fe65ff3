"""Each packaged recipe, as written, trains a few steps on a generated ImageFolder (images shrunk by
overrides so that a CPU takes seconds); small-input torchvision and timm ResNets train under 2 ranks."""
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from phalanx import config as C
from phalanx.commands import main
from tests.conftest import run_phalanx

pytestmark = pytest.mark.e2e

CLASSES = [f"class{i}" for i in range(10)]  # more than 5: top-5 is counted


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """train/ (8 per class) and test/ (3 per class) of 24x24 RGB JPEGs whose colour depends on the class."""
    root = tmp_path_factory.mktemp("recipe-images") / "images"
    rng = np.random.default_rng(0)
    for split, n in (("train", 8), ("test", 3)):
        for k, c in enumerate(CLASSES):
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                img = rng.integers(0, 60, (24, 24, 3), dtype=np.uint8)
                img[:, :, k % 3] += np.uint8(20 * k)
                Image.fromarray(img).save(root / split / c / f"{i}.jpg", quality=90)
    return root


# recipe -> overrides that shrink it to a second or two of training on a CPU (the images' side, the house
# ResNet's width); everything else as written
SHRINK = {
    "cifar10_resnet": ["--model.width", "8"],
    "imagefolder_224": ["--augment.crop_size", "16"],
    "imagefolder_64": [],
}
QUICK = ["--data.size", "24", "--nproc", "1", "--epochs", "1", "--max_steps", "3", "--global_batch", "16",
         "--progress", "false", "--ckpt.at_epoch_end", "false", "--tune", "false", "--log.tensorboard", "false"]


@pytest.fixture(scope="module")
def store_cache(tmp_path_factory) -> Path:
    """One prepared store (24x24) for the three recipes."""
    return tmp_path_factory.mktemp("recipe-cache")


def test_every_packaged_recipe_is_tested_and_names_its_sources():
    names = sorted(p.stem for p in C.RECIPES_DIR.glob("*.toml"))
    assert set(SHRINK) <= set(names)
    for name in SHRINK:
        text = C.resolve_recipe(name).read_text()
        assert text.startswith("#") and "Use: phalanx train --recipe " + name in text


# ResNet-50's 23.5 M parameters take ~10 s of optimizer, EMA and start-up on 2 CPU cores for 3 steps: the fast
# lane trains imagefolder_224's pipeline (RRC, TrivialAugment, erasing, mixup/CutMix, EMA, cosine warm-up) with
# torchvision's MobileNetV3-Small instead, the slow lane as written.
@pytest.mark.parametrize("recipe,extra", [
    ("cifar10_resnet", []), ("imagefolder_64", []),
    ("imagefolder_224", ["--model.name", "mobilenet_v3_small"]),
    pytest.param("imagefolder_224", [], marks=pytest.mark.slow)])
def test_recipe_trains_three_steps_on_a_generated_imagefolder(recipe, extra, folder, store_cache, tmp_path,
                                                               capsys):
    run_dir = tmp_path / "run"
    code = main(["train", "--recipe", recipe, "--data", str(folder), "--data.cache_dir", str(store_cache),
                 *SHRINK[recipe], *extra, *QUICK, "--run_dir", str(run_dir)])
    assert code == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["global_step"] == 3 and summary["count"] == 30
    assert 0 <= summary["correct"] <= summary["correct_top5"] <= 30 and summary["top5"] == summary["correct_top5"] / 30
    # the run used the recipe's values, as written (the resolved config is the run's config.toml)
    ran = C.tomllib.loads((run_dir / "config.toml").read_text())
    written = C.tomllib.loads(C.resolve_recipe(recipe).read_text())
    for table in ("model", "optim", "sched", "augment"):
        for key, value in written.get(table, {}).items():
            if f"--{table}.{key}" not in SHRINK[recipe] + extra:
                assert ran[table][key] == value, f"{table}.{key}"
    log = (run_dir / "logs" / "rank-0.log").read_text()
    assert f"top-5 {100 * summary['top5']:.2f}%" in log
    if ran["augment"]["crop_size"]:
        # Weights trained on crops are evaluated by `phalanx eval` as the run evaluated them (resize + centre
        # crop, from model.json): the same counts as the run reported for the weights it saved.
        meta = json.loads((run_dir / "model.json").read_text())
        assert (meta["crop_size"], meta["eval_crop"]) == (ran["augment"]["crop_size"], ran["augment"]["eval_crop"])
        capsys.readouterr()
        assert main(["eval", str(run_dir), "--nproc", "1", "--data.cache_dir", str(store_cache)]) == 0
        got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert (got["correct"], got["correct_top5"]) == (summary["correct"], summary["correct_top5"])


@pytest.mark.slow
@pytest.mark.dist
@pytest.mark.parametrize("model,strategy", [("resnet18", "ddp"), ("timm:resnet18", "fsdp")])
def test_small_input_resnets_train_under_2_ranks_and_evaluate_alike_on_1(model, strategy, folder, tmp_path,
                                                                         cache_dir):
    if model.startswith("timm:"):
        pytest.importorskip("timm")
    run_dir = tmp_path / "run"
    r = run_phalanx(["train", "--data", folder, "--data.size", "24", "--model.name", model, "--model.small_input",
                     "true", "--nproc", "2", "--epochs", "1", "--max_steps", "3", "--global_batch", "16",
                     "--progress", "false", "--tune", "false", "--threads_per_rank", "1", "--precision", "fp32",
                     "--parallel.strategy", strategy, "--run_dir", run_dir], cache_dir)
    assert r.returncode == 0, r.stdout + r.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert (summary["world"], summary["strategy"], summary["global_step"]) == (2, strategy, 3)
    if strategy == "fsdp":  # timm's own residual blocks are the shard units
        assert "each residual block (8 BasicBlocks)" in (run_dir / "logs" / "rank-0.log").read_text()
    assert json.loads((run_dir / "model.json").read_text())["small_input"] is True
    e = run_phalanx(["eval", run_dir, "--nproc", "1", "--threads_per_rank", "1"], cache_dir)
    assert e.returncode == 0, e.stdout + e.stderr
    got = json.loads(e.stdout.strip().splitlines()[-1])
    assert (got["correct"], got["correct_top5"], got["count"]) == (summary["correct"], summary["correct_top5"], 30)

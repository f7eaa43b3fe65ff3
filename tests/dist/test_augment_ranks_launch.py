"""Every augmentation for larger images on at once, through the elastic launcher: two ranks train the
weights one rank trains (the draws, the mixing pairs and the mixed loss do not depend on the world size)."""
import json

import pytest
import torch

from tests.dist.test_data_parallel import train, weights
from tests.unit.data.test_stream_training import make_jpeg_folder

pytestmark = [pytest.mark.dist, pytest.mark.slow,
              pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")]

AUG = ("--augment.crop_size", "16", "--augment.rrc", "true", "--augment.trivial_augment", "true",
       "--augment.erase", "0.25", "--augment.mixup", "0.4", "--augment.cutmix", "1.0")


def test_two_ranks_with_every_augmentation_train_the_weights_of_one(cache_dir, tmp_path):
    folder = make_jpeg_folder(tmp_path / "imgs")
    # GroupNorm + GELU: the per-rank batch split changes no maths (see test_data_parallel).
    common = ("--data.size", "20", "--model.norm", "group", "--model.act", "gelu", "--ema", "0", *AUG)
    r1, one = train(cache_dir, folder, tmp_path, 1, *common, steps=4, batch=8)
    assert r1.returncode == 0, r1.stdout + r1.stderr
    r2, two = train(cache_dir, folder, tmp_path, 2, *common, steps=4, batch=8)
    assert r2.returncode == 0, r2.stdout + r2.stderr
    s1, s2 = (json.loads((d / "summary.json").read_text()) for d in (one, two))
    assert (s1["world"], s2["world"], s2["global_step"]) == (1, 2, 4)
    assert s1["count"] == s2["count"] > 0  # evaluated (resized and centre-cropped to 16) on every test image
    w1, w2 = weights(one), weights(two)
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-5, atol=1e-6, msg=k)
    # and the augmentations did train something other than the plain pipeline would
    r0, plain = train(cache_dir, folder, tmp_path, 1, *common[:8], steps=4, batch=8)
    assert r0.returncode == 0, r0.stdout + r0.stderr
    assert any(not torch.equal(weights(plain)[k], w1[k]) for k in w1)

"""A corrupt newest checkpoint: one warning line, the previous one resumed, the corrupt one kept aside."""
import shutil

import pytest

from tests.conftest import run_phalanx
from tests.dist.conftest import assert_same_weights, cmd

pytestmark = pytest.mark.dist


def test_a_corrupt_newest_checkpoint_is_named_kept_aside_and_the_previous_one_resumed(reference_runs, cache_dir,
                                                                                      small_idx, tmp_path):
    ref = reference_runs(1)  # 20 steps, checkpoints at the end of epochs 1 and 2
    run_dir = tmp_path / "run"
    shutil.copytree(ref, run_dir)
    newest = run_dir / "checkpoints" / "step-00000020"
    (newest / "model.safetensors").write_bytes(b"damaged")
    (run_dir / "model.safetensors").unlink()
    r = run_phalanx(cmd(small_idx, run_dir, 1), cache_dir)
    assert r.returncode == 0, r.stdout + r.stderr
    warnings = [x for x in r.stdout.splitlines() if "checksum mismatch" in x]
    assert len(warnings) == 1 and "step-00000020.corrupt" in warnings[0] and "from step-00000010" in warnings[0], r.stdout
    aside = run_dir / "checkpoints" / "step-00000020.corrupt"
    assert (aside / "model.safetensors").read_bytes() == b"damaged"  # kept for inspection, not overwritten
    assert "resumed from" in r.stdout and "step-00000010" in r.stdout
    assert_same_weights(ref, run_dir)  # the retrained epoch 2 gives the same weights
    assert (run_dir / "checkpoints" / "step-00000020" / "COMPLETE").is_file()

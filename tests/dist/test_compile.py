"""torch.compile composed with DDP's static graph, and with FSDP2's sharded parameters: 2 ranks on gloo train the
same weights as the eager run of the same strategy.

On CPU, inductor compiles C++ kernels with the system compiler (gcc): tens of seconds on 2 cores.
"""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import run_phalanx
from tests.dist.conftest import EXACT

pytestmark = [pytest.mark.dist, pytest.mark.slow]

STEPS = ["--epochs", "1", "--max_steps", "6", "--global_batch", "60", "--model.width", "8", "--optim.lr", "0.05",
         "--ckpt.at_epoch_end", "false", "--ema", "0", "--tta_flip", "false"]


@pytest.mark.skipif(shutil.which("gcc") is None and shutil.which("cc") is None,
                    reason="torch.compile on CPU needs a C compiler")
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_compiled_training_trains_what_eager_training_trains(cache_dir, small_idx, tmp_path, strategy):
    runs = {}
    for name, extra in (("eager", []), ("compiled", ["--model.compile", "true", "--model.compile_mode", "default"])):
        run_dir = tmp_path / name
        # grad_accum 1: DDP gets static_graph=True (parallel.static_graph's default)
        r = run_phalanx(["train", "--data", small_idx, "--nproc", "2", "--run_dir", run_dir, "--parallel.strategy",
                         strategy, *STEPS, *EXACT, *extra], cache_dir, timeout=900)
        assert r.returncode == 0, r.stdout + r.stderr
        runs[name] = run_dir
    eager, compiled = (load_file(runs[k] / "model.safetensors") for k in ("eager", "compiled"))
    assert eager.keys() == compiled.keys()
    for k in eager:  # fused kernels round differently: close, not bit-identical
        torch.testing.assert_close(compiled[k], eager[k], rtol=1e-3, atol=1e-4, msg=k)
    s_eager, s_compiled = (json.loads((runs[k] / "summary.json").read_text()) for k in ("eager", "compiled"))
    assert s_compiled["world"] == 2 and s_compiled["global_step"] == 6 and s_compiled["strategy"] == strategy
    assert abs(s_compiled["acc"] - s_eager["acc"]) <= 0.01
    log = (runs["compiled"] / "logs" / "rank-0.log").read_text()
    assert "ranks hold different models" not in log

"""The training loop stops a run whose loss is no longer a number, with one line naming the step and the fix."""
import json
import math
import re

import torch

from phalanx.commands import main
from tests.conftest import make_idx_dataset


def test_a_diverging_run_stops_with_one_line_naming_the_step_and_a_lower_lr(tmp_path, capsys):
    data = make_idx_dataset(tmp_path / "idx", 64, 40)
    run = tmp_path / "run"
    # Without normalisation layers, lr 1000 (the largest accepted) makes the loss NaN within a few steps.
    code = main(["train", "--data", str(data), "--data.cache_dir", str(tmp_path / "cache"), "--run_dir", str(run),
                 "--nproc", "1", "--epochs", "10", "--global_batch", "16", "--model.width", "8", "--progress", "false",
                 "--precision", "fp32", "--threads_per_rank", "1", "--model.norm", "none", "--optim.lr", "1000"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    m = re.search(r"training loss is (nan|inf) by step (\d+) \(epoch \d\): the run diverged with optim.lr=1000 "
                  r"and was stopped; rerun with a lower --optim.lr, e.g. 100 ", err)
    assert m, err
    # It stopped at the first logged loss that was not a number (the log is every step here: 4 steps an
    # epoch): every loss in metrics.jsonl is finite, and no weights of the diverged model were exported.
    logged = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["event"] == "train"]
    assert all(math.isfinite(r["loss"]) for r in logged)
    assert int(m[2]) == len(logged) + 1
    assert not (run / "model.safetensors").exists()


def test_an_ema_updated_every_3_steps_resumes_to_the_same_average_and_differs_from_every_step(tmp_path):
    """--ema_every 3 over 16 steps (8 an epoch): updates after steps 3, 6, ... 15 and at the last, 16. A run
    resumed from the epoch-1 checkpoint (step 8, between two updates) exports the same weights as the
    uninterrupted run; an EMA updated every step exports other weights (the setting reaches the loop); and
    the last step always updates it."""
    from safetensors.torch import load_file

    data = make_idx_dataset(tmp_path / "idx", 128, 40)

    def train(run: str, *argv) -> dict:
        code = main(["train", "--data", str(data), "--data.cache_dir", str(tmp_path / "cache"),
                     "--run_dir", str(tmp_path / run), "--nproc", "1", "--epochs", "2", "--global_batch", "16",
                     "--model.width", "8", "--progress", "false", "--precision", "fp32", "--threads_per_rank", "1",
                     "--ema", "0.8", "--deterministic", "true", *map(str, argv)])
        assert code == 0
        return load_file(tmp_path / run / "model.safetensors")

    whole = train("whole", "--ema_every", "3")
    resumed = train("resumed", "--ema_every", "3", "--resume", tmp_path / "whole" / "checkpoints" / "step-00000008")
    every_step = train("every-step")
    assert whole.keys() == resumed.keys() == every_step.keys()
    for k in whole:
        assert torch.equal(whole[k], resumed[k]), k
    assert any(not torch.allclose(whole[k].float(), every_step[k].float()) for k in whole)
    # every 100 steps over 16: the only update is the last step's, the first, which copies the weights
    only_last = train("only-last", "--ema_every", "100")
    final = load_file(tmp_path / "only-last" / "checkpoints" / "step-00000016" / "model.safetensors")
    assert only_last.keys() == final.keys()
    for k in final:
        assert torch.equal(only_last[k], final[k]), k

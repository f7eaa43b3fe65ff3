"""The training loop stops a run whose loss is no longer a number, with one line naming the step and the fix."""
import json
import math
import re

from phalanx.cli import main
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

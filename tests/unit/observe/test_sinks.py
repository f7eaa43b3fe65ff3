"""TensorBoard beside metrics.jsonl: event files from rank 0 when tensorboard is installed, none (and no
error) when it is not, and one line for `--log.tensorboard true` without it."""
import json
import sys

import pytest

from phalanx import config as C
from phalanx.commands import main
from phalanx.errors import ConfigError
from phalanx.observe.console import MetricsWriter
from phalanx.observe.sinks import TENSORBOARD_DIR, metric_sinks
from phalanx.tools.checks import checked_config


def _hide_tensorboard(monkeypatch):
    """As if tensorboard were not installed: its import fails and find_spec finds nothing."""
    for name in ("tensorboard", "torch.utils.tensorboard"):
        monkeypatch.setitem(sys.modules, name, None)


def test_a_finished_run_has_readable_tensorboard_events(tiny_run):
    pytest.importorskip("tensorboard", reason="tensorboard is not installed (pip install -e '.[dev]')")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tiny_run / TENSORBOARD_DIR), size_guidance={"tensors": 0, "histograms": 0})
    acc.Reload()
    tags = acc.Tags()
    assert {"train/loss", "train/lr", "train/img_s", "eval/loss", "eval/acc"} <= set(tags["scalars"])
    logged = [json.loads(x) for x in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in logged if r["event"] == "train"]
    assert [e.step for e in acc.Scalars("train/loss")] == [r["step"] for r in train]
    assert [round(e.value, 4) for e in acc.Scalars("train/loss")] == [round(r["loss"], 4) for r in train]
    final = json.loads((tiny_run / "summary.json").read_text())
    assert acc.Scalars("eval/acc")[-1].value == pytest.approx(final["acc"])
    weights = [t for t in tags["histograms"] if t.startswith("weights/")]
    assert weights and all(len(acc.Histograms(t)) == 1 for t in weights)  # one evaluation: one each
    config_text = acc.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "global_batch = 32" in config_text and "[model]" in config_text


def test_no_tensorboard_installed_means_no_events_and_no_error(tiny_run, tmp_path, monkeypatch):
    _hide_tensorboard(monkeypatch)
    run = tmp_path / "run"
    data = tiny_run.parent  # tiny_run's generated data and prepared store
    assert main(["train", "--data", str(data / "idx"), "--data.cache_dir", str(data / "cache"), "--nproc", "1",
                 "--epochs", "1", "--max_steps", "4", "--global_batch", "32", "--model.width", "8", "--ema", "0",
                 "--progress", "false", "--run_dir", str(run)]) == 0  # --log.tensorboard auto, the default
    assert (run / "summary.json").is_file() and not (run / TENSORBOARD_DIR).exists()
    events = [json.loads(x)["event"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert "train" in events and "eval" in events


def test_tensorboard_true_without_tensorboard_is_one_line_naming_the_fix(monkeypatch):
    _hide_tensorboard(monkeypatch)
    with pytest.raises(ConfigError) as e:
        checked_config(None, [("log.tensorboard", "true")])
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("log.tensorboard='true'") and "pip install tensorboard" in msg


def test_tensorboard_false_writes_metrics_only(tmp_path):
    cfg = C.build_config(None, [("log.tensorboard", "false")])
    assert metric_sinks(cfg, tmp_path, None) == [] and not (tmp_path / TENSORBOARD_DIR).exists()


def test_a_toml_boolean_is_accepted_for_log_tensorboard(tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text("[log]\ntensorboard = false\n")
    assert C.build_config(str(recipe), []).log.tensorboard == "false"


def test_a_failing_sink_is_dropped_and_metrics_go_on(tmp_path):
    class Broken:
        name, closed = "Broken", False

        def write(self, record):
            raise OSError("disk full")

        def close(self):
            Broken.closed = True

    w = MetricsWriter(tmp_path / "metrics.jsonl", [Broken()])
    w.write(event="train", step=1, loss=0.5)
    w.write(event="train", step=2, loss=0.4)
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2
    assert w.sinks == [] and Broken.closed

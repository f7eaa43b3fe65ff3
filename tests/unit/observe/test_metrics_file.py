"""Reading metrics.jsonl back (observe/console.py's read_metrics): the one reader of the report and curves.png."""
import json

import pytest

from phalanx.observe.console import read_metrics


def test_metrics_of_a_resumed_run_keep_the_last_record_of_each_step_and_skip_a_torn_line(tmp_path):
    rows = [{"event": "train", "step": 2, "loss": 2.0, "time": 1.0, "unix_time": 101.0},
            {"event": "train", "step": 4, "loss": 1.5, "time": 2.0, "unix_time": 102.0},   # lost with the process
            {"event": "train", "step": 4, "loss": 1.4, "time": 1.0, "unix_time": 201.0},   # logged again on resume
            {"event": "eval", "step": 4, "acc": 0.5, "loss": 1.0, "time": 2.0, "unix_time": 202.0}]
    (tmp_path / "metrics.jsonl").write_text("\n".join(map(json.dumps, rows)) + '\n{"event": "train", "st')
    train, evals, skipped, t0 = read_metrics(tmp_path / "metrics.jsonl")
    assert [(r["step"], r["loss"], r["wall"]) for r in train] == [(2, 2.0, 1.0), (4, 1.4, 101.0)]
    assert [(e["step"], e["wall"]) for e in evals] == [(4, 102.0)] and skipped == 1 and t0 == 100.0


def test_curves_png_plots_a_resumed_runs_steps_once_and_survives_a_torn_line(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    import matplotlib.axes

    from phalanx.observe.plots import plot_run

    drawn = []
    real_plot = matplotlib.axes.Axes.plot

    def spy(self, xs, ys, *a, **k):
        drawn.append((list(xs), list(ys)))
        return real_plot(self, xs, ys, *a, **k)

    monkeypatch.setattr(matplotlib.axes.Axes, "plot", spy)
    rows = [{"event": "train", "step": 2, "loss": 2.0, "time": 1.0},
            {"event": "train", "step": 4, "loss": 1.5, "time": 2.0},
            {"event": "eval", "step": 4, "epoch": 1, "acc": 0.5, "loss": 1.0, "time": 2.5},
            {"event": "train", "step": 4, "loss": 1.4, "time": 1.0}]  # step 4 again, after a resume
    (tmp_path / "metrics.jsonl").write_text("\n".join(map(json.dumps, rows)) + '\n{"event": "eval", "ste')
    out = plot_run(tmp_path)
    assert out == tmp_path / "curves.png" and out.stat().st_size > 1000
    assert drawn == [([2, 4], [2.0, 1.4]), ([1], [50.0])]

"""What rank 0 shows and every rank writes."""
import json
import logging

import torch

from phalanx.observe.console import MetricsWriter, TrainMeter, setup_logging, wall_time


def test_train_meter_gives_the_mean_loss_per_image_and_starts_a_new_window():
    m = TrainMeter(torch.device("cpu"))
    m.add(torch.tensor(30.0), 10)
    m.add(torch.tensor(10.0), 30)
    m.step(40)
    loss, rate = m.reduce()
    assert loss == 1.0 and rate > 0
    assert m.reduce()[0] == 0.0 and m.seen == 0


def test_metrics_are_json_lines_with_times(tmp_path):
    w = MetricsWriter(tmp_path / "metrics.jsonl")
    w.write(event="train", step=1, loss=0.5)
    w.write(event="eval", acc=0.9)
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["event"] for r in rows] == ["train", "eval"] and all("time" in r for r in rows)
    MetricsWriter(None).write(event="x")  # ranks other than 0 write nothing


def test_debug_lines_reach_the_rank_file_only(tmp_path, capsys):
    log = setup_logging(tmp_path, 1, console=True)
    log.debug("detail for the file")
    log.info("for everyone")
    for h in log.handlers:
        h.flush()
    text = (tmp_path / "logs" / "rank-1.log").read_text()
    assert "detail for the file" in text and "for everyone" in text
    out = capsys.readouterr().out
    assert "for everyone" in out and "detail for the file" not in out
    for h in list(log.handlers):
        log.removeHandler(h)
        h.close()
    logging.getLogger("phalanx").setLevel(logging.INFO)


def test_the_run_summary_names_results_speed_layout_and_files(tmp_path):
    from pathlib import Path

    from phalanx.observe.console import summary_table
    summary = {"acc": 0.9123, "correct": 9123, "count": 10000, "loss": 0.25, "train_s": 83.4, "train_img_s": 5123.4,
               "world": 2, "precision": "bf16", "global_step": 160, "run_dir": "runs/x"}
    text = summary_table(summary, Path("runs/x/model.safetensors"))
    for needle in ("91.23% (9123/10000)", "1 min 23.4 s", "5,123 img/s", "2 rank(s)", "bf16", "runs/x",
                   "runs/x/model.safetensors (+ model.json)"):
        assert needle in text, needle
    assert "top-5" not in text  # the evaluation computes none
    assert "top-5 accuracy  99.00%" in summary_table(dict(summary, top5=0.99), Path("w.safetensors"))
    assert "2 rank(s) (fsdp)" in summary_table(dict(summary, strategy="fsdp"), Path("w.safetensors"))


def test_every_finished_run_ends_with_its_summary(tiny_run):
    log = (tiny_run / "logs" / "rank-0.log").read_text()
    assert "run summary" in log and str(tiny_run / "model.safetensors") in log


class _Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def _lines_of(run):
    got = []
    handler = type("H", (logging.Handler,), {"emit": lambda self, r: got.append(r.getMessage())})()
    log = logging.getLogger("phalanx")
    log.addHandler(handler)
    try:
        run()
    finally:
        log.removeHandler(handler)
    return got


def test_progress_off_a_terminal_is_a_log_line_every_30_seconds_at_the_reduced_steps():
    """No bar where the output is a file or a pipe (its redraws would pile up in one line): a line at most
    every 30 s, at steps whose loss is reduced anyway, with the step, the share done and the time left."""
    from phalanx.observe.console import Progress
    clock = _Clock()
    p = Progress(total_steps=200, initial=0, enabled=True, terminal=False, clock=clock)
    assert p.bar.disable

    def train():
        for step in range(1, 101):  # 1 s per step; the loss is reduced every 10 steps
            clock.t += 1.0
            p.update(0, 2, 0.5 if step % 10 == 0 else None, 256.0)
        p.set_total(150)  # a budget's new estimate
        clock.t += 30.0
        p.update(1, 2, 0.25, 256.0)

    lines = _lines_of(train)
    assert lines[:3] == ["epoch 1/2  step 30/200 (15%)  loss 0.5000  256 img/s  30s elapsed, 2m50s left",
                         "epoch 1/2  step 60/200 (30%)  loss 0.5000  256 img/s  1m00s elapsed, 2m20s left",
                         "epoch 1/2  step 90/200 (45%)  loss 0.5000  256 img/s  1m30s elapsed, 1m50s left"]
    assert len(lines) == 4 and lines[3].startswith("epoch 2/2  step 101/150 (67%)  loss 0.2500")


def test_progress_on_a_terminal_is_the_bar_and_off_is_nothing():
    from phalanx.observe.console import Progress
    on = Progress(10, 0, enabled=True, terminal=True)
    off = Progress(10, 0, enabled=False, terminal=False, clock=_Clock(), line_every_s=0.0)
    assert not on.bar.disable and not on.lines and off.bar.disable and not off.lines
    assert _lines_of(lambda: off.update(0, 1, 0.5, 1.0)) == []
    on.close()


def test_wall_time_reads_in_minutes_and_seconds():
    assert [wall_time(s) for s in (0, 42.04, 60, 83.44, 3725.0)] == [
        "0.0 s", "42.0 s", "1 min 0.0 s", "1 min 23.4 s", "62 min 5.0 s"]

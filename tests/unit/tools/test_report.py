"""`phalanx report`: plots and one static page for a finished run, a run still training, a preempted run and
several runs; the page links only files that exist and loads in headless Chromium without console errors."""
import io
import json
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import pytest

from phalanx.commands import main
from phalanx.tools.report import PNG_DIR, make_report
from phalanx.train import faults

from .chromium import find_chromium, load_pages

CURVES = ("loss_acc.png", "eval_loss.png", "lr.png", "throughput.png")


class _Refs(HTMLParser):
    def __init__(self):
        super().__init__()
        self.refs = []

    def handle_starttag(self, tag, attrs):
        self.refs += [v for k, v in attrs if k in ("src", "href") and v]


def links_of(page: Path) -> list[str]:
    """Every src and href of the page; fails on one that leaves the machine or names a missing file."""
    parser = _Refs()
    parser.feed(page.read_text())
    for ref in parser.refs:
        assert not re.match(r"^(https?:)?//", ref), f"{page} loads {ref} from the network"
        if not ref.startswith(("data:", "#")):
            assert (page.parent / ref).exists(), f"{page} links {ref}, which does not exist"
    return parser.refs


def text_of(page: Path) -> str:
    return " ".join(re.sub(r"<[^>]+>", " ", page.read_text()).split())


def assert_not_blank(png: Path) -> None:
    from PIL import Image
    img = Image.open(png).convert("RGB")
    assert len(img.getcolors(maxcolors=1 << 20) or [0] * 1000) > 20, f"{png} is (nearly) one colour"


def train_tiny(tiny_run: Path, run_dir: Path, *extra: str) -> int:
    """A tiny run on tiny_run's generated data and prepared store: 8 steps an epoch, logged every 2."""
    root = tiny_run.parent
    return main(["train", "--data", str(root / "idx"), "--data.cache_dir", str(root / "cache"), "--nproc", "1",
                 "--global_batch", "32", "--model.width", "8", "--ema", "0", "--progress", "false",
                 "--run_dir", str(run_dir), *extra])


@pytest.fixture(scope="module")
def finished(tiny_run, tmp_path_factory) -> Path:
    """A copy of the finished tiny run, reported into itself (the default --out)."""
    run = tmp_path_factory.mktemp("finished") / "tiny"
    shutil.copytree(tiny_run, run)
    assert main(["report", str(run)]) == 0
    return run


@pytest.fixture(scope="module")
def preempted(tiny_run, tmp_path_factory) -> tuple[Path, Path]:
    """A real run, reported while it trains (at step 10, into `live`), then preempted by SIGTERM at step 12
    (fault injection, in this process) and reported again (into itself). Returns (run, live)."""
    root = tmp_path_factory.mktemp("preempted")
    run, live = root / "run", root / "live"
    real_maybe = faults.maybe

    def maybe(point, rank, step):
        if point == "step" and step == 10:
            assert not (run / "summary.json").exists()
            make_report([run], live)
        real_maybe(point, rank, step)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(faults, "_SPEC", "step:0:12:term")
        mp.setattr(faults, "maybe", maybe)
        assert train_tiny(tiny_run, run, "--epochs", "3", "--max_steps", "20", "--eval_every", "1") == 0
    assert (live / "report.html").is_file() and not (run / "model.safetensors").exists()
    assert main(["report", str(run)]) == 0
    return run, live


def test_report_of_a_finished_run(finished):
    page = finished / "report.html"
    for name in (*CURVES, "confusion.png", "per_class.png"):
        assert_not_blank(finished / PNG_DIR / name)
    refs = links_of(page)
    assert sum(r.startswith("data:image/png;base64,") for r in refs) == 6  # the page stands alone
    assert {"report/confusion.png", "config.toml", "metrics.jsonl", "summary.json"} <= set(refs)
    text = text_of(page)
    summary = json.loads((finished / "summary.json").read_text())
    assert "Finished: 8 steps of 8" in text and f"{100 * summary['acc']:.2f}%" in text
    assert f"top-5 accuracy {100 * summary['top5']:.2f}%" in text  # 10 classes: top-5 beside top-1
    for field in ("world size (ranks)", "strategy", "precision", "training wall time", "global_batch = 32"):
        assert field in text
    # The confusion matrix is of the final weights on the run's test split: its accuracy is the run's.
    got = float(re.search(r"64 images, accuracy ([\d.]+)%", text).group(1)) / 100
    assert got == pytest.approx(summary["acc"], abs=0.0 if summary["precision"] == "fp32" else 3 / 64)


def test_report_while_training(preempted):
    _, live = preempted
    page = live / "report.html"
    for name in CURVES:
        assert_not_blank(live / PNG_DIR / name)
    assert not (live / PNG_DIR / "confusion.png").exists()
    links_of(page)
    text = text_of(page)
    assert "Not finished: no summary.json or final weights yet" in text and "(step 8 of 20" in text
    assert "No final weights (model.safetensors) yet" in text


def test_report_of_a_preempted_run(preempted):
    run, _ = preempted
    page = run / "report.html"
    links_of(page)
    text = text_of(page)
    assert "Stopped by preemption (preempted by SIGTERM) at step 12 of 20" in text
    assert f"phalanx train --resume {run}" in text and "Newest checkpoint: step 12" in text
    for name in CURVES:
        assert_not_blank(run / PNG_DIR / name)


def test_report_compares_several_runs(finished, preempted, tmp_path):
    out = tmp_path / "compare"
    assert main(["report", str(finished), str(preempted[0]), "--out", str(out)]) == 0
    page = out / "report.html"
    links_of(page)
    text = text_of(page)
    assert "Phalanx report: 2 runs" in text and "Config differences" in text
    # epochs and max_steps differ (1/8 against 3/20); run_dir is left out
    diff = page.read_text().split("Config differences")[1].split("<h2>")[0]
    assert "<td>epochs</td><td>1</td><td>3</td>" in diff and "run_dir" not in diff
    assert "tiny (finished)" not in text and "run (preempted)" in text  # a state in a label: only unfinished
    assert (out / PNG_DIR / "confusion-1.png").is_file() and not (out / PNG_DIR / "confusion-2.png").exists()


def test_report_without_the_test_data_says_so(tiny_run, tmp_path):
    run = tmp_path / "moved"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns(PNG_DIR, "report.html"))
    cfg = run / "config.toml"
    cfg.write_text(re.sub(r'cache_dir = ".*"', f'cache_dir = "{tmp_path / "elsewhere"}"', cfg.read_text()))
    assert main(["report", str(run)]) == 0
    text = text_of(run / "report.html")
    assert "The test data is not available here" in text and not (run / PNG_DIR / "confusion.png").exists()
    links_of(run / "report.html")


def test_not_a_run_directory_is_one_line(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "not a run directory" in err and str(tmp_path) in err


@pytest.mark.skipif(find_chromium() is None, reason="chromium is not installed (.ci/run installs Debian's chromium)")
def test_report_pages_load_in_headless_chromium_without_console_errors(finished, preempted, tmp_path):
    from PIL import Image

    # A page with a missing image, a console error and an exception: proof that the check sees them.
    bad = tmp_path / "bad.html"
    bad.write_text('<!DOCTYPE html><title>bad</title><img src="missing.png"><script>console.error("boom");'
                   "undefinedFunction();</script>")
    run, live = preempted
    pages = [finished / "report.html", live / "report.html", run / "report.html", bad]
    loads = load_pages(pages)
    assert len(loads[-1].errors) == 3 and loads[-1].broken_images
    for page, got in zip(pages[:-1], loads[:-1]):
        assert got.errors == [] and got.broken_images == [], (page, got.errors, got.broken_images)
        assert got.title.startswith("Phalanx report")
        shot = Image.open(io.BytesIO(got.screenshot)).convert("RGB")
        assert shot.size == (1280, 2000) and len(shot.getcolors(maxcolors=1 << 20) or [0] * 1000) > 20, page


def test_a_profiled_run_shows_each_ranks_step_split(tiny_run, tmp_path):
    run = tmp_path / "profiled"
    shutil.copytree(tiny_run, run)
    (run / "profile").mkdir()
    for rank, backward in ((0, 70.0), (1, 74.0)):
        split = {"step_ms": 120.0, "steps": 20, "phases": {"augment": 1.2, "forward": 36.0, "backward": backward,
                                                            "optimizer": 1.4, "sync": 2.0, "ema": 1.8,
                                                            "other": 120.0 - 42.4 - backward}}
        (run / "profile" / f"rank-{rank}.json").write_text(json.dumps(split))
    (run / "profile" / "rank-2.json").write_text("{torn")  # unreadable: left out, not an error
    page = make_report([run], run, evaluate=False)
    assert_not_blank(run / PNG_DIR / "profile.png")
    assert "Where a step's time goes" in text_of(page)
    from phalanx.tools.report import read_run
    assert sorted(read_run(run, "r", "C0").profile) == [0, 1]
    assert "Where a step's time goes" not in text_of(make_report([tiny_run], tmp_path / "plain", evaluate=False))

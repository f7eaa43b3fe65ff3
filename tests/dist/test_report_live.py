"""`phalanx report` on a 2-rank run while it trains (a real launch), then on the same run preempted."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import run_phalanx
from tests.dist.conftest import cmd
from tests.unit.tools.test_report import links_of, text_of

pytestmark = [pytest.mark.dist, pytest.mark.slow]


def test_report_while_a_two_rank_run_trains_then_after_its_preemption(cache_dir, small_idx, tmp_path):
    run_dir = tmp_path / "run"
    env = dict(os.environ, PHALANX_CACHE=str(cache_dir), PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "phalanx", *map(str, cmd(small_idx, run_dir, 2, "--epochs", "60"))],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    try:
        t0 = time.monotonic()
        while time.monotonic() - t0 < 180:
            m = run_dir / "metrics.jsonl"
            if m.exists() and sum('"event": "train"' in x for x in m.read_text().splitlines()) >= 2:
                break
            assert proc.poll() is None, proc.communicate()[0]
            time.sleep(0.3)
        r = run_phalanx(["report", run_dir, "--no-eval"], cache_dir)
        assert r.returncode == 0, r.stdout + r.stderr
        assert proc.poll() is None, "the run ended before the report: nothing was shown in progress"
        page = run_dir / "report.html"
        links_of(page)  # every file it references exists
        text = text_of(page)
        assert "Not finished" in text and "world size (ranks) 2" in text, text[:3000]
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the launcher's process group: a preemption
        out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, out
    r = run_phalanx(["report", run_dir, "--no-eval"], cache_dir)
    assert r.returncode == 0, r.stdout + r.stderr
    links_of(run_dir / "report.html")
    assert "preempted" in text_of(run_dir / "report.html").lower()
    assert not (run_dir / "summary.json").exists() and json.loads(
        (run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text() / "state.json").read_text()
    )["reason"].startswith("preempted")

"""The seconds before the first optimizer step, by phase: the launcher's phases handed to the ranks, the rank's
following them, the durations and the one line."""
import json

from phalanx.train import startup
from phalanx.train.startup import Phases


def test_phases_continue_across_the_hand_over_and_give_durations(monkeypatch):
    monkeypatch.delenv(startup.STARTUP_ENV, raising=False)
    now = iter([101.5, 101.75, 102.0, 102.5])
    launcher = Phases(100.0, clock=lambda: next(now))
    for name in ("imports", "config", "data", "tune"):
        launcher.mark(name)
    launcher.hand_over()
    assert json.loads(startup.os.environ[startup.STARTUP_ENV])[0] == ["imports", 1.5]
    later = iter([103.0, 103.25])
    rank = Phases.inherited(100.0)
    rank.clock = lambda: next(later)
    rank.mark("launch")
    rank.mark("first_step")
    got = rank.seconds()
    assert got == {"imports": 1.5, "config": 0.25, "data": 0.25, "tune": 0.5, "launch": 0.5, "first_step": 0.25,
                   "total": 3.25}
    line = startup.line(got)
    assert line.startswith("start-up: 3.25 s from the command's start to the first optimizer step (imports 1.50,")
    assert "\n" not in line


def test_a_rank_without_a_launcher_counts_from_its_own_start(monkeypatch):
    monkeypatch.setenv(startup.STARTUP_ENV, "not json")
    p = Phases.inherited(10.0)
    p.clock = lambda: 12.0
    p.mark("launch")
    assert p.seconds() == {"launch": 2.0, "total": 2.0}

"""`--log.profile` on a real 2-rank launch: every rank's profile is written, rank 0 says where the step's time
went, and profiling changes nothing the run computes."""
import json

import pytest

from tests.conftest import run_phalanx
from tests.dist.conftest import assert_same_weights, cmd

pytestmark = pytest.mark.dist


def test_a_profiled_two_rank_run_splits_its_steps_and_trains_the_same_weights(reference_runs, cache_dir, small_idx,
                                                                             tmp_path):
    run_dir = tmp_path / "profiled"
    r = run_phalanx(cmd(small_idx, run_dir, 2, "--log.profile", "4", "--log.profile_start", "3"), cache_dir)
    assert r.returncode == 0, r.stdout + r.stderr
    line = [x for x in r.stdout.splitlines() if x.startswith("profile of rank 0: ")]
    assert len(line) == 1, r.stdout  # rank 0 speaks, once
    assert " ms per step over 4 steps: " in line[0] and "backward" in line[0]
    assert "USDT" not in r.stdout + r.stderr  # kineto's per-rank chatter stays off the console
    for rank in (0, 1):
        split = json.loads((run_dir / "profile" / f"rank-{rank}.json").read_text())
        assert split["steps"] == 4
        assert split["phases"]["forward"] > 0 and split["phases"]["backward"] > 0
        assert split["phases"]["sync"] > 0  # the norm statistics' all-reduce after each step (2 ranks)
        assert split["phases"]["augment"] > 0 and split["phases"]["ema"] > 0
        assert (run_dir / "profile" / f"rank-{rank}.trace.json.gz").stat().st_size > 0
        assert "c10d::allreduce_" in (run_dir / "profile" / f"rank-{rank}.txt").read_text()
    assert_same_weights(reference_runs(2), run_dir, exact=True)

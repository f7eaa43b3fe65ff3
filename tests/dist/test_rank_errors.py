"""An error inside N ranks is one line: real launches of 2 ranks on gloo, through `phalanx train|eval --nproc 2`.

Every rank that refuses a run leaves its line for the launcher (the elastic agent's error file, which forked ranks
write too) and prints nothing; the launcher prints the first failing rank's line once, exits with that rank's
code, and torch's own report (traceback, `ProcessExitedException`, `Root Cause`) is not shown.
"""
import pytest

from tests.conftest import make_idx_dataset, run_phalanx

pytestmark = pytest.mark.dist

SMALL = ["--max_steps", "2", "--global_batch", "32", "--model.width", "8", "--progress", "false", "--tune", "false",
         "--threads_per_rank", "1"]
TORCH_REPORT = ("Traceback", "ProcessExitedException", "Root Cause", "FAILED", "error_file", "E1")


def assert_one_line(r, code: int, needle: str) -> str:
    """Exit `code`, and stderr is one `phalanx: error:` line holding `needle`, with nothing of torch's report."""
    err = r.stderr.strip().splitlines()
    assert r.returncode == code, r.stdout + r.stderr
    assert len(err) == 1 and err[0].startswith("phalanx: error: ") and needle in err[0], r.stderr
    assert not any(w in r.stdout + r.stderr for w in TORCH_REPORT), r.stdout + r.stderr
    assert (r.stdout + r.stderr).count(needle) == 1  # once, not once per rank
    return err[0]


@pytest.fixture(scope="module")
def idx(tmp_path_factory):
    return make_idx_dataset(tmp_path_factory.mktemp("idx"), 128, 32)


@pytest.mark.parametrize("method", ["fork", pytest.param("spawn", marks=pytest.mark.slow)])
def test_a_config_error_raised_in_every_rank_is_one_line_exit_2(cache_dir, idx, tmp_path, method):
    # FSDP refuses fp16 when it wraps the model, in each rank, after the process group is joined.
    r = run_phalanx(["train", "--data", idx, "--nproc", "2", "--run_dir", tmp_path / "run", *SMALL,
                     "--parallel.strategy", "fsdp", "--precision", "fp16", "--parallel.start_method", method],
                    cache_dir, timeout=300)
    assert_one_line(r, 2, "precision=fp16: not supported with --parallel.strategy fsdp")
    # the per-rank detail stays in the rank's own log: in the failing rank's at least (the agent stops the other
    # ranks as soon as one exits, and under spawn rank 0, which does more before building the model, may be
    # stopped before it gets there)
    logs = [(tmp_path / "run" / "logs" / f"rank-{rank}.log").read_text() for rank in (0, 1)]
    assert any("precision=fp16: not supported" in log for log in logs), logs


@pytest.mark.slow
def test_sync_bn_with_fsdp_refused_in_the_ranks_is_one_line(cache_dir, idx, tmp_path):
    r = run_phalanx(["train", "--data", idx, "--nproc", "2", "--run_dir", tmp_path / "run", *SMALL,
                     "--parallel.strategy", "fsdp", "--parallel.sync_bn", "true"], cache_dir, timeout=300)
    assert_one_line(r, 2, "parallel.sync_bn=True")


def test_eval_of_a_folder_without_weights_at_2_ranks_is_one_line_exit_1(cache_dir, idx, tmp_path):
    (tmp_path / "empty").mkdir()
    r = run_phalanx(["eval", tmp_path / "empty", "--nproc", "2", "--data", idx, "--progress", "false"], cache_dir,
                    timeout=300)
    assert_one_line(r, 1, "no weights file")


@pytest.mark.slow  # a training to resume, then the refused launches
def test_a_checkpoint_of_another_width_is_one_line_before_the_run_announces_itself(cache_dir, idx, tmp_path):
    run = tmp_path / "run"
    r = run_phalanx(["train", "--data", idx, "--nproc", "1", "--run_dir", run, "--epochs", "1", *SMALL,
                     "--max_steps", "4", "--ckpt.at_epoch_end", "true"], cache_dir, timeout=300)
    assert r.returncode == 0, r.stderr
    resume = ["train", "--resume", run, "--data", idx, "--nproc", "2", "--epochs", "2", *SMALL, "--max_steps", "8",
              "--model.width", "16"]
    # The launcher reads the run's config.toml: no rank is started, no start-up line printed.
    r = run_phalanx(resume, cache_dir, timeout=300)
    assert_one_line(r, 1, "written by a run of --model.width 8, this run's 16")
    assert r.stdout == ""
    # Without that record, the ranks build the model and refuse the weights themselves: one line all the same.
    (run / "config.toml").unlink()
    r = run_phalanx(resume, cache_dir, timeout=300)
    assert_one_line(r, 1, "was it written by another model or width?")
    assert "launching 2 rank(s)" in r.stdout


@pytest.mark.slow  # the rendezvous wait itself, plus starting the agent
def test_a_node_whose_peers_never_join_gives_up_after_init_timeout_s_in_one_line(cache_dir, idx, tmp_path):
    import time
    t0 = time.monotonic()
    r = run_phalanx(["train", "--data", idx, "--nnodes", "2", "--node-rank", "0", "--nproc", "1",
                     "--parallel.init_timeout_s", "3", "--rdzv-endpoint", "127.0.0.1:0", "--run_dir",
                     tmp_path / "run", *SMALL], cache_dir, timeout=300)
    assert time.monotonic() - t0 < 90
    assert_one_line(r, 2, "not all joined within --parallel.init_timeout_s 3")

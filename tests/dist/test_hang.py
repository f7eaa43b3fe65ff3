"""A stalled rank is named with where it stood: real launches of 2 ranks on gloo through `phalanx train --nproc 2`.

Rank 1 stops at step 3 (PHALANX_FAULT, train/faults.py), after its optimizer step; rank 0 waits for it in the next
collective (the ranks' agreement on preemption) until --parallel.timeout_s. Rank 0 then writes its own stacks,
asks rank 1 for its stacks (SIGUSR2: faulthandler writes them into rank 1's log) and names rank 1's place
(file:line) in the launcher's last line; a frozen rank 1 (SIGSTOP) is named as not answering.
"""
import inspect
import time

import pytest

from phalanx.runtime import hang
from phalanx.train import faults, loop
from tests.conftest import run_phalanx

pytestmark = pytest.mark.dist

SMALL = ["--max_steps", "9", "--global_batch", "32", "--model.width", "8", "--progress", "false", "--tune", "false",
         "--threads_per_rank", "1", "--ckpt.at_epoch_end", "false", "--parallel.timeout_s", "4"]


def line_of(func, text: str) -> int:
    lines, first = inspect.getsourcelines(func)
    return first + next(i for i, line in enumerate(lines) if text in line)


def stall(cache_dir, small_idx, tmp_path, action: str):
    """(result, run dir, seconds from rank 1's last collective to the launcher's return)."""
    run_dir = tmp_path / "run"
    r = run_phalanx(["train", "--data", small_idx, "--nproc", "2", "--run_dir", run_dir, *SMALL], cache_dir,
                    env_extra={"PHALANX_FAULT": f"step:1:3:{action}"}, timeout=240)
    ended = time.time()
    # rank 1's record of the last collective it entered, which stays when it stalls (its `time`: just before)
    stalled_at = hang.read_record(run_dir / "logs", 1)["time"]
    return r, run_dir, ended - stalled_at


def test_a_stalled_ranks_stack_is_in_its_log_and_its_place_in_the_launchers_last_line(cache_dir, small_idx,
                                                                                      tmp_path):
    r, run_dir, seconds = stall(cache_dir, small_idx, tmp_path, "stall")
    pause = line_of(faults.stall_here, "libc.pause()")
    called = line_of(loop.after_optimizer_step, "faults.maybe(")
    assert r.returncode == 1, r.stdout + r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith(f"phalanx: rank 1 stalled at src/phalanx/train/faults.py:{pause} in stall_here (from "
                           f"src/phalanx/train/loop.py:{called} in after_optimizer_step), last collective entered: "
                           f"all_reduce (norm statistics) #"), last
    # rank 0 waited in the next collective: the one after rank 1's last (sequence numbers count alike on all ranks)
    seq = int(last.split("all_reduce (norm statistics) #")[1].split(",")[0])
    assert f"Rank 0 timed out waiting for it in all_reduce (agree) #{seq + 1} while agreeing on preemption at " \
           f"step 3" in last, last
    assert f"its stacks and log: {run_dir}/logs/rank-1.log" in last
    assert "Traceback" not in r.stderr
    # rank 1's log: faulthandler's dump of its threads (the stall, and who called it), then its record
    log1 = (run_dir / "logs" / "rank-1.log").read_text()
    assert "Current thread 0x" in log1 or "Thread 0x" in log1
    assert f'src/phalanx/train/faults.py", line {pause} in stall_here' in log1
    assert f'src/phalanx/train/loop.py", line {called} in after_optimizer_step' in log1
    assert (f"phalanx: the stacks above were asked for by a rank that timed out waiting for this one; last "
            f"collective entered: all_reduce (norm statistics) #{seq}") in log1
    # rank 0's log: its own stacks (where it waited: the traceback of the agreement) and its last collective
    log0 = (run_dir / "logs" / "rank-0.log").read_text()
    assert "phalanx: a collective timed out while agreeing on preemption at step 3; this rank's stacks follow" in log0
    assert "in agree_all" in log0 and "Timed out waiting 4000ms" in log0
    assert f"phalanx: last collective entered: all_reduce (agree) #{seq + 1}, while agreeing on preemption" in log0
    # the timeout (4 s), the store check-in (5 s), the dump (< 1 s) and the group's end: rank 1, named stalled,
    # ends at the agent's SIGTERM instead of after torch's 30 s grace
    print(f"stall to the launcher's last line: {seconds:.1f} s")
    assert seconds < 4 + 5 + 15, f"{seconds:.1f} s"


@pytest.mark.slow  # a frozen rank ignores the agent's SIGTERM: torch SIGKILLs it 30 s later
def test_a_frozen_rank_is_named_as_not_answering_with_its_last_collective(cache_dir, small_idx, tmp_path):
    r, run_dir, seconds = stall(cache_dir, small_idx, tmp_path, "stop")
    assert r.returncode == 1, r.stdout + r.stderr
    last = r.stderr.strip().splitlines()[-1]
    pid = hang.read_record(run_dir / "logs", 1)["pid"]
    assert last.startswith(f"phalanx: rank 1 stalled and did not answer: its process {pid} is stopped (SIGSTOP or "
                           f"a debugger); last collective entered: all_reduce (norm statistics) #"), last
    assert "Rank 0 timed out waiting for it in all_reduce (agree) #" in last
    assert "Thread 0x" not in (run_dir / "logs" / "rank-1.log").read_text()  # frozen: it wrote nothing
    assert "this rank's stacks follow" in (run_dir / "logs" / "rank-0.log").read_text()
    print(f"stop to the launcher's last line: {seconds:.1f} s")
    assert seconds < 4 + 5 + 30 + 15, f"{seconds:.1f} s"

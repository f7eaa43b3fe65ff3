"""runtime/hang.py: a rank's record of its last collective, its stacks on SIGUSR2, and what a peer reads of them.

A real child process stands for the stalled rank: it arms the record and the dump, then blocks in C code holding
the GIL (faults.stall_here), with a SIGTERM handler that, like the training loop's preemption handler, keeps it
running; the test process asks it as a rank that timed out would.
"""
import inspect
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from phalanx.runtime import hang
from phalanx.train import faults

CHILD = """
import importlib.util, signal, sys
from pathlib import Path
from types import SimpleNamespace

def load(name, path):  # the two modules alone, by path: no torch to import (seconds on a busy machine)
    spec = importlib.util.spec_from_file_location(name, path)
    module = sys.modules[name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module

hang, faults = load("hang", sys.argv[2]), load("faults", sys.argv[3])
signal.signal(signal.SIGTERM, lambda *_: None)  # as the loop's preemption handler: a SIGTERM alone does not end it
hang.arm(SimpleNamespace(rank=1, phase="training epoch 1 step 3"), Path(sys.argv[1]))
hang.entered("gradient reduction (forward/backward)")
hang.entered("all_reduce (agree)")
faults.stall_here()
"""


def pause_line() -> int:
    """The line of faults.stall_here that blocks."""
    lines, first = inspect.getsourcelines(faults.stall_here)
    return first + next(i for i, text in enumerate(lines) if "libc.pause()" in text)


def wait_for(predicate, timeout=20.0, what="a condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def alive(proc) -> bool:
    return proc.poll() is None


@pytest.fixture
def stalled(tmp_path):
    """A child process armed as rank 1 and blocked in faults.stall_here; killed by pid at the end."""
    logs = tmp_path / "logs"
    logs.mkdir()
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(logs), hang.__file__, faults.__file__])
    try:
        wait_for(lambda: proc.poll() is not None or (hang.read_record(logs, 1) or {}).get("seq") == 2, timeout=60,
                 what="the child's record")
        assert proc.poll() is None, "the child exited"
        time.sleep(0.2)  # from the record to the pause: a few bytecodes
        yield proc, logs
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)


def test_a_stalled_rank_answers_with_its_place_and_then_ends_at_the_next_sigterm(stalled):
    proc, logs = stalled
    rec = hang.read_record(logs, 1)
    assert (rec["pid"], rec["rank"], rec["collective"], rec["seq"]) == (proc.pid, 1, "all_reduce (agree)", 2)
    assert rec["host"] == socket.gethostname() and rec["phase"] == "training epoch 1 step 3"

    # Frozen (SIGSTOP): not asked, named as not answering, at once; its record still read.
    os.kill(proc.pid, signal.SIGSTOP)
    wait_for(lambda: hang.process_state(proc.pid) == "T", what="the stop")
    t0 = time.monotonic()
    [ans] = hang.ask_stacks(logs, [1])
    assert time.monotonic() - t0 < 1.0
    assert ans.silence == f"its process {proc.pid} is stopped (SIGSTOP or a debugger)" and not ans.frames
    assert hang.where(ans) == (f"and did not answer: its process {proc.pid} is stopped (SIGSTOP or a debugger); "
                               f"last collective entered: all_reduce (agree) #2, while training epoch 1 step 3")
    assert "Current thread" not in (logs / "rank-1.log").read_text()
    os.kill(proc.pid, signal.SIGCONT)

    # Running, stuck in C code with the GIL held: faulthandler's dump comes all the same, with the place.
    t0 = time.monotonic()
    [ans] = hang.ask_stacks(logs, [1])
    assert time.monotonic() - t0 < hang.DUMP_WAIT_S
    assert ans.silence == ""
    assert ans.frames[0] == ("src/phalanx/train/faults.py", pause_line(), "stall_here"), ans.frames
    assert hang.where(ans) == (f"at src/phalanx/train/faults.py:{pause_line()} in stall_here, last collective "
                               f"entered: all_reduce (agree) #2, while training epoch 1 step 3")
    log = (logs / "rank-1.log").read_text()
    assert f'faults.py", line {pause_line()} in stall_here' in log
    wait_for(lambda: "asked for by a rank that timed out" in (logs / "rank-1.log").read_text(), 20, "the record")
    assert ("rank1 ERROR phalanx: the stacks above were asked for by a rank that timed out waiting for this one; "
            "last collective entered: all_reduce (agree) #2, while training epoch 1 step 3") in \
        (logs / "rank-1.log").read_text()

    # Named stalled by a peer: the elastic agent's SIGTERM now ends it, instead of its handler keeping it alive.
    os.kill(proc.pid, signal.SIGTERM)
    proc.wait(timeout=5)
    assert proc.returncode == -signal.SIGTERM


def test_a_users_sigusr2_dumps_the_stacks_and_leaves_sigterm_alone(stalled):
    proc, logs = stalled
    os.kill(proc.pid, signal.SIGUSR2)
    wait_for(lambda: "asked for by SIGUSR2" in (logs / "rank-1.log").read_text(), 10, "the dump")
    text = (logs / "rank-1.log").read_text()
    threads = hang.parse_dump(text)
    assert hang.phalanx_frames(hang.main_thread(threads))[0][:2] == ("src/phalanx/train/faults.py", pause_line())
    assert "rank1 INFO phalanx: the stacks above were asked for by SIGUSR2; last collective entered: all_reduce" in text
    os.kill(proc.pid, signal.SIGTERM)  # the child's own handler keeps it running: nobody named it stalled
    time.sleep(0.5)
    assert alive(proc)


def test_ranks_that_cannot_answer_are_named_with_why(tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    # no record at all (another node's run directory, or not started)
    [ans] = hang.ask_stacks(logs, [3])
    assert hang.where(ans).startswith("and did not answer: it left no record in")
    # a record of another host
    record = "{pid}\t{started}\t{host}\t1\t7\t1796697385.898\tbarrier\tevaluating\0"
    (logs / "rank-1.where").write_text(record.format(pid=os.getpid(), started="1", host="node-b"))
    [ans] = hang.ask_stacks(logs, [1])
    assert hang.where(ans) == ("and did not answer: it runs on node-b, where only its own node can ask for its "
                               "stacks; last collective entered: barrier #7, while evaluating")
    # a process that is gone
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait(timeout=30)
    (logs / "rank-1.where").write_text(record.format(pid=gone.pid, started="1", host=socket.gethostname()))
    [ans] = hang.ask_stacks(logs, [1])
    assert ans.silence == f"its process {gone.pid} has exited"
    # a record left by a process that is gone, whose pid another process has now (this one): not signalled
    (logs / "rank-1.where").write_text(record.format(pid=os.getpid(), started="1", host=socket.gethostname()))
    [ans] = hang.ask_stacks(logs, [1])
    assert ans.silence == f"its process {os.getpid()} has exited"  # and this test process is still here


def test_the_record_follows_the_collectives_and_a_failed_rank_writes_its_own_stacks(tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    env = SimpleNamespace(rank=0, phase="starting")
    hang.arm(env, logs)
    try:
        assert hang.read_record(logs, 0)["seq"] == 0 and hang.collective_now() == ""
        env.phase = "training epoch 2 step 5 (forward/backward, gradient all-reduce)"
        hang.entered("gradient reduction (forward/backward)")
        hang.entered("all_reduce (agree)")
        rec = hang.read_record(logs, 0)
        assert (rec["seq"], rec["collective"], rec["pid"]) == (2, "all_reduce (agree)", os.getpid())
        assert rec["phase"] == env.phase
        assert hang.collective_now() == "all_reduce (agree) #2"

        def agree_all():
            raise RuntimeError("Timed out waiting 4000ms for recv operation to complete")
        try:
            agree_all()
        except RuntimeError as e:
            called_at = inspect.currentframe().f_lineno + 1
            hang.write_own_stacks(e, "a collective timed out while agreeing")
        log = (logs / "rank-0.log").read_text()
        assert "rank0 ERROR phalanx: a collective timed out while agreeing; this rank's stacks follow" in log
        assert "in agree_all\n" in log and "RuntimeError: Timed out waiting 4000ms" in log  # the traceback
        # faulthandler's dump: this very test function, where it wrote its stacks
        assert f'test_hang.py", line {called_at} in test_the_record_follows' in log
        assert log.rstrip().endswith("phalanx: last collective entered: all_reduce (agree) #2, while training "
                                     "epoch 2 step 5 (forward/backward, gradient all-reduce)")
    finally:
        hang.disarm()
    assert not (logs / "rank-0.where").exists()
    hang.entered("barrier")  # disarmed: nothing to record, no error
    assert signal.getsignal(hang.SIGNAL) in (signal.SIG_DFL, None)


def test_a_dump_is_parsed_into_threads_and_the_main_threads_phalanx_frames():
    root = Path(hang.__file__).resolve().parents[1]
    text = (f'Thread 0x00007f17aa5ab6c0 (most recent call first):\n'
            f'  File "/usr/lib/python3.11/threading.py", line 331 in wait\n'
            f'  File "{root}/train/checkpoint_writer.py", line 40 in _run\n'
            f'  File "/usr/lib/python3.11/threading.py", line 1002 in _bootstrap\n'
            f'\n'
            f'Current thread 0x00007f1873a39b80 (most recent call first):\n'
            f'  File "/venv/torch/autograd/graph.py", line 829 in _engine_run_backward\n'
            f'  File "{root}/train/precision.py", line 61 in backward\n'
            f'  File "{root}/train/step.py", line 39 in forward_backward\n'
            f'  File "<frozen runpy>", line 198 in _run_module_as_main\n'
            f'2026-12-08 02:36:34,976 rank1 ERROR after the dump\n'
            f'  File "{root}/train/loop.py", line 1 in not_a_frame_of_the_dump\n')
    threads = hang.parse_dump(text)
    assert len(threads) == 2 and len(threads[1]) == 4
    frames = hang.phalanx_frames(hang.main_thread(threads))
    src = "src/" if root.parent.name == "src" else ""
    assert frames == [(f"{src}phalanx/train/precision.py", 61, "backward"),
                      (f"{src}phalanx/train/step.py", 39, "forward_backward")]
    ans = hang.Answer(1, frames=frames)
    assert hang.where(ans) == (f"at {src}phalanx/train/precision.py:61 in backward (from {src}phalanx/train/step.py:39 "
                               f"in forward_backward)")


def test_a_fatal_signal_writes_the_ranks_stacks_into_its_log(tmp_path):
    # NCCL's watchdog aborts a rank whose collective timed out: its stacks are in its log all the same.
    logs = tmp_path / "logs"
    logs.mkdir()
    code = CHILD.replace("faults.stall_here()", "import os; os.abort()")
    proc = subprocess.run([sys.executable, "-c", code, str(logs), hang.__file__, faults.__file__], timeout=60,
                          capture_output=True)
    assert proc.returncode == -signal.SIGABRT
    log = (logs / "rank-1.log").read_text()
    abort_line = code.splitlines().index("import os; os.abort()") + 1
    assert "Fatal Python error: Aborted" in log and f'File "<string>", line {abort_line} in <module>' in log, log


def test_nccls_flight_recorder_dumps_into_the_run_directory_unless_the_user_set_it(tmp_path):
    from phalanx.runtime.cpu import CPUAccelerator
    from phalanx.runtime.cuda import FLIGHT_RECORDER_ENTRIES, CUDAAccelerator
    from phalanx.runtime.dist import set_flight_recorder
    environ = {}
    set_flight_recorder(CUDAAccelerator(), tmp_path / "logs", environ)  # the settings only: no GPU needed
    prefix = str(tmp_path / "logs" / "flight-recorder" / "rank-")
    assert environ == {"TORCH_FR_BUFFER_SIZE": str(FLIGHT_RECORDER_ENTRIES),
                       "TORCH_NCCL_TRACE_BUFFER_SIZE": str(FLIGHT_RECORDER_ENTRIES), "TORCH_NCCL_DUMP_ON_TIMEOUT": "1",
                       "TORCH_FR_DUMP_TEMP_FILE": prefix, "TORCH_NCCL_DEBUG_INFO_TEMP_FILE": prefix}
    assert (tmp_path / "logs" / "flight-recorder").is_dir()
    environ = {"TORCH_NCCL_TRACE_BUFFER_SIZE": "0"}  # a user turned the recorder off (its older name): it stays off
    set_flight_recorder(CUDAAccelerator(), tmp_path / "logs", environ)
    assert "TORCH_FR_BUFFER_SIZE" not in environ and environ["TORCH_NCCL_TRACE_BUFFER_SIZE"] == "0"
    environ = {}
    set_flight_recorder(CPUAccelerator(), tmp_path / "logs", environ)  # gloo has no flight recorder to set
    assert environ == {}

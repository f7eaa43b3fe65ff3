"""How a command's process ends: a user's mistake as one `phalanx: error:` line and its exit code, then an
exit that skips the interpreter's teardown."""
from __future__ import annotations

import os
import sys
from collections.abc import Callable

from phalanx.errors import CheckpointError, ConfigError, DataError


def run_reporting_errors(body: Callable[[], int], say: Callable[[str], None] | None = None) -> int:
    """Run a command's body; a user's mistake becomes one `phalanx: error:` line (ConfigError: exit 2; data or
    checkpoint: exit 1), Ctrl-C exit 130. `say(line)` delivers the line (default: printed on stderr); a rank
    hands it to its launcher instead, which prints the first failing rank's line once (commands/rank.py)."""
    say = say or _print
    try:
        return body()
    except ConfigError as e:
        say(f"phalanx: error: {e}")
        return 2
    except (DataError, CheckpointError) as e:
        say(f"phalanx: error: {e}")
        return 1
    except KeyboardInterrupt:
        say("phalanx: interrupted")
        return 130


def _print(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def run_entry(body: Callable[[list[str]], int], loaded_at: float) -> None:
    """A process's entry point (`phalanx`, `python -m phalanx`, a spawned rank): `body(sys.argv[1:])`, then
    `leave`. `loaded_at`: when the entry's module was imported, before torch (where a `--budget` starts
    without /proc)."""
    from phalanx.train.budget import mark_entry  # imports torch: after the entry module stamped its load time
    mark_entry(loaded_at)  # a `--budget` counts from the command's start, `import torch` included
    from torch.distributed.elastic.multiprocessing.errors import record
    # `record` writes this rank's traceback where the elastic agent reports it as the root cause.
    leave(record(body)(sys.argv[1:]))


def leave(code: int | None) -> None:
    """End the process with `code`: everything Python's own exit runs for it (the atexit functions: logging's
    flush, multiprocessing's children), then `os._exit`, without the interpreter's teardown. Freeing torch's
    modules and libraries took ~1.1 s after every command on a 2-core AMD EPYC (~1 s on an H100 machine), which
    a user waits through for nothing and a `--budget` pays for. With a non-daemon thread still running, or an
    interpreter without `atexit._run_exitfuncs`, the usual exit instead."""
    import atexit
    import contextlib
    import threading
    run_exitfuncs = getattr(atexit, "_run_exitfuncs", None)
    others = [t for t in threading.enumerate() if t is not threading.current_thread() and not t.daemon]
    if run_exitfuncs is None or others or threading.current_thread() is not threading.main_thread():
        sys.exit(code)
    run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed or broken pipe: nothing more can reach it
            stream.flush()
    os._exit(code if isinstance(code, int) else 0 if code is None else 1)

import os
import signal

if os.environ.get("SLURM_JOB_ID"):
    # SLURM's warning (USR1) can come while torch is still being imported, and Python's default for USR1 ends the
    # process: it is noted instead, for runtime/slurm.py (catch_warning) to find.
    signal.signal(signal.SIGUSR1, lambda *_: os.environ.__setitem__("PHALANX_SLURM_WARNED", "1"))

from phalanx.commands import entry  # noqa: E402

entry()

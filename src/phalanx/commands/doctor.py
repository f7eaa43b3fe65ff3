"""`phalanx doctor`: check this machine before a long run (tools/doctor.py)."""
from __future__ import annotations

import json
import sys

from phalanx.commands.args import Command, Option, Parsed, Spec
from phalanx.tools import doctor as D


def doctor(p: Parsed) -> int:
    v = p.values
    report = D.run_checks(v.backend, v.cache_dir, v.out_dir)
    print(json.dumps(report, indent=1) if v.json else D.render(report), flush=True)
    for line in report["problems"]:
        print(f"phalanx doctor: problem: {line}", file=sys.stderr, flush=True)
    return 1 if report["problems"] else 0


DOCTOR = Spec("phalanx doctor [--json] [--backend gloo|nccl] [--cache_dir DIR] [--out_dir DIR]",
              D.__doc__.split(": ", 1)[1],
              options=(Option("json", "print the report as one JSON object", flag=True),
                       Option("backend", "check only this process-group backend, and require it", choices=D.BACKENDS),
                       Option("cache_dir", "the data cache to check (default: as `phalanx train` resolves it)",
                              default="", metavar="DIR"),
                       Option("out_dir", "the output folder to check (default: the config's out_dir)", default="",
                              metavar="DIR")))

COMMANDS = {"doctor": Command(DOCTOR, doctor)}

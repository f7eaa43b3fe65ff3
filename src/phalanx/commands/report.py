"""`phalanx report`: plots and one HTML page of one run, or of several compared."""
from __future__ import annotations

from pathlib import Path

from phalanx.commands.args import Command, Option, Parsed, Spec
from phalanx.tools.report import PNG_DIR, make_report


def report(p: Parsed) -> int:
    page = make_report([Path(x) for x in p.positional], Path(p.values.out) if p.values.out else None,
                       not p.values.no_eval)
    print(f"report: {page} (plots in {page.parent / PNG_DIR})", flush=True)
    return 0


REPORT = Spec("phalanx report RUN_DIR [RUN_DIR ...] [--out DIR] [--no-eval]", """Plots (PNG) and one static HTML page of a run: training loss and test accuracy against step and
wall time, test loss, learning rate, img/s (per rank where the logs hold it), the confusion matrix
and per-class accuracy of the final weights on the test split, with the resolved config, summary,
world size, precision, strategy and timings. Several runs: their curves overlaid, their configs'
differences and results side by side. A run still training, or stopped by preemption, shows what
it has so far and says so.""",
              options=(Option("out", "where report.html and report/*.png go (default: RUN_DIR for one run, "
                              "./report-<date>-<time> for several)", metavar="DIR"),
                       Option("no-eval", "skip the evaluation of the final weights (no confusion matrix)", flag=True)),
              positionals=(1, None))

COMMANDS = {"report": Command(REPORT, report)}

"""`phalanx report`: plots and one HTML page of one run, or of several compared."""
from __future__ import annotations

from pathlib import Path

from phalanx.commands.args import Command, Option, Parsed, Spec
from phalanx.errors import ConfigError
from phalanx.paths import check_destination
from phalanx.tools.report import PNG_DIR, make_report


def report(p: Parsed) -> int:
    # The folder report.html and report/ go into (one run's own by default): not a file, read-only or in /proc,
    # and no report.html there but an earlier report's.
    if p.values.out:
        check_destination(p.values.out, "--out", "choose another --out", folder=True)
        refuse_a_page_of_the_users(Path(p.values.out))
    elif len(p.positional) == 1 and Path(p.positional[0]).is_dir():
        check_destination(p.positional[0], "", "give a writable --out DIR", folder=True)
        refuse_a_page_of_the_users(Path(p.positional[0]))
    page = make_report([Path(x) for x in p.positional], Path(p.values.out) if p.values.out else None,
                       not p.values.no_eval)
    print(f"report: {page} (plots in {page.parent / PNG_DIR})", flush=True)
    return 0


def refuse_a_page_of_the_users(out: Path) -> None:
    """ConfigError when OUT/report.html exists and is not a page `phalanx report` made (its title says so), or
    when OUT/report is a file: the report replaces both."""
    page = out / "report.html"
    try:
        head = page.read_bytes()[:4096] if page.is_file() else None
    except OSError:
        head = b""
    if head is not None and b"<title>Phalanx report" not in head:
        raise ConfigError(f"--out {out}: holds a report.html that `phalanx report` did not write, which the report "
                          f"would replace; choose another --out, or move that file away first")
    if (out / PNG_DIR).exists() and not (out / PNG_DIR).is_dir():
        raise ConfigError(f"--out {out}: {out / PNG_DIR} is a file, where the report's plots go; choose another "
                          f"--out, or move that file away first")


REPORT = Spec("phalanx report RUN_DIR [RUN_DIR ...] [--out DIR] [--no-eval]", """Plots (PNG) and one static HTML page of a run: training loss and test accuracy against step and
wall time, test loss, learning rate, img/s (per rank where the logs hold it), the confusion matrix
and per-class accuracy of the final weights on the test split, with the resolved config, summary,
world size, precision, strategy and timings. Several runs: their curves overlaid, their configs'
differences and results side by side. A run still training, or stopped by preemption, shows what
it has so far and says so.""",
              options=(Option("out", "where report.html and report/*.png go (default: RUN_DIR for one run, "
                              "./report-<date>-<time> for several)", Path, metavar="DIR"),
                       Option("no-eval", "skip the evaluation of the final weights (no confusion matrix)", flag=True)),
              positionals=(1, None), paths=True)

COMMANDS = {"report": Command(REPORT, report)}

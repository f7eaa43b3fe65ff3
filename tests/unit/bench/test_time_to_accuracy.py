"""benchmarks/time_to_accuracy.py: every contender is timed to the plain reference's final accuracy."""
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]


def load():
    spec = importlib.util.spec_from_file_location("tta", ROOT / "benchmarks" / "time_to_accuracy.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def curve(*points):
    return [{"epoch": i + 1, "wall_s": t, "acc": a, "img_s": 1000.0} for i, (t, a) in enumerate(points)]


def test_contenders_are_timed_to_the_plain_references_median_final_accuracy():
    tta = load()
    runs_of = {
        # Plain finals 0.921, 0.925, 0.923: the median 0.923 is the target for everyone.
        "plain_pytorch": [curve((100, 0.90), (200, 0.921), (300, 0.921)),
                          curve((100, 0.91), (210, 0.923), (320, 0.925)),
                          curve((100, 0.91), (190, 0.920), (290, 0.923))],
        "phalanx": [curve((20, 0.915), (40, 0.9231), (60, 0.93)),
                    curve((22, 0.922), (44, 0.929)),
                    curve((30, 0.90), (60, 0.922), (90, 0.924))],
    }
    summaries = {n: [tta.summarize(c) for c in cs] for n, cs in runs_of.items()}
    results, curves, ref_final = tta.compare(summaries, runs_of)
    assert ref_final == 0.923
    assert [r["to_ref_final"] for r in results["plain_pytorch"]["runs"]] == [None, 210, 290]
    assert results["plain_pytorch"]["to_ref_final"] == 290  # the median with "never" counted as infinite
    assert [r["to_ref_final"] for r in results["phalanx"]["runs"]] == [40, 44, 90]
    assert results["phalanx"]["to_ref_final"] == 44
    assert results["phalanx"]["speedup_to_ref_final"] == round(290 / 44, 2)
    assert curves["phalanx"] == runs_of["phalanx"][1]  # the run whose time is the median one

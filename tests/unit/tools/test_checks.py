"""The checks of a config that need the models, the decoder or this machine (tools/checks.py): one line each,
naming the field, before anything is written; config.py itself knows none of them."""
import pytest

from phalanx import config as C
from phalanx.errors import ConfigError
from phalanx.tools.checks import checked_config


@pytest.mark.parametrize("key,value,needle", [
    ("nproc", "100000", "parallel.nproc='100000': more ranks than this node can usefully run"),
    ("threads_per_rank", "100000", "parallel.threads_per_rank=100000: must be at most"),
    ("stream_workers", "100000", "data.stream_workers=100000: must be at most"),
    ("model.name", "resnt18", "did you mean 'resnet18'"),
    ("data.size", "100000", "data.size=100000: a 100000x100000 image has more pixels than the decoder accepts"),
])
def test_what_this_machine_or_the_models_rule_out_is_one_clear_line(key, value, needle):
    C.build_config(None, [(key, value)])  # the config alone accepts it
    with pytest.raises(ConfigError) as e:
        checked_config(None, [(key, value)])
    assert needle in str(e.value)
    assert "\n" not in str(e.value)


def test_a_good_config_passes_the_checks_unchanged():
    cfg = C.build_config(None, [("nproc", "2")])
    assert checked_config(None, [("nproc", "2")]) == cfg

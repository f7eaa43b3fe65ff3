"""timm's models as `timm:NAME` (the dev extra installs timm; users add it with `pip install 'phalanx[timm]'`)."""
import pytest

from phalanx.errors import ConfigError
from phalanx.models import build_model, listing

from .test_zoo import _config, _last_stage_side

timm = pytest.importorskip("timm")  # the dev extra installs it; `phalanx[timm]` for users


def test_timm_model_by_name_with_the_store_channels_and_classes():
    cfg = _config("model.name=timm:resnet18", "model.small_input=true")
    net = build_model(cfg.model.name, 7, 1, 32, small_input=True)
    assert net.conv1.in_channels == 1 and net.get_classifier().out_features == 7
    assert _last_stage_side(net, net.layer4, 32, channels=1) == 4
    with pytest.raises(ConfigError, match=r"^model.name='timm:resnt18': timm .* has no model 'resnt18' \(did you "
                                          r"mean 'timm:resnet18'\?\)"):
        _config("model.name=timm:resnt18")
    with pytest.raises(ConfigError, match=r"^model.zero_init_residual=True: timm:convnext_atto has no zero_init_last"):
        _config("model.name=timm:convnext_atto", "model.zero_init_residual=true")
    assert any(line.startswith(f"timm {timm.__version__}: {len(timm.list_models())} models") for line in listing())
    assert "  timm:resnet50" in listing("resnet5*")


def test_timm_resnet_blocks_are_fsdp_shard_units():
    from phalanx.parallel.fsdp import shard_units
    units, what = shard_units(build_model("timm:resnet18", 10, 3, 32))
    assert what == "each residual block (8 BasicBlocks)" and type(units[0]).__module__ == "timm.models.resnet"

"""torchvision models by any name, the small-input stem, zero_init_residual, timm models, local pretrained
weights: what a user sees (shapes, weights, one-line refusals)."""
import logging

import pytest
import torch
from safetensors.torch import save_file

from phalanx import config as C
from phalanx.errors import ConfigError
from phalanx.models import build_model, listing, parameter_count
from phalanx.models.pretrained import load_pretrained
from phalanx.tools.checks import checked_config


@pytest.fixture(scope="module")
def resnet18():
    """torchvision's ResNet-18 as built for 32x32 RGB images of 10 classes, without the options (built once)."""
    return build_model("resnet18", 10, 3, 32)


def _config(*overrides: str) -> C.Config:
    return checked_config(None, [tuple(o.split("=", 1)) for o in overrides])


def _last_stage_side(net: torch.nn.Module, stage: torch.nn.Module, side: int, channels: int = 3) -> int:
    seen = []
    stage.register_forward_hook(lambda m, i, o: seen.append(o.shape[-1]))
    net.eval()(torch.zeros(1, channels, side, side))
    return seen[0]


def test_any_torchvision_classification_model_builds_by_name():
    # not in the curated list of `phalanx models`
    assert _config("model.name=shufflenet_v2_x0_5").model.name == "shufflenet_v2_x0_5"
    net = build_model("shufflenet_v2_x0_5", 7, 1, 32)
    assert net(torch.randn(2, 1, 32, 32)).shape == (2, 7)


def test_small_input_resnet18_keeps_a_4x4_map_at_the_last_stage_of_32x32_images(resnet18):
    plain = resnet18
    small = build_model("resnet18", 10, 3, 32, small_input=True)
    assert _last_stage_side(plain, plain.layer4, 32) == 1  # the ImageNet stem: 32 -> 8 before the first block
    assert _last_stage_side(small, small.layer4, 32) == 4
    assert (small.conv1.kernel_size, small.conv1.stride) == ((3, 3), (1, 1))
    assert isinstance(small.maxpool, torch.nn.Identity)
    assert small(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_small_input_mobilenet_and_grayscale_keep_a_2x2_map():
    net = build_model("mobilenet_v3_small", 10, 1, 32, small_input=True)  # wrapped: 1 channel repeated
    assert _last_stage_side(net, net.net.features, 32, channels=1) == 2  # 32 / 16, not 32 / 32


def test_small_input_and_zero_init_are_refused_in_one_line_where_the_model_has_none():
    with pytest.raises(ConfigError, match=r"^model.small_input=True: vit_b_16 \(vision_transformer\) has no "):
        _config("model.name=vit_b_16", "model.small_input=true")
    with pytest.raises(ConfigError, match=r"^model.zero_init_residual=True: convnext_tiny: only torchvision's "):
        _config("model.name=convnext_tiny", "model.zero_init_residual=true")
    with pytest.raises(ConfigError, match=r"^model.small_input=True: phalanx_cnn is built for small images"):
        _config("model.small_input=true")


def test_zero_init_residual_zeroes_the_last_norm_of_each_block(resnet18):
    on = build_model("resnet18", 10, 3, 32, zero_init_residual=True)
    assert all(float(b.bn2.weight.detach().abs().sum()) == 0 for layer in (on.layer1, on.layer4) for b in layer)
    assert all(bool((b.bn2.weight == 1).all()) for b in resnet18.layer1)  # off: torchvision's ones


def test_unknown_model_and_too_small_images_are_one_line():
    with pytest.raises(ConfigError, match=r"^model.name='resnet51': unknown model \(did you mean 'resnet50'\?\)"):
        _config("model.name=resnet51")
    with pytest.raises(ConfigError, match=r"^model.name='alexnet': does not take 28x28 images \(RuntimeError: "):
        build_model("alexnet", 10, 1, 28)


def test_pretrained_weights_load_with_a_reinitialised_head(tmp_path, caplog):
    torch.manual_seed(1)
    source = build_model("mobilenet_v3_small", 1000, 3, 64)  # an "ImageNet" model, as a user would save it
    path = tmp_path / "mnv3.safetensors"
    # as some published files are: without BatchNorm's step counters
    save_file({k: v.contiguous() for k, v in source.state_dict().items() if "num_batches_tracked" not in k}, path)
    torch.manual_seed(2)
    net = build_model("mobilenet_v3_small", 10, 1, 64)  # grayscale: held as `net.` inside the adapter
    fresh_head = net.net.classifier[3].weight.clone()
    with caplog.at_level(logging.INFO, logger="phalanx"):
        got = load_pretrained(net, str(path), 10)
    assert got["reinitialised"] == ["net.classifier.3.bias", "net.classifier.3.weight"]
    assert torch.equal(net.net.features[0][0].weight, source.features[0][0].weight)
    assert torch.equal(net.net.classifier[0].weight, source.classifier[0].weight)
    assert torch.equal(net.net.classifier[3].weight, fresh_head)
    assert "has 1000 classes in mnv3.safetensors, 10 here: re-initialised" in caplog.text


def test_pretrained_file_that_does_not_fit_is_one_line_naming_file_and_key(tmp_path, resnet18):
    net = resnet18  # every refusal comes before anything is loaded into it
    other = tmp_path / "cnn.safetensors"
    save_file(build_model("phalanx_cnn", 10, 3, 32).state_dict(), other)
    with pytest.raises(ConfigError, match=r"^model.pretrained='.*cnn.safetensors': has no tensor 'conv1.weight' "):
        load_pretrained(net, str(other), 10)
    wide = tmp_path / "wide.safetensors"
    sd = {k: v.clone() for k, v in net.state_dict().items()}
    sd["layer1.0.conv1.weight"] = torch.zeros(32, 64, 3, 3)
    save_file(sd, wide)
    with pytest.raises(ConfigError, match=r"'layer1.0.conv1.weight' has shape \[32, 64, 3, 3\] in the file"):
        load_pretrained(net, str(wide), 10)
    extra = tmp_path / "extra.safetensors"
    save_file(dict(net.state_dict(), **{"aux.weight": torch.zeros(1)}), extra)
    with pytest.raises(ConfigError, match=r"holds 'aux.weight', which this model does not have"):
        load_pretrained(net, str(extra), 10)
    text = tmp_path / "notes.safetensors"
    text.write_text("not weights")
    with pytest.raises(ConfigError, match=r"^model.pretrained='.*notes.safetensors': not a safetensors file"):
        load_pretrained(net, str(text), 10)
    with pytest.raises(ConfigError, match=r"^model.pretrained='.*missing.safetensors': no such file"):
        _config("model.name=resnet18", f"model.pretrained={tmp_path / 'missing.safetensors'}")


def test_parameter_counts_are_those_of_the_built_model(resnet18):
    assert parameter_count("resnet18") == sum(p.numel() for p in resnet18.parameters()) == 11_181_642
    lines = listing("resnet5*")
    assert "  resnet50" in lines and "  resnext50_32x4d" not in lines


@pytest.mark.slow  # a training run in this process (~4 s); the loader itself is tested above in the fast lane
def test_training_starts_from_pretrained_weights_instead_of_whitening(tiny_run, tmp_path):
    from safetensors.torch import load_file

    from phalanx.commands import main
    root, run_dir = tiny_run.parent, tmp_path / "run"
    assert main(["train", "--data", str(root / "idx"), "--data.cache_dir", str(root / "cache"), "--nproc", "1",
                 "--epochs", "1", "--max_steps", "1", "--global_batch", "32", "--model.width", "8", "--ema", "0",
                 "--optim.lr", "1e-9", "--progress", "false", "--ckpt.at_epoch_end", "false", "--tune", "false",
                 "--log.tensorboard", "false", "--model.pretrained", str(tiny_run / "model.safetensors"),
                 "--run_dir", str(run_dir)]) == 0
    before, after = load_file(tiny_run / "model.safetensors"), load_file(run_dir / "model.safetensors")
    log = (run_dir / "logs" / "rank-0.log").read_text()
    assert f"model.pretrained: loaded {len(before)} tensors from {tiny_run / 'model.safetensors'}" in log
    # one step at lr 1e-9 moves no weight visibly: the stem is the file's, not a whitening of these images
    torch.testing.assert_close(after["stem.0.weight"], before["stem.0.weight"], rtol=0, atol=1e-6)
    torch.testing.assert_close(after["head.weight"], before["head.weight"], rtol=0, atol=1e-6)

import pytest
import torch

from phalanx.models import MODELS, build_model


@pytest.mark.parametrize("name", ["mnist_net", "phalanx_cnn", "phalanx_resnet"])
@pytest.mark.parametrize("channels,size", [(1, 28), (3, 32)])
def test_house_models_output_logits_per_class(name, channels, size):
    m = build_model(name, 10, channels, size, width=16)
    out = m(torch.randn(4, channels, size, size))
    assert out.shape == (4, 10)
    assert torch.isfinite(out).all()


def test_reference_model_matches_pytorch_examples_parameter_count():
    # pytorch/examples mnist Net: 1,199,882 parameters
    m = build_model("mnist_net", 10, 1, 28)
    assert sum(p.numel() for p in m.parameters()) == 1_199_882


def test_torchvision_adapter_takes_grayscale():
    m = build_model("resnet18", 7, 1, 32)
    assert m(torch.randn(2, 1, 32, 32)).shape == (2, 7)


def test_registry_lists_reference_and_house_models():
    assert {"mnist_net", "phalanx_cnn", "phalanx_resnet", "resnet18"} <= set(MODELS)

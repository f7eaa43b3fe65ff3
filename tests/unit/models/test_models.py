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


@pytest.mark.parametrize("name", ["phalanx_cnn", "phalanx_resnet"])
def test_house_cnns_pool_the_same_maxima_in_training_and_in_the_graph_that_export_traces(name):
    """The global max-pool is adaptive_max_pool2d in training and amax in eval mode (torch 2.11's ONNX
    exporter cannot translate the first): the eval-mode graph must not hold it, and both give one answer."""
    from phalanx.models.cnn import global_max_pool
    x = torch.randn(3, 5, 7, 6)
    assert torch.equal(global_max_pool(x, True), global_max_pool(x, False))
    assert torch.equal(global_max_pool(x, False), torch.nn.functional.adaptive_max_pool2d(x, 1))
    m = build_model(name, 10, 1, 28, width=8).eval()
    ops = {str(n.target) for n in torch.export.export(m, (torch.randn(2, 1, 28, 28),)).graph.nodes
           if n.op == "call_function"}
    assert not any("adaptive_max_pool2d" in op for op in ops), ops
    assert any("amax" in op for op in ops), ops
    batch = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        eval_out = m(batch)
        m.train()
        for mod in m.modules():  # training's pooling, with evaluation's norm statistics
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.eval()
        assert torch.equal(m(batch), eval_out)

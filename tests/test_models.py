"""Model factory: timm names, the CIFAR WideResNets, clear errors for unknown names."""

import pytest
import torch

from apr.models import ModelError, WideResNet, create_model


@pytest.mark.parametrize("name", ["cnn_tiny", "wrn16_2", "resnet10t"])
def test_models_classify_32px_batches(name):
    model = create_model(name, 7).eval()
    with torch.no_grad():
        out = model(torch.rand(2, 3, 32, 32).contiguous(memory_format=torch.channels_last))
    assert out.shape == (2, 7) and torch.isfinite(out).all()


def test_wrn40_2_has_the_published_size():
    # WRN-40-2 for CIFAR-10 has about 2.2 M parameters (Zagoruyko & Komodakis 2016, Table 1)
    params = sum(p.numel() for p in create_model("wrn40_2", 10).parameters())
    assert 2.1e6 < params < 2.3e6


def test_resnet50_is_the_standard_architecture():
    params = sum(p.numel() for p in create_model("resnet50", 1000).parameters())
    assert params == 25_557_032  # torchvision / timm resnet50


def test_unknown_names_and_bad_shapes_are_clear_errors():
    with pytest.raises(ModelError, match="unknown model 'resnet5O'"):
        create_model("resnet5O", 10)
    with pytest.raises(ModelError, match="depth must be 6n\\+4"):
        WideResNet(41, 2, 10)
    with pytest.raises(ModelError, match="num_classes must be >= 1"):
        create_model("cnn_tiny", 0)

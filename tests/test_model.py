import pytest
import torch
from torch import nn

from cookbook.config import ModelConfig
from cookbook.model import build_model, parameter_count
from cookbook.resources import parameter_estimate


def test_seed_architecture_parameter_counts():
    # conv 1->32, 32->64, 64->128 (3x3) + linear 128->10; BatchNorm/GroupNorm add 2 per channel.
    plain = 320 + 18496 + 73856 + 1290
    assert parameter_count(build_model(ModelConfig(norm="none"))) == plain
    assert parameter_count(build_model(ModelConfig(norm="batch"))) == plain + 2 * (32 + 64 + 128)
    assert parameter_count(build_model(ModelConfig(norm="layer"))) == plain + 2 * (32 + 64 + 128)


def test_norm_kinds():
    layer = build_model(ModelConfig(norm="layer"))
    assert all(m.num_groups == 1 for m in layer.modules() if isinstance(m, nn.GroupNorm))
    assert sum(isinstance(m, nn.BatchNorm2d) for m in build_model(ModelConfig(norm="batch")).modules()) == 3
    assert not any(isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)) for m in build_model(ModelConfig()).modules())


def test_width_and_depth_change_size_and_still_classify():
    sizes = [parameter_count(build_model(ModelConfig(width=w, depth=d))) for w, d in [(0.5, 3), (1, 3), (2, 3), (1, 4)]]
    assert sizes[0] < sizes[1] < sizes[2] and sizes[3] > sizes[1]
    for depth in range(1, 6):
        assert build_model(ModelConfig(depth=depth))(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


def test_he_and_xavier_init_statistics():
    torch.manual_seed(0)
    model = build_model(ModelConfig(width=4))
    conv = model.features[4]  # 128 -> 256 channels, fan_out = 256 * 9
    std = conv.weight.std().item()
    assert abs(std - (2 / (conv.out_channels * 9)) ** 0.5) / std < 0.02
    lin = model.classifier
    assert abs(lin.weight.std().item() - (2 / (lin.in_features + lin.out_features)) ** 0.5) < 0.01
    assert torch.all(lin.bias == 0)
    torch.manual_seed(0)
    default = build_model(ModelConfig(width=4, init="default"))
    assert not torch.all(default.classifier.bias == 0)


@pytest.mark.parametrize("norm,width,depth", [("none", 1.0, 3), ("batch", 0.25, 3), ("layer", 1.25, 5), ("batch", 4.0, 1)])
def test_parameter_estimate_is_the_built_models_count(norm, width, depth):
    cfg = ModelConfig(norm=norm, width=width, depth=depth)
    assert parameter_estimate(cfg) == parameter_count(build_model(cfg))

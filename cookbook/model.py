"""StableNet: the seed's small CNN with configurable norm, width, depth and init."""
from __future__ import annotations

import torch
from torch import nn

from .config import ModelConfig

BASE_CHANNELS = (32, 64, 128)  # the seed's widths; blocks past the third keep the last one


def make_norm(kind: str, channels: int) -> nn.Module:
    """BatchNorm2d, GroupNorm(1, C) (the seed's 'LayerNorm' for conv maps) or identity."""
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "layer":
        return nn.GroupNorm(1, channels)
    return nn.Identity()


def block_channels(width: float, depth: int) -> list[int]:
    """Output channels of each conv block."""
    return [max(1, round(BASE_CHANNELS[min(i, 2)] * width)) for i in range(depth)]


class GlobalAvgPool(nn.Module):
    """Mean over height and width: AdaptiveAvgPool2d(1)'s maths, whose CUDA backward has no deterministic kernel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean((2, 3), keepdim=True)


class StableNet(nn.Module):
    """conv-norm-ReLU blocks with max-pool between them, global average pool, linear classifier.

    The pool runs before the ReLU: max-pool and ReLU commute exactly (both monotone), and the
    ReLU then touches a quarter of the values (the seed's order, ReLU first, costs ~25% more time).
    """

    def __init__(self, norm: str = "none", width: float = 1.0, depth: int = 3, in_channels: int = 1, classes: int = 10):
        super().__init__()
        layers: list[nn.Module] = []
        channels = block_channels(width, depth)
        for i, out in enumerate(channels):
            layers += [nn.Conv2d(in_channels, out, 3, padding=1), make_norm(norm, out)]
            if i < depth - 1:
                layers.append(nn.MaxPool2d(2))
            layers.append(nn.ReLU(inplace=True))
            in_channels = out
        layers.append(GlobalAvgPool())
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(in_channels, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


def init_weights(model: nn.Module, scheme: str) -> None:
    """The seed's init: He (fan_out, relu) for conv weights, Xavier-normal + zero bias for linear; 'default' keeps PyTorch's."""
    if scheme == "default":
        return
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.Linear):
            nn.init.xavier_normal_(m.weight)
            nn.init.zeros_(m.bias)


def build_model(cfg: ModelConfig) -> StableNet:
    """StableNet with cfg's norm, size and init."""
    model = StableNet(norm=cfg.norm, width=cfg.width, depth=cfg.depth)
    init_weights(model, cfg.init)
    return model


def parameter_count(model: nn.Module) -> int:
    """Number of trainable scalars."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)

"""Model factory: timm names for ImageNet nets, plus the CIFAR WideResNets timm does not ship.

The APR paper trains ResNet-50 on ImageNet (timm ``resnet50``, same architecture as
torchvision's) and WRN-40-2 on CIFAR. No weights are ever downloaded: models start from
scratch, as in the paper.
"""

from __future__ import annotations

from apr.errors import UserError
import re

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["create_model", "WideResNet", "TinyCNN", "list_local_models", "ModelError"]


class ModelError(UserError, ValueError):
    """A model name or shape that cannot be built."""


class _WideBasic(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int, drop_rate: float):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.drop_rate = drop_rate
        self.shortcut = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        shortcut = x if self.shortcut is None else self.shortcut(out)
        out = self.conv1(out)
        out = F.relu(self.bn2(out))
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        return self.conv2(out) + shortcut


class WideResNet(nn.Module):
    """WRN-depth-k for 32x32 inputs (Zagoruyko & Komodakis), pre-activation blocks."""

    def __init__(self, depth: int, widen_factor: int, num_classes: int, drop_rate: float = 0.0):
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ModelError(f"WideResNet depth must be 6n+4 (e.g. 16, 28, 40), got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(3, widths[0], 3, padding=1, bias=False)
        layers, in_planes = [], widths[0]
        for stage, stride in zip(range(1, 4), (1, 2, 2)):
            for block in range(n):
                layers.append(_WideBasic(in_planes, widths[stage], stride if block == 0 else 1, drop_rate))
                in_planes = widths[stage]
        self.blocks = nn.Sequential(*layers)
        self.bn = nn.BatchNorm2d(in_planes)
        self.fc = nn.Linear(in_planes, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn(self.blocks(self.conv1(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))


class TinyCNN(nn.Module):
    """A few-thousand-parameter conv net: fast enough for tests and the CPU demo."""

    def __init__(self, num_classes: int, width: int = 16, drop_rate: float = 0.0):
        super().__init__()

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
                                 nn.ReLU(inplace=True))

        self.features = nn.Sequential(
            block(3, width), nn.MaxPool2d(2), block(width, 2 * width), nn.MaxPool2d(2),
            block(2 * width, 4 * width),
        )
        self.drop = nn.Dropout(drop_rate) if drop_rate > 0 else nn.Identity()
        self.fc = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1)
        return self.fc(self.drop(x))


_WRN = re.compile(r"^wrn(\d+)_(\d+)$")


def list_local_models() -> list[str]:
    return ["cnn_tiny", "cnn_small", "wrn16_2", "wrn28_10", "wrn40_2", "wrn<depth>_<k>"]


def create_model(name: str, num_classes: int, drop_rate: float = 0.0) -> nn.Module:
    """Build a freshly initialised classifier by name (never downloads weights)."""
    if num_classes < 1:
        raise ModelError(f"num_classes must be >= 1, got {num_classes}")
    if name == "cnn_tiny":
        return TinyCNN(num_classes, width=16, drop_rate=drop_rate)
    if name == "cnn_small":
        return TinyCNN(num_classes, width=32, drop_rate=drop_rate)
    match = _WRN.match(name)
    if match:
        return WideResNet(int(match.group(1)), int(match.group(2)), num_classes, drop_rate)
    import timm

    if not timm.is_model(name):
        raise ModelError(
            f"unknown model {name!r}: use a timm model name (e.g. resnet50, resnet18, resnet10t) "
            f"or one of {', '.join(list_local_models())}"
        )
    return timm.create_model(name, pretrained=False, num_classes=num_classes, drop_rate=drop_rate)

"""CIFAR VGGs with BatchNorm: 3x3 convs in `features` (32x32 -> 512x1x1) and a 512-512-classes head.

This is the layout behind the VGG-16 CIFAR baseline of 313.73M MACs; no dropout,
so the module list matches what FLOP counters and pruners see. ``vgg16_cdp``
is the CDP authors' VGG-16 (convs without bias, the last max-pool replaced by
a 2x2 average pool, a 512-classes head), so their published weights load.
"""
from __future__ import annotations

from typing import Sequence, Union

import torch
from torch import nn

CFGS: dict[str, list[Union[int, str]]] = {
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg13": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    "vgg19": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M",
              512, 512, 512, 512, "M", 512, 512, 512, 512, "M"],
}


class CifarVGG(nn.Module):
    """VGG for 32x32 inputs: conv-BN-ReLU stacks with 2x2 max-pools, then three linear layers."""

    def __init__(self, cfg: Sequence[Union[int, str]], num_classes: int = 10, conv_bias: bool = True,
                 hidden: Sequence[int] = (512, 512)) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        in_channels = 3
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            elif v == "A":
                layers.append(nn.AvgPool2d(2))
            else:
                layers += [nn.Conv2d(in_channels, int(v), 3, padding=1, bias=conv_bias),
                           nn.BatchNorm2d(int(v)), nn.ReLU(inplace=True)]
                in_channels = int(v)
        self.features = nn.Sequential(*layers)
        head: list[nn.Module] = []
        for width in hidden:
            head += [nn.Linear(in_channels, width), nn.ReLU(inplace=True)]
            in_channels = width
        self.classifier = nn.Sequential(*head, nn.Linear(in_channels, num_classes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


def cifar_vgg(name: str, num_classes: int = 10) -> CifarVGG:
    """Build `vgg11`, `vgg13`, `vgg16`, `vgg19` or the CDP authors' `vgg16_cdp` for CIFAR-sized inputs."""
    if name == "vgg16_cdp":
        return CifarVGG([*CFGS["vgg16"][:-1], "A"], num_classes, conv_bias=False, hidden=(512,))
    if name not in CFGS:
        raise ValueError(f"unknown CIFAR VGG {name!r}; expected one of {sorted(CFGS) + ['vgg16_cdp']}")
    return CifarVGG(CFGS[name], num_classes)

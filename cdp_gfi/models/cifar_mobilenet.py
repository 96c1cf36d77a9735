"""MobileNetV2 for 32x32 images: torchvision's blocks with the stem and second stage kept at full resolution.

As in the CIFAR MobileNetV2 of the CDP authors' repository (and kuangliu's
pytorch-cifar): stride 1 in the stem and in the 24-channel stage, so a 32x32
image reaches the last stage at 4x4.
"""
from __future__ import annotations

from torch import nn
from torchvision.models import MobileNetV2

# t (expansion), c (channels), n (blocks), s (stride of the first block)
CIFAR_SETTING = [[1, 16, 1, 1], [6, 24, 2, 1], [6, 32, 3, 2], [6, 64, 4, 2],
                 [6, 96, 3, 1], [6, 160, 3, 2], [6, 320, 1, 1]]


def cifar_mobilenet_v2(num_classes: int = 10, width_mult: float = 1.0) -> nn.Module:
    """MobileNetV2 (torchvision's module layout) for 32x32 inputs."""
    model = MobileNetV2(num_classes=num_classes, width_mult=width_mult, inverted_residual_setting=CIFAR_SETTING)
    model.features[0][0].stride = (1, 1)
    return model

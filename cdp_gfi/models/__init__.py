"""Model zoo for the pruning experiments: CIFAR ResNets/VGGs/MobileNetV2 for 32x32 data, torchvision CNNs for ImageNet.

The dataset picks the architecture family: every 32x32 dataset gets the CIFAR
layouts, `imagenet` gets torchvision's (so its checkpoints load strictly), or
any timm model as ``timm:NAME`` when timm is installed (it is not a dependency).
"""
from __future__ import annotations

from typing import Optional

import torchvision
from torch import nn

from .cifar_mobilenet import cifar_mobilenet_v2
from .cifar_resnet import BasicBlock, CifarResNet, PadShortcut, cifar_resnet
from .cifar_vgg import CifarVGG, cifar_vgg

# dataset -> (classes, input height/width)
_DATASET_SPECS: dict[str, tuple[int, int]] = {
    "cifar10": (10, 32),
    "cifar100": (100, 32),
    "digits": (10, 32),
    "imagenet": (1000, 224),
}
DATASETS: tuple[str, ...] = tuple(_DATASET_SPECS)

CIFAR_MODELS: tuple[str, ...] = ("resnet20", "resnet32", "resnet44", "resnet56", "resnet110",
                                 "vgg11", "vgg13", "vgg16", "vgg19", "vgg16_cdp", "mobilenet_v2")
_NOT_CNNS = ("vit_", "swin_", "maxvit_")  # torchvision's transformer classifiers
# every torchvision classification CNN by its torchvision.models name; plain vggNN builds vggNN_bn
IMAGENET_MODELS: tuple[str, ...] = tuple(
    n for n in torchvision.models.list_models(module=torchvision.models) if not n.startswith(_NOT_CNNS))
MODEL_NAMES: tuple[str, ...] = tuple(dict.fromkeys(CIFAR_MODELS + IMAGENET_MODELS))
# Built as torchvision builds them for its own weights (inputs re-normalised inside the network), but without
# the auxiliary classifiers: they only run in training, so the eval-mode graph cannot prune them in step.
_GOOGLE_NETS = {"googlenet": {"aux_logits": False, "transform_input": True, "init_weights": True},
                "inception_v3": {"aux_logits": False, "transform_input": True, "init_weights": True}}

TIMM_PREFIX = "timm:"

__all__ = [
    "BasicBlock", "CifarResNet", "CifarVGG", "PadShortcut", "CIFAR_MODELS", "DATASETS",
    "IMAGENET_MODELS", "MODEL_NAMES", "TIMM_PREFIX", "build_model", "check_model_name", "input_size_for",
    "models_for", "num_classes_for",
]


def _spec(dataset: str) -> tuple[int, int]:
    if dataset not in _DATASET_SPECS:
        raise ValueError(f"unknown dataset {dataset!r}; expected one of {list(DATASETS)}")
    return _DATASET_SPECS[dataset]


def num_classes_for(dataset: str) -> int:
    """Number of classes of a known dataset."""
    return _spec(dataset)[0]


def input_size_for(dataset: str) -> tuple[int, int, int]:
    """Input shape (3, H, W) that a dataset's models expect."""
    size = _spec(dataset)[1]
    return (3, size, size)


def models_for(dataset: str) -> tuple[str, ...]:
    """Model names that can be built for a dataset (CIFAR layouts for 32x32 data, torchvision for ImageNet)."""
    return CIFAR_MODELS if input_size_for(dataset)[1] == 32 else IMAGENET_MODELS


def check_model_name(name: str, dataset: str) -> str:
    """``name`` if ``build_model`` can build it for ``dataset``, else a ValueError that says what can."""
    if name.startswith(TIMM_PREFIX) and input_size_for(dataset)[1] != 32:
        _timm_factory(name)
        return name
    valid = models_for(dataset)
    if name not in valid:
        timm = f", or {TIMM_PREFIX}NAME for a timm model" if valid is IMAGENET_MODELS else ""
        raise ValueError(f"unknown model {name!r} for dataset {dataset!r}; expected one of {list(valid)}{timm}")
    return name


def _timm_factory(name: str):
    """timm's ``create_model`` for ``timm:NAME``, refused clearly when timm or the name is missing."""
    try:
        import timm
    except ImportError as exc:
        raise ValueError(f"--model {name} needs the timm package (pip install timm); cdp_gfi does not depend "
                         "on it") from exc
    arch = name[len(TIMM_PREFIX):]
    if not timm.is_model(arch):
        raise ValueError(f"unknown timm model {arch!r} (timm {timm.__version__}; see timm.list_models())")
    return lambda num_classes: timm.create_model(arch, pretrained=False, num_classes=num_classes)


def build_model(name: str, dataset: str, num_classes: Optional[int] = None) -> nn.Module:
    """Build an untrained model `name` for `dataset`; `num_classes` overrides the dataset's class count."""
    check_model_name(name, dataset)
    if num_classes is None:
        num_classes = num_classes_for(dataset)
    elif isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    if name.startswith(TIMM_PREFIX):
        return _timm_factory(name)(num_classes)
    if models_for(dataset) is IMAGENET_MODELS:
        plain_vgg = name.startswith("vgg") and not name.endswith("_bn")
        factory = getattr(torchvision.models, f"{name}_bn" if plain_vgg else name)
        return factory(weights=None, num_classes=num_classes, **_GOOGLE_NETS.get(name, {}))
    if name == "mobilenet_v2":
        return cifar_mobilenet_v2(num_classes)
    if name.startswith("resnet"):
        return cifar_resnet(int(name[len("resnet"):]), num_classes)
    return cifar_vgg(name, num_classes)

"""Load published checkpoints whatever their key layout, and still strictly.

People bring weights saved by other code: nested under ``state_dict``,
``model`` or ``net``, with DataParallel's ``module.`` prefix, from an old
torch without BatchNorm's ``num_batches_tracked``, and with their own module
names. Known layouts are recognised from their keys and renamed onto our
modules; the load that follows is strict (every tensor used, every shape
equal, nothing missing), and a mismatch is one error naming the layout tried
and what differs. Never a silent partial load.
"""
from __future__ import annotations

import os
import re
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Sequence, Tuple

import torch
from torch import Tensor, nn

from .checkpoint import CheckpointMismatchError, extract_state_dict, load_checkpoint, unwrap_model

_SHOWN = 4
AUXILIARY_HEADS = ("aux1", "aux2", "AuxLogits")  # GoogLeNet's and Inception-v3's training-only classifiers


@dataclass(frozen=True)
class Layout:
    """A family of checkpoints: how to recognise its keys and rename them onto our modules."""

    name: str
    description: str
    recognise: Callable[[Sequence[str]], bool]
    rename: Callable[[str, nn.Module], str]


def _substitute(rules: Sequence[Tuple[str, str]]) -> Callable[[str, nn.Module], str]:
    compiled = [(re.compile(p), r) for p, r in rules]

    def rename(key: str, _model: nn.Module) -> str:
        for pattern, repl in compiled:
            key = pattern.sub(repl, key)
        return key
    return rename


def _cdp_vgg_rename(key: str, model: nn.Module) -> str:
    """``feature.conv_i`` / ``feature.bn_i`` -> the i-th conv / BN in our ``features``; the head keeps its indices."""
    match = re.match(r"feature\.(conv|bn)_(\d+)\.(.+)$", key)
    if not match:
        return key
    kind, i, rest = match.group(1), int(match.group(2)), match.group(3)
    wanted = nn.Conv2d if kind == "conv" else nn.BatchNorm2d
    features = getattr(model, "features", None)
    found = [n for n, m in (features.named_children() if features is not None else []) if isinstance(m, wanted)]
    return f"features.{found[i - 1]}.{rest}" if 0 < i <= len(found) else key


LAYOUTS: Tuple[Layout, ...] = (
    Layout("pytorch_resnet_cifar10", "akamaster's CIFAR ResNets (classifier 'linear')",
           lambda keys: "linear.weight" in keys and "layer1.0.conv1.weight" in keys,
           _substitute([(r"^linear\.", "fc.")])),
    Layout("cdp-resnet-cifar", "the CDP authors' nets/resnet_cifar.py (conv_bn, layerN.block_i.conv_bnJ, linear)",
           lambda keys: "conv_bn.conv.weight" in keys,
           _substitute([(r"^conv_bn\.conv\.", "conv1."), (r"^conv_bn\.bn\.", "bn1."),
                        (r"\.block_(\d+)\.", r".\1."), (r"\.conv_bn(\d)\.conv\.", r".conv\1."),
                        (r"\.conv_bn(\d)\.bn\.", r".bn\1."), (r"^linear\.", "fc.")])),
    Layout("cdp-vgg-cifar", "the CDP authors' nets/vgg.py (feature.conv_i, feature.bn_i; build --model vgg16_cdp)",
           lambda keys: "feature.conv_1.weight" in keys, _cdp_vgg_rename),
    Layout("cdp_gfi", "this package's (and torchvision's) own module names", lambda keys: True,
           lambda key, _model: key),
)


def _state_dict_of(obj: Any) -> Dict[str, Tensor]:
    """The tensors of a loaded checkpoint: bare, or nested under state_dict / model / net; wrapper prefixes gone."""
    while isinstance(obj, Mapping) and isinstance(obj.get("net"), Mapping) and "state_dict" not in obj:
        obj = obj["net"]
    return dict(extract_state_dict(obj))


def _with_batch_counters(mapped: Dict[str, Tensor], expected: Mapping[str, Tensor]) -> Dict[str, Tensor]:
    """Add ``num_batches_tracked`` for BatchNorms saved by a torch that had none (their other buffers present)."""
    out = dict(mapped)
    for key, value in expected.items():
        if key.endswith(".num_batches_tracked") and key not in out:
            if f"{key[:-len('num_batches_tracked')]}running_mean" in out:
                out[key] = torch.zeros_like(value)
    return out


def _problems(mapped: Mapping[str, Tensor], expected: Mapping[str, Tensor]) -> List[str]:
    """What keeps ``mapped`` from loading strictly: unused, missing and mis-shaped tensors."""
    unused = [k for k in mapped if k not in expected]
    missing = [k for k in expected if k not in mapped]
    shapes = [f"{k} {tuple(v.shape)} in file vs {tuple(expected[k].shape)} in model"
              for k, v in mapped.items() if k in expected and v.shape != expected[k].shape]
    out = []
    for title, items in (("shape differs", shapes), ("unused in file", unused), ("missing from file", missing)):
        if items:
            more = f" and {len(items) - _SHOWN} more" if len(items) > _SHOWN else ""
            out.append(f"{len(items)} {title}: {', '.join(items[:_SHOWN])}{more}")
    return out


def map_state_dict(model: nn.Module, state_dict: Mapping[str, Tensor]) -> Tuple[Layout, Dict[str, Tensor], List[str]]:
    """(layout, renamed tensors, problems) for the known layout that fits ``state_dict`` best (no problems if it loads)."""
    target = unwrap_model(model)
    expected = target.state_dict()
    keys = list(state_dict)
    best = None
    for layout in LAYOUTS:
        if not layout.recognise(keys):
            continue
        renamed = {layout.rename(k, target): v for k, v in state_dict.items()}
        mapped = _with_batch_counters(renamed, expected)
        problems = _problems(mapped, expected) if len(renamed) == len(state_dict) else \
            [f"layout {layout.name} maps two file tensors onto one model key"]
        if best is None or len(problems) < len(best[2]):
            best = (layout, mapped, problems)
        if not problems:
            break
    return best


def _without_auxiliary_heads(state_dict: Dict[str, Tensor], model: nn.Module, what: str) -> Dict[str, Tensor]:
    """The file's tensors less those of auxiliary classifiers the model is built without (named in a warning)."""
    dropped = sorted({k.split(".")[0] for k in state_dict
                      if k.split(".")[0] in AUXILIARY_HEADS and getattr(model, k.split(".")[0], "") is None})
    if dropped:
        warnings.warn(f"{what}: left out the auxiliary classifiers {', '.join(dropped)} (training-only heads "
                      "that cdp_gfi's networks are built without)", stacklevel=3)
    return {k: v for k, v in state_dict.items() if k.split(".")[0] not in dropped}


def load_pretrained(model: nn.Module, source: Any, what: str = "pretrained checkpoint") -> str:
    """Load published weights (a path or a loaded object) into ``model`` strictly; returns the layout name.

    Raises CheckpointMismatchError naming the file, the layout tried and what
    differs, before any weight of ``model`` changes. The one thing left out
    is an auxiliary classifier (GoogLeNet, Inception-v3) the model was built
    without, with a warning.
    """
    if isinstance(source, (str, os.PathLike)):
        what = f"{what} {str(source)!r}"
        source = load_checkpoint(source)
    target = unwrap_model(model)
    state_dict = _without_auxiliary_heads(_state_dict_of(source), target, what)
    layout, mapped, problems = map_state_dict(model, state_dict)
    if problems:
        known = ", ".join(lay.name for lay in LAYOUTS)
        raise CheckpointMismatchError(
            f"{what} does not fit {type(target).__name__} (tried layout {layout.name}: {layout.description}; "
            f"known layouts: {known}): " + "; ".join(problems))
    target.load_state_dict(mapped, strict=True)
    return layout.name

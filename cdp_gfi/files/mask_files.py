"""Masks as files store: per conv, the kept filter indices and the filter count; NNI masks are rebuilt on load.

A weight-shaped 0/1 mask per conv (NNI's format) made ``masks.pth`` of
ResNet-18 63 MB, more than its 45 MB of weights; kept indices are a few KB.
The stored form is ``{conv: {"kept": int64 indices, ascending, "filters": int}}``.
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Union

import torch
from torch import nn

Masks = Dict[str, Dict[str, Optional[torch.Tensor]]]
CompactMasks = Dict[str, Dict[str, Any]]


class MaskFileError(ValueError):
    """Stored masks are malformed or do not fit the model they are rebuilt on."""


def compact_masks(masks: Masks) -> CompactMasks:
    """NNI masks as kept filter indices per conv (a filter is kept if any of its weights is)."""
    out = {}
    for name, entry in masks.items():
        weight = entry.get("weight") if isinstance(entry, Mapping) else None
        if not torch.is_tensor(weight) or weight.dim() != 4:
            raise MaskFileError(f"{name}: not a conv mask (expected a 4-D 'weight' tensor)")
        kept = weight.detach().reshape(weight.shape[0], -1).ne(0).any(dim=1).cpu()
        out[name] = {"kept": torch.nonzero(kept).flatten().to(torch.int64), "filters": int(weight.shape[0])}
    return out


def kept_vectors(compact: CompactMasks, source: str = "masks") -> Dict[str, torch.Tensor]:
    """Boolean kept-filter vectors per conv from stored masks, checked (no model needed)."""
    if not isinstance(compact, Mapping) or not compact:
        raise MaskFileError(f"{source}: no masks (expected {{conv: {{'kept': indices, 'filters': n}}}})")
    out = {}
    for name, entry in compact.items():
        kept = entry.get("kept") if isinstance(entry, Mapping) else None
        filters = entry.get("filters") if isinstance(entry, Mapping) else None
        if not torch.is_tensor(kept) or kept.dim() != 1 or kept.dtype != torch.int64 or not isinstance(filters, int):
            raise MaskFileError(f"{source}: {name}: expected {{'kept': 1-D int64 indices, 'filters': int}}")
        if kept.numel() and (int(kept.min()) < 0 or int(kept.max()) >= filters or not bool((kept[1:] > kept[:-1]).all())):
            raise MaskFileError(f"{source}: {name}: kept indices must be ascending, unique and in [0, {filters})")
        vector = torch.zeros(filters, dtype=torch.bool)
        vector[kept] = True
        out[name] = vector
    return out


def expand_masks(model: Union[nn.Module, Mapping[str, nn.Module]], compact: CompactMasks,
                 source: str = "masks") -> Masks:
    """NNI masks (0/1 weight-shaped, bias 0/1 or None) for ``model`` from stored masks; refuses any misfit."""
    modules = model if isinstance(model, Mapping) else dict(model.named_modules())
    masks, problems = {}, []
    for name, keep in kept_vectors(compact, source).items():
        conv = modules.get(name)
        if not isinstance(conv, nn.Conv2d):
            problems.append(f"{name}: not a Conv2d of {type(model).__name__}")
            continue
        if conv.out_channels != keep.numel():
            problems.append(f"{name}: {keep.numel()} filters in the masks, {conv.out_channels} in the model")
            continue
        weight = keep.view(-1, 1, 1, 1).expand_as(conv.weight).to(conv.weight.dtype).clone()
        bias = keep.to(conv.weight.dtype) if conv.bias is not None else None
        masks[name] = {"weight": weight, "bias": bias}
    if problems:
        more = f" (and {len(problems) - 8} more)" if len(problems) > 8 else ""
        raise MaskFileError(f"{source} do not fit the model: " + "; ".join(problems[:8]) + more)
    return masks

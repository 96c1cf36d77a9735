"""Masked (not yet slimmed) training: keep pruned weights (and their BatchNorm channels) at zero."""
from __future__ import annotations

from typing import List, Tuple

import torch
from torch import nn

from ..files.mask_files import Masks
from ..graph.trace import ModelGraph
from .select import with_batchnorm_masks


class MaskEnforcer:
    """Callable (a `train_one_epoch` `after_step`) that re-zeroes pruned filters and their BatchNorm channels.

    Build it after the model has moved to its training device: the masks are kept there.
    """

    def __init__(self, model: nn.Module, masks: Masks, graph: ModelGraph) -> None:
        modules = dict(model.named_modules())
        self.entries: List[Tuple[str, str, torch.Tensor]] = []
        for name, entry in with_batchnorm_masks(graph, masks).items():
            for attr, mask in entry.items():
                param = getattr(modules[name], attr, None)
                if mask is not None and param is not None:
                    self.entries.append((name, attr, mask.to(param.device, param.dtype)))

    @torch.no_grad()
    def __call__(self, model: nn.Module) -> None:
        """Multiply each masked parameter of the (unwrapped) `model` by its mask, in place."""
        modules = dict(model.named_modules())
        for name, attr, mask in self.entries:
            getattr(modules[name], attr).mul_(mask)

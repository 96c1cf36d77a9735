"""The weights that make and read each filter's channel: a filter's own norm times the norm of what reads it.

A filter k of conv l writes channel k; the layers that read it (``sites``'s
walk: through BatchNorm, activations, pooling and flattens to the next convs
and linears) multiply it by the weights ``W[:, k]``. ``filter_weights`` gives
||filter k|| x ||weights reading channel k|| (L2, the readers' slices taken
together), which ``--weight_power`` uses to scale a criterion's scores: a
channel that is computed strongly and read strongly moves the next layer most.
Where the channel meets an addition, a concatenation or the output before any
reader, or a reader is grouped, the readers' factor is 1 (the filter's own
norm alone).
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence

import torch
import torch.fx as fx
from torch import nn

from .sites import downstream
from .trace import ModelGraph


def _read_norms(graph: ModelGraph, conv: fx.Node, width: int) -> Optional[torch.Tensor]:
    """Squared L2 norm of the weights that read each of ``width`` channels of the ``conv`` node; None where some
    reader is not a plain (ungrouped) conv or a linear, or the channels reach something other than readers."""
    _, consumers, clean = downstream(graph, conv)
    if not clean or not consumers:
        return None
    total = torch.zeros(width, dtype=torch.float64)
    for node in consumers:
        mod = graph.module_of(node)
        w = mod.weight.detach().double()
        if isinstance(mod, nn.Conv2d) and mod.groups == 1 and w.shape[1] == width:
            total += w.pow(2).sum(dim=(0, 2, 3))
        elif isinstance(mod, nn.Linear) and w.shape[1] % width == 0:  # channel-major features after a flatten
            total += w.pow(2).sum(dim=0).view(width, -1).sum(dim=1)
        else:
            return None
    return total


def filter_weights(graph: ModelGraph, layers: Sequence[str]) -> Dict[str, torch.Tensor]:
    """Per conv in ``layers``: ||own filter|| x ||reading weights|| of every filter (the readers' factor 1 where the
    module docstring says), as float tensors."""
    out, nodes = {}, graph.conv_nodes()
    for name in layers:
        conv = graph.modules[name]
        own = conv.weight.detach().double().flatten(1).norm(dim=1)
        read = _read_norms(graph, nodes[name], conv.out_channels)
        out[name] = (own if read is None else own * read.sqrt()).float()
    return out

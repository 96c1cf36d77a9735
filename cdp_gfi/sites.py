"""Where a filter's feature maps are read for its statistics: the published conv output, or what the next layer sees.

Both papers read F, the raw conv output before BatchNorm. A filter whose raw
output is small can still matter (BatchNorm rescales it) and a large one can
be switched off by BN's shift and the ReLU after it, so two more sites exist:

- ``conv``: the conv's own output (both papers; the published site);
- ``bn``: the output of the BatchNorm that follows the conv (its scale and
  shift applied, before the activation);
- ``input``: the input of the one conv or linear that consumes the channel
  (after BN, activation and any pooling): exactly what the network uses.

A read point is (module name, "output" or "input"); a site that does not
exist for a conv (no BN after it; more than one consumer) falls back to the
nearest one that does (``input`` -> ``bn`` -> ``conv``).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch.fx as fx
from torch import nn

from .graph import ModelGraph, following_batchnorms, is_channelwise, is_flatten

SITES = ("conv", "bn", "input")
ReadPoint = Tuple[str, str]


def _sole_consumer(graph: ModelGraph, start: fx.Node) -> Optional[str]:
    """Name of the one conv/linear module that reads ``start``'s channels through channel-wise ops, if only one does."""
    found, stack, seen = set(), list(start.users), set()
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        mod = graph.module_of(node)
        if isinstance(mod, (nn.Conv2d, nn.Linear)):
            found.add(node)
        elif is_channelwise(graph, node) or is_flatten(graph, node):
            stack.extend(node.users)
        else:
            return None
    if len(found) != 1:
        return None
    node = found.pop()
    calls = [n for n in graph.gm.graph.nodes if n.op == "call_module" and n.target == node.target]
    return node.target if len(calls) == 1 else None  # a module called twice cannot be hooked for one site


def read_points(graph: ModelGraph, layers: Sequence[str], site: str = "conv") -> Dict[str, ReadPoint]:
    """Per conv in ``layers``, the module whose output (or input) its statistics read at ``site``."""
    if site not in SITES:
        raise ValueError(f"unknown feature site {site!r}; choose one of {SITES}")
    nodes = graph.conv_nodes()
    points: Dict[str, ReadPoint] = {}
    for name in layers:
        point: ReadPoint = (name, "output")
        if site in ("bn", "input"):
            bns: List[str] = following_batchnorms(graph, name)
            if len(bns) == 1:
                point = (bns[0], "output")
        if site == "input":
            consumer = _sole_consumer(graph, nodes[name])
            if consumer is not None:
                point = (consumer, "input")
        points[name] = point
    return points

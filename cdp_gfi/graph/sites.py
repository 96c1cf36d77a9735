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

from typing import Dict, List, Sequence, Tuple

import torch.fx as fx
from torch import nn

from .trace import ModelGraph, is_channelwise, is_flatten

SITES = ("conv", "bn", "input")
ReadPoint = Tuple[str, str]


def downstream(graph: ModelGraph, start: fx.Node) -> Tuple[List[fx.Node], List[fx.Node], bool]:
    """(channel-wise nodes, conv/linear consumers) reached from ``start`` through channel-wise ops and flattens,
    and whether every path ended at a consumer (False: an addition, concatenation, gate or output came first)."""
    passed, consumers, stack, seen, clean = [], [], list(start.users), set(), True
    while stack:
        node = stack.pop(0)
        if node in seen:
            continue
        seen.add(node)
        if isinstance(graph.module_of(node), (nn.Conv2d, nn.Linear)):
            consumers.append(node)
        elif is_channelwise(graph, node) or is_flatten(graph, node):
            passed.append(node)
            stack.extend(node.users)
        else:
            clean = False
    return passed, consumers, clean


def _called_once(graph: ModelGraph, node: fx.Node) -> bool:
    """A module called at one site only can be hooked for that site."""
    return sum(1 for n in graph.gm.graph.nodes if n.op == "call_module" and n.target == node.target) == 1


def read_points(graph: ModelGraph, layers: Sequence[str], site: str = "conv") -> Dict[str, ReadPoint]:
    """Per conv in ``layers``, the module whose output (or input) its statistics read at ``site``."""
    if site not in SITES:
        raise ValueError(f"unknown feature site {site!r}; choose one of {SITES}")
    nodes = graph.conv_nodes()
    points: Dict[str, ReadPoint] = {}
    for name in layers:
        point: ReadPoint = (name, "output")
        passed, consumers, clean = downstream(graph, nodes[name])
        if site in ("bn", "input"):
            bns = [n for n in passed if isinstance(graph.module_of(n), nn.BatchNorm2d) and _called_once(graph, n)]
            if len(bns) == 1:
                point = (bns[0].target, "output")
        if site == "input" and clean and len(consumers) == 1 and _called_once(graph, consumers[0]):
            point = (consumers[0].target, "input")
        points[name] = point
    return points

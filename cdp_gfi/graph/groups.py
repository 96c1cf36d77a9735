"""Coupled channel groups: the channels that must go together, and the units ranked as one layer.

Every channel a conv makes gets an identity; the graph's channel steps
(``graph.channel_steps``) are walked once. Routes (channel-wise ops,
concatenations, splits, shuffles, flattens) carry identities along; an
addition unites the identities it adds position by position (a
channel-padding shortcut's zero channels unite with nothing); a grouped conv
unites its input channels, and its own filters, at the same place in every
group (so each group loses the same ones), and so does a channel shuffle;
a depthwise conv's filters and a
squeeze-excitation gate's expanding conv *follow* the channels they act on
(the gate's reducing conv is never ranked: a few filters on 1x1 maps, which
a global ranking would empty first).
A group touching anything we cannot shrink (the model input or output, an
op we do not understand) is pinned. What remains:

- a *group* is a set of (conv, filter) pairs of ranked convs, removed
  together or not at all, with the follower filters that go with them;
- a *unit* is a set of ranked convs linked by groups (a residual stream, or
  one block-internal conv alone); it plays the part a layer plays for
  ranking, caps and minimums.

Scope "internal" keeps the units of one conv whose channels meet no addition
and reach a single consumer (conv or linear; a squeeze-excitation branch
reading them does not count).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Set, Tuple

import torch

from .channels import Step, channel_steps, channels
from .trace import ModelGraph

Channel = Tuple[str, int]
PIN: Channel = ("", -1)


@dataclass
class Unit:
    """Convs ranked as one layer; ``groups[g]`` lists the (conv, filter) pairs of coupled channel g.

    ``followers[g]`` lists the filters of unranked convs (depthwise, a
    squeeze-excitation's expanding conv) that go with group g; their convs'
    widths are ``follower_widths``.
    """

    convs: List[str]
    groups: List[List[Channel]] = field(default_factory=list)
    followers: List[List[Channel]] = field(default_factory=list)
    follower_widths: Dict[str, int] = field(default_factory=dict)

    _index: Optional[Dict[str, Tuple[torch.Tensor, torch.Tensor]]] = field(
        default=None, init=False, repr=False, compare=False)

    def members(self) -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
        """Per conv (ranked, then followers): (group of each listed filter, the filter), as index tensors."""
        if self._index is None:
            pairs: Dict[str, Tuple[List[int], List[int]]] = {}
            followers = self.followers or [[] for _ in self.groups]
            for i, (g, f) in enumerate(zip(self.groups, followers)):
                for conv, k in g + f:
                    pairs.setdefault(conv, ([], []))
                    pairs[conv][0].append(i)
                    pairs[conv][1].append(k)
            self._index = {c: (torch.tensor(gi), torch.tensor(ks)) for c, (gi, ks) in pairs.items()}
        return self._index

    def expand(self, keep_groups: torch.Tensor, out_channels: Dict[str, int]) -> Dict[str, torch.Tensor]:
        """Per-conv kept-filter vectors (ranked convs and followers) from a kept-group vector."""
        widths = {**{c: out_channels[c] for c in self.convs}, **self.follower_widths}
        keep = {c: torch.ones(w, dtype=torch.bool) for c, w in widths.items()}
        for conv, (gi, ks) in self.members().items():
            keep[conv][ks[~keep_groups[gi]]] = False
        return keep


class _UnionFind:
    """Disjoint sets of channels; PIN's set is the root of whatever joins it."""

    def __init__(self) -> None:
        self.parent: Dict[Channel, Channel] = {}

    def find(self, a: Channel) -> Channel:
        self.parent.setdefault(a, a)
        while self.parent[a] != a:
            self.parent[a] = self.parent[self.parent[a]]
            a = self.parent[a]
        return a

    def union(self, a: Channel, b: Channel) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            if rb == PIN:
                ra, rb = rb, ra
            self.parent[rb] = ra


@dataclass
class _Flow:
    """What the walk learns: couplings, consumers and additions each channel meets, followers."""

    uf: _UnionFind = field(default_factory=_UnionFind)
    consumers: Dict[Channel, Set[str]] = field(default_factory=dict)
    added: Set[Channel] = field(default_factory=set)
    follows: Dict[Channel, Optional[Channel]] = field(default_factory=dict)
    gate_convs: Set[str] = field(default_factory=set)
    gate_branches: Set[str] = field(default_factory=set)


def _walk(graph: ModelGraph) -> _Flow:
    """One pass over the channel steps, carrying channel identities node to node."""
    flow, ids = _Flow(), {}
    for node, step in channel_steps(graph).items():
        ins = [ids.get(a, []) for a in step.inputs]
        kind, name = step.kind, node.target
        if kind in ("conv", "grouped", "linear"):
            for c in ins[0]:
                if c is not None:
                    flow.consumers.setdefault(c, set()).add(name)
        if kind == "conv":
            ids[node] = [(name, k) for k in range(channels(node))]
        elif kind == "grouped":
            _couple_across_groups(flow.uf, ins[0], step.groups)
            ids[node] = [(name, k) for k in range(channels(node))]
            _couple_across_groups(flow.uf, ids[node], step.groups)
        elif kind == "depthwise":
            ids[node] = _route(step, ins)
            flow.follows.update({(name, j): c for j, c in enumerate(ids[node])})
        elif kind == "route":
            ids[node] = _route(step, ins)
            if step.groups > 1:  # a channel shuffle stays one only if every group loses the same channels
                _couple_across_groups(flow.uf, ids[node], step.groups)
        elif kind == "add":
            flow.added.update(c for c in ins[0] + ins[1] if c is not None)
            ids[node] = _add(flow.uf, ins[0], ins[1])
        elif kind == "gate":
            _gate(flow, graph, step, ins)
            ids[node] = list(ins[0])
        elif kind == "linear":
            ids[node] = [PIN] * channels(node)
        elif kind == "pin":
            _pin(flow.uf, ins)
            ids[node] = [PIN] * channels(node)
    return flow


def _route(step: Step, ins: List[List[Optional[Channel]]]) -> List[Optional[Channel]]:
    return [None if r is None else (ins[r[0]][r[1]] if r[1] < len(ins[r[0]]) else PIN) for r in step.route]


def _couple_across_groups(uf: _UnionFind, chans: List[Optional[Channel]], groups: int) -> None:
    """Channel i of every group goes together, so each group keeps as many as the others."""
    per = len(chans) // groups
    for g in range(1, groups):
        for i in range(per):
            a, b = chans[i], chans[g * per + i]
            uf.union(PIN if a is None else a, PIN if b is None else b)


def _gate(flow: _Flow, graph: ModelGraph, step: Step, ins) -> None:
    """Squeeze-excitation: the gate's channels follow the map's; its branch reads the map without consuming it."""
    x, s = step.inputs
    if len(ins[0]) != len(ins[1]):
        _pin(flow.uf, ins)
        return
    for a, b in zip(ins[0], ins[1]):
        flow.uf.union(PIN if a is None else a, PIN if b is None else b)
    flow.gate_convs.update(c for c, _ in ins[1] if c is not None and c != PIN[0])
    stack, seen = [s], set()
    while stack:
        n = stack.pop()
        if n is x or n in seen or n.op == "placeholder":
            continue
        seen.add(n)
        if n.op == "call_module":
            flow.gate_branches.add(n.target)
        stack.extend(n.all_input_nodes)


def _pin(uf: _UnionFind, ins: Sequence[List[Optional[Channel]]]) -> None:
    for chans in ins:
        for c in chans:
            if c is not None:
                uf.union(PIN, c)


def _add(uf: _UnionFind, a: List[Optional[Channel]], b: List[Optional[Channel]]) -> List[Optional[Channel]]:
    if len(a) != len(b):
        _pin(uf, [a, b])
        return [PIN] * max(len(a), len(b))
    out = []
    for x, y in zip(a, b):
        if x is not None and y is not None:
            uf.union(x, y)
        out.append(x if x is not None else y)
    return out


@dataclass
class _Group:
    ranked: List[Channel] = field(default_factory=list)
    followers: List[Channel] = field(default_factory=list)


def _components(graph: ModelGraph, flow: _Flow) -> Dict[Channel, _Group]:
    """Unpinned groups by root: ranked filters (dense and grouped convs) and their followers."""
    pinned, comps = flow.uf.find(PIN), {}
    steps = channel_steps(graph)
    for name, node in graph.conv_nodes().items():
        kind, width = steps[node].kind, graph.modules[name].out_channels
        if kind == "pin":  # a conv subclass whose forward does not slice (graph.leaves): its filters stay
            continue
        for k in range(width):
            if kind == "depthwise":
                c = flow.follows.get((name, k))
                if c is None or c == PIN:
                    continue
            else:
                c = (name, k)
            root = flow.uf.find(c)
            if root == pinned:
                continue
            if kind == "depthwise" or name in flow.gate_convs:
                comps.setdefault(root, _Group()).followers.append((name, k))
            elif name not in flow.gate_branches:  # a gate's own reducer stays whole (few filters, 1x1 maps)
                comps.setdefault(root, _Group()).ranked.append((name, k))
    return {r: g for r, g in comps.items() if g.ranked}


def _units(graph: ModelGraph, comps: List[_Group]) -> Dict[str, Unit]:
    """Groups linked by shared ranked convs, gathered into units named by their first conv."""
    order = {name: i for i, name in enumerate(graph.conv_nodes())}
    link = _UnionFind()
    for g in comps:
        for conv, _ in g.ranked:
            link.union((g.ranked[0][0], 0), (conv, 0))
    units: Dict[Channel, Unit] = {}
    for g in sorted(comps, key=lambda g: min((order[c], k) for c, k in g.ranked)):
        unit = units.setdefault(link.find((g.ranked[0][0], 0)), Unit(convs=[]))
        unit.groups.append(sorted(g.ranked, key=lambda ch: (order[ch[0]], ch[1])))
        unit.followers.append(sorted(g.followers, key=lambda ch: (order[ch[0]], ch[1])))
    for unit in units.values():
        unit.convs = sorted({c for g in unit.groups for c, _ in g}, key=order.__getitem__)
        unit.follower_widths = {c: graph.modules[c].out_channels for f in unit.followers for c, _ in f}
    return {u.convs[0]: u for u in sorted(units.values(), key=lambda u: order[u.convs[0]])}


def channel_groups(graph: ModelGraph) -> List[List[Channel]]:
    """Unpinned groups of coupled ranked-conv channels (followers left out)."""
    return [g.ranked for g in _components(graph, _walk(graph)).values()]


def coupled_units(graph: ModelGraph) -> Dict[str, Unit]:
    """Every prunable conv channel, grouped, and the groups gathered into units named by their first conv."""
    return _units(graph, list(_components(graph, _walk(graph)).values()))


def internal_units(graph: ModelGraph) -> Dict[str, Unit]:
    """Units of one block-internal conv: its channels meet no addition and reach one consumer."""
    flow = _walk(graph)
    comps = _components(graph, flow)
    by_conv: Dict[str, List[_Group]] = {}
    for g in comps.values():
        convs = {c for c, _ in g.ranked}
        if len(convs) == 1:
            by_conv.setdefault(convs.pop(), []).append(g)
    chosen = []
    for conv, gs in by_conv.items():
        mine = [c for g in gs for c in g.ranked]
        if len(mine) != graph.modules[conv].out_channels or any(c in flow.added for c in mine):
            continue
        readers = set().union(*(flow.consumers.get(c, set()) for c in mine))
        if conv not in flow.gate_branches:  # a gate's branch reads the map it scales: not a second consumer
            readers -= flow.gate_branches
        if len(readers) == 1:
            chosen.extend(gs)
    return _units(graph, chosen)

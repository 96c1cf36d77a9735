"""What each traced node does to channels (channel steps), and which channels stay live."""
from __future__ import annotations

import operator
import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
import torch.fx as fx
from torch import nn

from .leaves import slices_exactly
from .trace import (
    ADD_FUNCTIONS,
    CAT_FUNCTIONS,
    CHUNK_FUNCTIONS,
    MUL_FUNCTIONS,
    ModelGraph,
    Route,
    channel_padding,
    is_channelwise,
    is_depthwise,
    is_flatten,
    is_spatial_slice,
    split_owner,
)

LAYER_KINDS = ("conv", "grouped", "depthwise", "linear")


@dataclass
class Step:
    """What one graph node does to channels (dim 1, or dims 1-2 of a channel shuffle's 5-D view).

    Kinds: ``conv`` makes new channels and reads (consumes) its input's;
    ``grouped`` the same for a conv of ``groups`` groups, whose channels can
    only go evenly from every group; ``depthwise`` carries input channel
    ``route[j]`` to output j, its filter j following it; ``linear`` consumes
    features and makes channels nobody prunes; ``route`` sends input channel
    ``route[j]`` = (input index, channel) to output j, or makes a zero channel
    (None); ``add`` sums two maps position by position; ``gate`` scales
    ``inputs[0]`` per channel by ``inputs[1]`` (squeeze-excitation); a route
    into a channel shuffle's [N, g, C/g, H, W] view has ``groups`` = g, whose
    channels must go evenly from every group, and so has a ``chunk`` into g
    equal parts; ``pin``
    touches channels in a way we do not shrink through; ``none`` carries no
    channels (sizes, shapes).
    """

    kind: str
    inputs: List[fx.Node] = field(default_factory=list)
    route: Optional[Route] = None
    groups: int = 1
    unknown: Optional[str] = None  # for an op pinned because it is not understood: its name

    def gather_index(self) -> Tuple[bool, torch.Tensor]:
        """(is the route the identity of one input, index into the inputs' concatenated channels + a dead slot)."""
        if not hasattr(self, "_index"):
            sizes = [channels(a) for a in self.inputs]
            offsets = [sum(sizes[:i]) for i in range(len(sizes))]
            dead = sum(sizes)
            idx = torch.tensor([dead if r is None else offsets[r[0]] + r[1] for r in self.route], dtype=torch.long)
            same = len(self.inputs) == 1 and idx.numel() == dead and bool((idx == torch.arange(dead)).all())
            self._index = (same, idx)
        return self._index


def channels(node: fx.Node) -> int:
    """Channel count of a node's tensor: dim 1, dims 1 x 2 for a 5-D shuffle view, 0 when it has none."""
    shape = getattr(node.meta.get("tensor_meta"), "shape", None)
    if shape is None or len(shape) < 2:
        return 0
    return int(shape[1] * shape[2]) if len(shape) == 5 else int(shape[1])


def channel_steps(graph: ModelGraph) -> Dict[fx.Node, Step]:
    """Each node's ``Step``, in execution order (computed once per graph).

    Every op that touches channels and is not understood pins them and is
    named in one warning per op kind, unless no layer is upstream of it (an
    input transform such as GoogLeNet's touches only the image's channels).
    """
    if graph._steps is None:
        steps: Dict[fx.Node, Step] = {}
        unknown: Dict[str, str] = {}
        after_layer: set = set()  # nodes downstream of a conv or linear: their channels could be pruned
        for node in graph.gm.graph.nodes:
            steps[node] = _step(graph, node, steps)
            pinned_layer = isinstance(graph.module_of(node), (nn.Conv2d, nn.Linear))  # a subclass pinned above
            if steps[node].kind in LAYER_KINDS or pinned_layer or any(a in after_layer for a in node.all_input_nodes):
                after_layer.add(node)
            if steps[node].unknown and node in after_layer:
                unknown.setdefault(steps[node].unknown, node.name)
        for op, where in unknown.items():
            warnings.warn(f"cdp_gfi does not know how channels pass through {op} (first at graph node "
                          f"{where!r}): the channels it touches are pinned, never pruned", stacklevel=2)
        graph._steps = steps
    return graph._steps


def pinned_ops(graph: ModelGraph) -> str:
    """The ops that pin channels downstream of a layer, named for an error message (empty when none)."""
    ops = dict.fromkeys(s.unknown for s in channel_steps(graph).values() if s.unknown)
    return f"channels are pinned by {', '.join(ops)}" if ops else ""


def _identity(node: fx.Node) -> Route:
    return [(0, j) for j in range(channels(node))]


def _op_name(graph: ModelGraph, node: fx.Node) -> str:
    mod = graph.module_of(node)
    if mod is not None:
        return type(mod).__name__
    return getattr(node.target, "__name__", str(node.target))


def _step(graph: ModelGraph, node: fx.Node, steps: Dict[fx.Node, Step]) -> Step:
    tensors = [a for a in node.args if isinstance(a, fx.Node)]
    if node.op == "output":
        return Step("pin", list(node.all_input_nodes))
    if node.op in ("placeholder", "get_attr"):
        return Step("pin")  # model inputs and parameters: never pruned
    meta = node.meta.get("tensor_meta")
    if meta is None:
        return Step("none")
    mod = graph.module_of(node)
    x = tensors[0] if tensors else None
    if isinstance(mod, (nn.Conv2d, nn.Linear)) and not slices_exactly(mod):
        return Step("pin", list(node.all_input_nodes),
                    unknown=f"{type(mod).__name__} (its own forward does not slice with its channels)")
    if isinstance(mod, nn.Conv2d):
        if mod.groups == 1:
            return Step("conv", [x])
        if is_depthwise(mod):
            m = mod.out_channels // mod.in_channels
            return Step("depthwise", [x], [(0, j // m) for j in range(mod.out_channels)])
        return Step("grouped", [x], groups=mod.groups)
    if isinstance(mod, nn.Linear) and len(graph.shape(x)) == 2:
        return Step("linear", [x])
    if is_channelwise(graph, node) or is_spatial_slice(node):
        return Step("route", [x], _identity(x))
    pad = channel_padding(node)
    if pad is not None:
        return Step("route", [x], [None] * pad[0] + _identity(x) + [None] * pad[1])
    route = _reshape_route(graph, node, x)
    if route is not None:
        split = len(graph.shape(node)) == 5 and len(graph.shape(x)) == 4
        return Step("route", [x], route, groups=int(graph.shape(node)[1]) if split else 1)
    if _is_spatial_mean(node):
        return Step("route", [x], _identity(x))
    if node.op == "call_function" and node.target in ADD_FUNCTIONS | MUL_FUNCTIONS and len(tensors) == 2:
        a, b = (graph.shape(t) for t in tensors)
        if node.target in ADD_FUNCTIONS and a == b:
            return Step("add", tensors)
        gate = _gate(a, b)
        if node.target in MUL_FUNCTIONS and gate is not None:
            return Step("gate", tensors[::gate])
    if node.op == "call_function" and node.target in ADD_FUNCTIONS and len(tensors) == 1:
        return Step("route", [x], _identity(x))  # adding a constant
    if node.op == "call_function" and node.target in CAT_FUNCTIONS and _is_channel_dim(node, 1):
        parts = list(node.args[0])
        return Step("route", parts, [(i, j) for i, p in enumerate(parts) for j in range(channels(p))])
    if _is_split(node):  # equal chunks: every chunk must lose the same channels
        return Step("route", [x], _identity(x), groups=len(node.meta["tensor_meta"]))
    if split_owner(graph.model, node) is not None:  # unequal parts, re-sized at slimming
        return Step("route", [x], _identity(x))
    if (node.op == "call_function" and node.target is operator.getitem and x is not None
            and (_is_split(x) or split_owner(graph.model, x) is not None)):
        start = sum(int(m.shape[1]) for m in x.meta["tensor_meta"][: node.args[1]])
        return Step("route", [x], [(0, start + j) for j in range(channels(node))])
    touches = any(len(getattr(a.meta.get("tensor_meta"), "shape", ())) >= 3 for a in node.all_input_nodes)
    return Step("pin", list(node.all_input_nodes), unknown=_op_name(graph, node) if touches else None)


def _gate(a: torch.Size, b: torch.Size) -> Optional[int]:
    """1 if ``b`` gates ``a`` per channel ([N, C, 1, 1] on [N, C, H, W]), -1 if the other way round."""
    def scales(s, t):
        return len(s) == len(t) == 4 and s[:2] == t[:2] and tuple(s[2:]) == (1, 1) and s != t
    return 1 if scales(b, a) else -1 if scales(a, b) else None


def _is_spatial_mean(node: fx.Node) -> bool:
    """``x.mean([2, 3])``: global average pooling written as a mean over the spatial dims of a 4-D map."""
    mean = ((node.op == "call_method" and node.target == "mean")
            or (node.op == "call_function" and node.target is torch.mean))
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    return mean and isinstance(dims, (tuple, list)) and sorted(d % 4 for d in dims) == [2, 3]


def _is_channel_dim(node: fx.Node, position: int) -> bool:
    dim = node.args[position] if len(node.args) > position else node.kwargs.get("dim", 0)
    ndim = len(node.meta["tensor_meta"].shape) if hasattr(node.meta.get("tensor_meta"), "shape") else 4
    return dim == 1 or dim == 1 - ndim


def _is_split(node: fx.Node) -> bool:
    """``x.chunk(n, 1)`` into equal parts: a tuple of channel slices, re-cut evenly at run time.

    (``split`` with explicit sizes is not one: its sizes are rewritten when a module holds them, ``split_owner``.)
    """
    is_chunk = ((node.op == "call_method" and node.target == "chunk")
                or (node.op == "call_function" and node.target in CHUNK_FUNCTIONS))
    parts = node.meta.get("tensor_meta")
    return (is_chunk and isinstance(parts, (tuple, list)) and _is_channel_dim(node, 2)
            and len({int(p.shape[1]) for p in parts}) == 1)


def _reshape_route(graph: ModelGraph, node: fx.Node, x: Optional[fx.Node]) -> Optional[Route]:
    """Channel route of a flatten into features, or of a channel shuffle's view / transpose / view."""
    if x is None or not all(hasattr(n.meta.get("tensor_meta"), "shape") for n in (x, node)):
        return None
    src, out = graph.shape(x), graph.shape(node)
    reshape = node.op == "call_method" and node.target in ("view", "reshape")
    if reshape and len(src) == 4 and len(out) == 5 and out[1] * out[2] == src[1] and out[3:] == src[2:]:
        return _identity(x)  # [N, C, H, W] -> [N, g, C/g, H, W]: the caller couples the g groups
    if reshape and len(src) == 5 and len(out) == 4 and src[1] * src[2] == out[1] and src[3:] == out[2:]:
        return _identity(x)
    transpose = ((node.op == "call_function" and node.target is torch.transpose)
                 or (node.op == "call_method" and node.target == "transpose"))
    if transpose and len(src) == 5 and sorted(node.args[1:3]) == [1, 2]:
        a, b = int(src[1]), int(src[2])
        return [(0, q * b + p) for p in range(b) for q in range(a)]
    if is_flatten(graph, node) and len(src) >= 2:
        per = int(torch.Size(src[2:]).numel())
        return [(0, j // per) for j in range(channels(node))]
    return None


def live_channels(graph: ModelGraph, keep: Dict[str, torch.Tensor]) -> Dict[fx.Node, Optional[torch.Tensor]]:
    """Propagate per-conv kept-filter vectors to a live-channel vector per node.

    ``None`` means every channel is alive. Additions OR their inputs (as NNI's
    ModelSpeedup does); a depthwise conv keeps what both its input and its
    own filters keep; routes gather (a padding channel is dead).
    """
    live: Dict[fx.Node, Optional[torch.Tensor]] = {}
    for node, step in channel_steps(graph).items():
        ins = [live.get(a) for a in step.inputs]
        if step.kind in ("conv", "grouped"):
            live[node] = keep.get(node.target)
        elif step.kind == "depthwise":
            routed, own = _gather(step, ins), keep.get(node.target)
            live[node] = own if routed is None else routed if own is None else routed & own
        elif step.kind == "route":
            live[node] = _gather(step, ins)
        elif step.kind == "add":
            a, b = ins
            live[node] = None if a is None or b is None else (a | b)
        elif step.kind == "gate":
            live[node] = ins[0]
        else:
            live[node] = None
    return live


def _gather(step: Step, ins: List[Optional[torch.Tensor]]) -> Optional[torch.Tensor]:
    same, idx = step.gather_index()
    if same:
        return ins[0]
    if all(v is None for v in ins) and None not in step.route:
        return None
    full = [torch.ones(channels(a), dtype=torch.bool) if v is None else v for a, v in zip(step.inputs, ins)]
    return torch.cat(full + [torch.zeros(1, dtype=torch.bool)])[idx]


def batchnorm_keep(graph: ModelGraph, keep: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Live-channel vector of every BatchNorm2d reading dead channels: those its masks must zero."""
    live = live_channels(graph, keep)
    out = {}
    for node, step in channel_steps(graph).items():
        if isinstance(graph.module_of(node), nn.BatchNorm2d):
            vec = live.get(step.inputs[0])
            if vec is not None and not bool(vec.all()):
                out[node.target] = vec
    return out

"""The fx trace of a model and what its nodes are (convs, channel-wise ops, flattens, pads)."""
from __future__ import annotations

import inspect
import linecache
import operator
import os
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence, Tuple

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from .leaves import LeafSpec, LeafTracer, slices_exactly
from torchvision.ops import stochastic_depth

if TYPE_CHECKING:  # channels.py builds on this module; the annotation only names its Step
    from .channels import Step

# Modules and functions that act on each channel independently: a dead
# (all-zero) input channel stays a dead output channel.
CHANNELWISE_MODULES = (
    nn.BatchNorm2d, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SiLU, nn.GELU,
    nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Dropout, nn.Dropout2d, nn.Identity,
    nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d,
)
CHANNELWISE_FUNCTIONS = {
    F.relu, torch.relu, F.relu6, F.leaky_relu, F.silu, F.gelu, F.dropout, F.hardswish,
    F.hardsigmoid, F.sigmoid, torch.sigmoid, F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d,
    F.adaptive_max_pool2d, stochastic_depth,
}
CHANNELWISE_METHODS = {"relu", "relu_", "sigmoid", "contiguous", "clone", "detach"}
FLATTEN_FUNCTIONS = {torch.flatten}
FLATTEN_METHODS = {"flatten", "view", "reshape"}
ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add}
MUL_FUNCTIONS = {operator.mul, operator.imul, torch.mul}
CAT_FUNCTIONS = {torch.cat, torch.concat}
CHUNK_FUNCTIONS = {torch.chunk}
SPLIT_FUNCTIONS = {torch.split}


class TraceError(RuntimeError):
    """The model could not be traced by torch.fx, so its channel flow is unknown.

    ``module`` is the qualified name of the submodule whose code broke tracing, when known: a candidate
    for ``leaf_modules``.
    """

    def __init__(self, message: str, module: Optional[str] = None) -> None:
        super().__init__(message)
        self.module = module


@dataclass
class ModelGraph:
    """A traced model with tensor shapes on every node (batch of one)."""

    gm: fx.GraphModule
    modules: Dict[str, nn.Module] = field(repr=False)
    leaf_modules: Tuple[LeafSpec, ...] = ()  # kept whole by the tracer, beside the layers (``leaves``)
    model: Optional[nn.Module] = field(default=None, repr=False)  # the traced model (its attributes, not copied)
    _steps: Optional[Dict[fx.Node, "Step"]] = field(default=None, repr=False)

    def module_of(self, node: fx.Node) -> Optional[nn.Module]:
        return self.modules.get(node.target) if node.op == "call_module" else None

    def conv_nodes(self) -> Dict[str, fx.Node]:
        """Conv2d call sites by module name, in execution order."""
        return {n.target: n for n in self.gm.graph.nodes if isinstance(self.module_of(n), nn.Conv2d)}

    def shape(self, node: fx.Node) -> torch.Size:
        meta = node.meta.get("tensor_meta")
        if meta is None or not hasattr(meta, "shape"):
            raise TraceError(f"no tensor shape recorded for graph node {node.name!r}")
        return meta.shape


def trace(model: nn.Module, dummy_input: torch.Tensor, leaf_modules: Sequence[LeafSpec] = ()) -> ModelGraph:
    """fx-trace ``model`` and record every node's output shape for ``dummy_input[:1]``.

    Layers (conv, linear, BatchNorm; subclasses too) and ``leaf_modules``
    (module classes or qualified names) stay single nodes; arguments of
    ``forward`` after the input that have defaults are traced at them.
    """
    gm = fx_trace(model, leaf_modules, dummy_input[:1].to(_device_of(model)))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(dummy_input[:1].to(_device_of(model)))
    finally:
        model.train(was_training)
    return ModelGraph(gm=gm, modules=dict(gm.named_modules()), leaf_modules=tuple(leaf_modules), model=model)


def fx_trace(model: nn.Module, leaf_modules: Sequence[LeafSpec] = (),
             example: Optional[torch.Tensor] = None) -> fx.GraphModule:
    """The GraphModule of ``model`` as ``trace`` sees it (``LeafTracer``, defaults of extra arguments).

    With an ``example`` input, conditions on traced values take the branch of that input (warned, by line).
    """
    defaults = default_arguments(model)
    tracer = LeafTracer(leaf_modules, None if example is None else (example, *defaults.values()))
    try:
        graph = tracer.trace(model, concrete_args=defaults or None)
    except Exception as exc:  # fx raises many types; name the line and how to get past it
        where, module = _culprit(model, exc)
        raise TraceError(f"torch.fx could not trace {type(model).__name__}: {where} broke tracing ({exc}). The "
                         "pruning scope, coupled groups and slimming all read the traced graph: make that forward() "
                         "free of data-dependent control flow, or keep the module whole by passing its class or "
                         "name in leaf_modules=[...] (its channels are then pinned)", module) from exc
    if tracer.resolved:
        warnings.warn(f"{type(model).__name__}: control flow on traced values was decided for an input of shape "
                      f"{tuple(example.shape)}: " + "; ".join(dict.fromkeys(tracer.resolved)), stacklevel=2)
    gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
    if defaults:
        _drop_specialisation_checks(gm)
    return gm


def default_arguments(model: nn.Module) -> Dict[str, object]:
    """Arguments of ``model.forward`` after the first that have defaults (``return_features=False``, ...)."""
    params = list(inspect.signature(model.forward).parameters.values())[1:]
    return {p.name: p.default for p in params if p.default is not inspect.Parameter.empty
            and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def _drop_specialisation_checks(gm: fx.GraphModule) -> None:
    """Remove the placeholders fx keeps for defaulted arguments and the asserts on their values."""
    graph = gm.graph
    for node in reversed(list(graph.nodes)):
        if node.op == "call_function" and getattr(node.target, "__name__", "") in ("_assert", "_assert_is_none"):
            graph.erase_node(node)
    graph.eliminate_dead_code()
    first = next(iter(graph.nodes))
    for node in list(graph.nodes):
        if node.op == "placeholder" and not node.users and node is not first:
            graph.erase_node(node)
    gm.recompile()


def _culprit(model: nn.Module, exc: BaseException) -> Tuple[str, Optional[str]]:
    """Where tracing failed: the innermost line of the model's own code, and the module running it (its name)."""
    tb, frame = exc.__traceback__, None
    skipped = (os.path.dirname(torch.__file__), os.path.dirname(__file__))  # fx and our tracer
    while tb is not None:
        if not tb.tb_frame.f_code.co_filename.startswith(skipped):
            frame = tb
        tb = tb.tb_next
    if frame is None:
        return "its forward()", None
    code = frame.tb_frame.f_code
    line = linecache.getline(code.co_filename, frame.tb_lineno).strip()
    owner = frame.tb_frame.f_locals.get("self")
    names = {id(m): n for n, m in model.named_modules()}
    name = names.get(id(owner)) if isinstance(owner, nn.Module) else None
    where = f"module '{name or '<top level>'} ({type(owner).__name__})', " if name is not None else ""
    return f"{where}{os.path.basename(code.co_filename)}:{frame.tb_lineno} `{line}`", name or None


def _device_of(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def is_depthwise(mod: nn.Conv2d) -> bool:
    """A conv whose every group reads one input channel: its filters follow that channel."""
    return mod.groups > 1 and mod.groups == mod.in_channels


def is_channelwise(graph: ModelGraph, node: fx.Node) -> bool:
    """True when ``node`` maps each input channel to the same output channel alone."""
    mod = graph.module_of(node)
    if mod is not None:
        return isinstance(mod, CHANNELWISE_MODULES) and slices_exactly(mod)
    if node.op == "call_function" and node.target in MUL_FUNCTIONS | {operator.truediv}:
        return sum(isinstance(a, fx.Node) for a in node.args) == 1  # scaling by a constant
    if node.op == "call_function":
        return node.target in CHANNELWISE_FUNCTIONS
    if node.op == "call_method":
        return node.target in CHANNELWISE_METHODS
    return False


def is_flatten(graph: ModelGraph, node: fx.Node) -> bool:
    """True for a flatten/view to [N, features] (channel-major), as before a classifier."""
    mod = graph.module_of(node)
    if isinstance(mod, nn.Flatten):
        return True
    if node.op == "call_function" and node.target in FLATTEN_FUNCTIONS:
        return True
    if node.op == "call_method" and node.target in FLATTEN_METHODS:
        return len(graph.shape(node)) == 2
    return False


def split_owner(model: Optional[nn.Module], node: fx.Node) -> Optional[Tuple[str, str]]:
    """(module, attribute) holding the sizes of ``torch.split(x, sizes, 1)`` (timm's MixedConv2d: ``splits``).

    The split is made inside a module that keeps its sizes as one attribute
    of that value: slimming rewrites it to the channels each part keeps. None
    when it is not a channel split or no single attribute matches.
    """
    is_split = ((node.op == "call_method" and node.target == "split")
                or (node.op == "call_function" and node.target in SPLIT_FUNCTIONS))
    if not is_split or model is None or len(node.args) < 2:
        return None
    dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
    sizes = node.args[1]
    if dim not in (1, -3) or not isinstance(sizes, (list, tuple)):
        return None
    stack = list(node.meta.get("nn_module_stack") or {})  # enclosing modules, outermost first
    path = stack[-1] if stack else ""
    owner = model.get_submodule(path) if path else model
    names = [k for k, v in vars(owner).items() if not k.startswith("_") and isinstance(v, (list, tuple))
             and list(v) == list(sizes)]
    return (path, names[0]) if len(names) == 1 else None


def channel_padding(node: fx.Node) -> Optional[Tuple[int, int]]:
    """(front, back) channels an ``F.pad`` of a 4-D tensor adds, or None if it is not one."""
    if node.op != "call_function" or node.target is not F.pad:
        return None
    pad = node.args[1] if len(node.args) > 1 else node.kwargs.get("pad")
    if not isinstance(pad, (tuple, list)) or len(pad) < 6:
        return (0, 0) if isinstance(pad, (tuple, list)) else None
    return int(pad[4]), int(pad[5])


def is_spatial_slice(node: fx.Node) -> bool:
    """``x[:, :, ...]``: indexing that keeps every channel in place.

    ``x[:, :n]`` with n at least the channel count counts too (GhostNet trims
    its concatenation so): it keeps every channel, slimmed or not.
    """
    if node.op != "call_function" or node.target is not operator.getitem:
        return False
    idx = node.args[1]
    if not (isinstance(idx, tuple) and len(idx) >= 2 and all(isinstance(i, slice) for i in idx)
            and idx[0] == slice(None)):
        return False
    chans = idx[1]
    shape = getattr(node.args[0].meta.get("tensor_meta"), "shape", None) if isinstance(node.args[0], fx.Node) else None
    whole = (chans.start in (None, 0) and chans.step in (None, 1) and isinstance(chans.stop, int)
             and shape is not None and len(shape) >= 2 and chans.stop >= shape[1])
    return chans == slice(None) or whole


Route = List[Optional[Tuple[int, int]]]

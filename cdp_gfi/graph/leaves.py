"""Which modules the graph keeps whole: convs, linears and BatchNorms, subclasses included.

A library's ``Conv2dSame``, ``StdConv2d`` or ``BatchNormAct2d`` is what it
subclasses: one graph node, counted, scored, masked and slimmed like the
torch layer. torch.fx would trace into its ``forward`` and see only
``F.conv2d`` / ``F.batch_norm`` calls, pinning every channel. A subclass whose
own ``forward`` would change when its channels are sliced (a weight
standardised over the input channels, say) is found by a probe and pinned.
"""
from __future__ import annotations

import copy
import os
import traceback
from typing import Dict, List, Optional, Sequence, Union

import torch
import torch.fx as fx
from torch import nn

LAYER_TYPES = (nn.Conv2d, nn.Linear, nn.modules.batchnorm._BatchNorm)
LeafSpec = Union[str, type]  # a module's qualified name, or a module class (instances of it, subclasses too)
_EXACT: Dict[type, bool] = {}  # probe results per subclass
_TORCH_DIR = os.path.dirname(torch.__file__)


class LeafTracer(fx.Tracer):
    """fx's tracer, keeping layers (subclasses too) and the user's ``leaf_modules`` as single nodes.

    Given ``example`` inputs (the dummy, then the defaults of extra arguments),
    a condition on a traced value (``if x.shape[-1] < 7:``) is evaluated on
    them and the branch taken is traced, instead of failing: the graph is then
    the one of that input size, which is what the channel analysis reads.
    ``resolved`` lists the source lines so decided.
    """

    def __init__(self, leaf_modules: Sequence[LeafSpec] = (), example: Optional[Sequence[object]] = None) -> None:
        super().__init__()
        self.names = {s for s in leaf_modules if isinstance(s, str)}
        self.types = tuple(s for s in leaf_modules if isinstance(s, type))
        self.example = example
        self.resolved: List[str] = []
        self._env: Optional[fx.Interpreter] = None
        self._evaluating = False  # fx's patched module calls and attribute reads then run for real

    def call_module(self, m: nn.Module, forward, args, kwargs):
        return forward(*args, **kwargs) if self._evaluating else super().call_module(m, forward, args, kwargs)

    def getattr(self, attr: str, attr_val, parameter_proxy_cache):
        return attr_val if self._evaluating else super().getattr(attr, attr_val, parameter_proxy_cache)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return (isinstance(m, LAYER_TYPES + self.types) or module_qualified_name in self.names
                or super().is_leaf_module(m, module_qualified_name))

    def to_bool(self, obj: fx.Proxy) -> bool:
        if self.example is None or not _reads_shapes_only(obj.node):  # data-dependent: no single branch is right
            return super().to_bool(obj)
        value = bool(self._value(obj.node))
        frame = next((f for f in reversed(traceback.extract_stack()[:-1])
                      if not f.filename.startswith(_TORCH_DIR)), None)
        if frame is not None:
            self.resolved.append(f"{os.path.basename(frame.filename)}:{frame.lineno} `{frame.line}` -> {value}")
        return value

    @torch.no_grad()
    def _value(self, target: fx.Node) -> object:
        """Run the graph traced so far on the example, up to ``target`` (eval mode, nothing updated)."""
        if self._env is None:
            self._env = fx.Interpreter(self.root, garbage_collect_values=False, graph=self.graph)
            self._env.args_iter = iter(self.example)
        modes = {m: m.training for m in self.root.modules()}
        self.root.eval()
        self._evaluating = True
        try:
            for node in self.graph.nodes:
                if node not in self._env.env:
                    self._env.env[node] = self._env.run_node(node)
                if node is target:
                    return self._env.env[node]
        finally:
            self._evaluating = False
            for m, mode in modes.items():
                m.training = mode
        raise RuntimeError(f"node {target.name} is not in the graph being traced")


_SHAPE_METHODS = {"size", "dim"}
_SHAPE_ATTRIBUTES = {"shape", "ndim"}


def _reads_shapes_only(node: fx.Node) -> bool:
    """Whether ``node`` depends on tensors only through their shapes (``x.shape[-1] < 7``, ``x.dim() == 4``)."""
    seen, todo = set(), [node]
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        if (n.op == "call_method" and n.target in _SHAPE_METHODS) or (
                n.op == "call_function" and n.target is getattr and n.args[1] in _SHAPE_ATTRIBUTES):
            continue
        if n.op in ("placeholder", "call_module", "get_attr"):
            return False
        todo.extend(n.all_input_nodes)
    return True


def torch_base(module: nn.Module) -> type:
    """The torch.nn class a layer subclasses (itself for torch's own layers)."""
    return next(c for c in type(module).__mro__ if c.__module__.startswith("torch.nn"))


def own_forward(module: nn.Module) -> bool:
    """True for a subclass that overrides its torch base's ``forward``."""
    return type(module).forward is not torch_base(module).forward


@torch.no_grad()
def sliced(module: nn.Module, in_keep: Optional[torch.Tensor], out_keep: Optional[torch.Tensor]) -> nn.Module:
    """A plain torch layer (of ``module``'s base class) holding ``module``'s weights for the kept channels.

    Convs: ungrouped, or depthwise with ``in_keep`` = ``out_keep``; BatchNorm
    keeps ``out_keep``.
    """
    if isinstance(module, nn.Conv2d):
        depthwise = module.groups > 1 and module.groups == module.in_channels == module.out_channels
        if module.groups > 1 and not depthwise:
            raise ValueError(f"cannot slice a grouped {type(module).__name__} ({module.groups} groups) here")
        w = module.weight[out_keep] if out_keep is not None else module.weight
        w = w[:, in_keep] if in_keep is not None and not depthwise else w
        out = nn.Conv2d(int(w.shape[1]) * (w.shape[0] if depthwise else 1), int(w.shape[0]), module.kernel_size,
                        module.stride, module.padding, module.dilation, int(w.shape[0]) if depthwise else 1,
                        module.bias is not None, module.padding_mode)
    elif isinstance(module, nn.Linear):
        w = module.weight[out_keep] if out_keep is not None else module.weight
        w = w[:, in_keep] if in_keep is not None else w
        out = nn.Linear(int(w.shape[1]), int(w.shape[0]), module.bias is not None)
    elif isinstance(module, nn.modules.batchnorm._BatchNorm):
        keep = out_keep if out_keep is not None else torch.ones(module.num_features, dtype=torch.bool)
        out = torch_base(module)(int(keep.sum()), module.eps, module.momentum, module.affine,
                                 module.track_running_stats)
        for name in ("weight", "bias", "running_mean", "running_var"):
            if getattr(module, name, None) is not None:
                getattr(out, name).copy_(getattr(module, name)[keep])
        return out
    else:
        raise TypeError(f"not a layer: {type(module).__name__}")
    out.weight.copy_(w)
    if module.bias is not None:
        out.bias.copy_(module.bias[out_keep] if out_keep is not None else module.bias)
    return out


def adopt_(module: nn.Module, replacement: nn.Module) -> nn.Module:
    """Give ``module`` (a layer subclass) the shape, parameters and buffers of the smaller plain ``replacement``.

    Its class, and so its own ``forward`` (padding, activation, ...), stays.
    """
    for name, param in replacement.named_parameters(recurse=False):
        setattr(module, name, param)
    for name, buf in replacement.named_buffers(recurse=False):
        setattr(module, name, buf)
    for attr in ("in_channels", "out_channels", "groups", "in_features", "out_features", "num_features"):
        if hasattr(replacement, attr):
            setattr(module, attr, getattr(replacement, attr))
    return module


def slices_exactly(module: nn.Module) -> bool:
    """Whether a layer's outputs, sliced to kept channels, equal those of the layer sliced the same way.

    torch's own layers do by construction; a subclass with its own
    ``forward`` is probed once per class on a small random input.
    """
    if not own_forward(module):
        return True
    cls = type(module)
    if cls not in _EXACT:
        try:
            _EXACT[cls] = _probe(module)
        except ValueError:  # a grouped conv: no probe; its class is judged by a later, ungrouped instance
            return False
    return _EXACT[cls]


@torch.no_grad()
def _probe(module: nn.Module) -> bool:
    probe = copy.deepcopy(module).eval()
    if isinstance(module, nn.Conv2d):
        depthwise = module.groups > 1 and module.groups == module.in_channels == module.out_channels
        reach = max((k - 1) * d + 1 for k, d in zip(module.kernel_size, module.dilation))
        x = torch.randn(2, module.in_channels, reach + 4, reach + 4)
        in_keep, out_keep = _drop_one(module.in_channels), _drop_one(module.out_channels)
        if depthwise:
            in_keep = out_keep
    elif isinstance(module, nn.Linear):
        x = torch.randn(2, module.in_features)
        in_keep, out_keep = _drop_one(module.in_features), _drop_one(module.out_features)
    else:
        x = torch.randn(2, module.num_features, 4, 4)
        in_keep = out_keep = _drop_one(module.num_features)
    param = next(probe.parameters(), None)
    x = x.to(param.device if param is not None else "cpu")
    masked = x * in_keep.to(x.device).view(1, -1, *([1] * (x.dim() - 2)))
    want = probe(masked)[:, out_keep]
    got = adopt_(probe, sliced(probe, in_keep, out_keep))(x[:, in_keep])
    return want.shape == got.shape and bool(torch.allclose(want, got, rtol=1e-4, atol=1e-5))


def _drop_one(n: int) -> torch.Tensor:
    keep = torch.ones(n, dtype=torch.bool)
    keep[n // 2] = n == 1
    return keep

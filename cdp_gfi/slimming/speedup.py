"""Physical slimming: NNI's ModelSpeedup, made to work on modern torch and fast.

ModelSpeedup's own tracer fails from torch 2.2 on, so an fx trace is passed
in; its chatter is silenced, and the sparsity figures it computes for every
graph node only to log them (a ``nonzero`` over each batch-8 activation,
a quarter of its time on ResNet-18) are skipped. Its random batch is sized
so that no parameter read in the graph looks batched (``nni_batch_size``).
"""
from __future__ import annotations

import contextlib
import io
import logging
import operator
from typing import Dict, Iterator, List, Optional, Sequence, Tuple
from unittest import mock

import torch
import torch.fx as fx
from torch import nn

from ..flops import keep_vectors
from ..graph.channels import live_channels
from ..graph.leaves import LAYER_TYPES, LeafSpec, adopt_, torch_base
from ..graph.trace import ModelGraph, channel_padding, fx_trace, split_owner, trace
from ..masks.select import with_batchnorm_masks

_QUIET = logging.getLogger("cdp_gfi.slim.nni")
_QUIET.addHandler(logging.NullHandler())
_QUIET.propagate = False


@contextlib.contextmanager
def _silenced() -> Iterator[None]:
    """Mute NNI's per-node log lines and stray prints, and skip the statistics those log lines print."""
    from nni.compression.speedup import model_speedup

    logging.disable(logging.WARNING)
    try:
        with contextlib.redirect_stdout(io.StringIO()), mock.patch.object(model_speedup, "sparsity_stats", _no_stats):
            yield
    finally:
        logging.disable(logging.NOTSET)


def _no_stats(mask: Dict[str, torch.Tensor]) -> str:
    """Stands in for NNI's ``sparsity_stats``, whose only use is the text of a muted log line."""
    return ""


def _subclass_replacer():
    """An NNI replacer for layer subclasses (``Conv2dSame``, ``BatchNormAct2d``, ...): NNI's replacement
    of the torch base class computes the smaller tensors, which the original module then adopts, so
    its own forward (padding, activation, ...) stays. NNI matches replacements by class name alone."""
    from nni.compression.speedup.replacement import replace_module
    from nni.compression.speedup.replacer import Replacer
    from torch.utils._pytree import tree_map

    class SubclassReplacer(Replacer):
        def replace_modules(self, speedup) -> None:
            for node, info in speedup.node_infos.items():
                if node.op != "call_module" or info.replaced:
                    continue
                module = speedup.bound_model.get_submodule(node.target)
                base = torch_base(module).__name__ if isinstance(module, LAYER_TYPES) else None
                if base is None or type(module).__name__ in replace_module or base not in replace_module:
                    continue
                in_masks = tree_map(lambda n: speedup.node_infos[n].output_masks, node.args)
                adopt_(module, replace_module[base](module, (in_masks, info.output_masks, info.param_masks)))
                info.replaced = True

    return SubclassReplacer()


class ChannelRestore(nn.Module):
    """Runs a module written for the full channel set on slimmed input: zero-fill, run, keep live outputs.

    NNI replaces modules but leaves functional calls alone, so an option-A
    shortcut's constant channel padding (``F.pad``) would no longer line up
    with a slimmed residual stream; this wrapper restores it exactly.
    """

    def __init__(self, inner: nn.Module, in_keep: torch.Tensor, out_keep: torch.Tensor):
        super().__init__()
        self.inner = inner
        slot = torch.full((in_keep.numel(),), int(in_keep.sum()), dtype=torch.long)  # last slot: a zero channel
        slot[in_keep] = torch.arange(int(in_keep.sum()))
        self.register_buffer("gather", slot)
        self.register_buffer("keep", torch.nonzero(out_keep).flatten())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        full = torch.cat([x, torch.zeros_like(x[:, :1])], dim=1)[:, self.gather]
        return self.inner(full)[:, self.keep]


def _padding_owners(graph: ModelGraph, masks) -> Dict[str, tuple]:
    """Modules holding a channel-padding call whose input or output channels get pruned: (in, out) keep."""
    live = live_channels(graph, keep_vectors(masks))
    owners = {}
    for node in graph.gm.graph.nodes:
        if not channel_padding(node) or channel_padding(node) == (0, 0):
            continue
        path = next(reversed(node.meta.get("nn_module_stack", {})), None)
        if path is None:
            raise ValueError(f"cannot slim through the functional channel padding {node.name!r} outside a module")
        members = [n for n in graph.gm.graph.nodes if next(reversed(n.meta.get("nn_module_stack", {})), None) == path]
        first = next(a for a in members[0].args if hasattr(a, "op"))
        out_live = [live.get(u) for u in members[-1].users]
        in_keep, out_keep = live.get(first), next((v for v in out_live if v is not None), None)
        if in_keep is None and out_keep is None:
            continue
        n_in, n_out = graph.shape(first)[1], graph.shape(members[-1])[1]
        owners[path] = (in_keep if in_keep is not None else torch.ones(n_in, dtype=torch.bool),
                        out_keep if out_keep is not None else torch.ones(n_out, dtype=torch.bool))
    return owners


def _split_sizes(graph: ModelGraph, masks) -> Dict[Tuple[str, str], List[int]]:
    """The channels each part of a module's ``torch.split`` keeps, by (module, attribute holding the sizes)."""
    live = live_channels(graph, keep_vectors(masks))
    out = {}
    for node in graph.gm.graph.nodes:
        owner = split_owner(graph.model, node)
        vec = live.get(node.args[0]) if owner is not None else None
        if vec is not None:
            ends = torch.tensor(node.args[1]).cumsum(0).tolist()
            out[owner] = [int(vec[end - size:end].sum()) for end, size in zip(ends, node.args[1])]
    return out


def nni_batch_size(gm: fx.GraphModule, at_least: int) -> int:
    """The smallest batch size from ``at_least`` on that divides the size of no tensor the graph reads directly.

    NNI takes any tensor whose size is a multiple of its batch size for a batch of activations, and
    randomises and masks it as one. A parameter used in the forward (a functional LayerNorm's weight,
    ConvNeXt's layer scale: 40 to 320 channels against a batch of 8) was then masked to nothing and NNI
    emptied the whole network (EmptyLayerError).
    """
    read = (operator.attrgetter(n.target)(gm) for n in gm.graph.nodes if n.op == "get_attr")
    sizes = {t.numel() for t in read if torch.is_tensor(t)}
    batch = at_least
    while any(size > batch and size % batch == 0 for size in sizes):
        batch += 1
    return batch


def slim(model: nn.Module, masks: Dict[str, Dict[str, Optional[torch.Tensor]]], dummy_input: torch.Tensor,
         graph: Optional[ModelGraph] = None, batch_size: int = 8, leaf_modules: Sequence[LeafSpec] = ()
         ) -> nn.Module:
    """Remove masked filters (and their BN channels and the next layer's inputs) in place.

    ``model`` must be unwrapped (after a pruner's ``unwrap_model()``) and
    traceable by torch.fx (``leaf_modules``: as for ``graph.trace``; a given
    ``graph`` brings its own). Returns the same, now smaller, module. In eval mode
    its outputs equal those of the masked network (``masks.apply_masks``).
    Only the dummy's shape matters: NNI feeds ``batch_size`` random images
    and treats channels whose outputs do not vary across them as constant, so
    a batch below 8 risks dropping live channels. A reduced resolution (64x64
    for ImageNet nets with adaptive pooling) keeps this fast instead.
    """
    from nni.compression.speedup import ModelSpeedup

    if any("_nni_wrapper" in n for n, _ in model.named_modules()):
        raise ValueError("the model is still wrapped by an NNI pruner: call pruner.unwrap_model() first")
    graph = graph or trace(model, dummy_input, leaf_modules)
    # Copies: ModelSpeedup writes into the mask tensors it is given (scope "all" turned kept-filter rows to ones).
    full_masks = {name: {k: v.clone() if torch.is_tensor(v) else v for k, v in entry.items()}
                  for name, entry in with_batchnorm_masks(graph, masks).items()}
    padding, split_sizes = _padding_owners(graph, masks), _split_sizes(graph, masks)
    was_training = model.training
    gm = fx_trace(model, graph.leaf_modules, dummy_input[:1])
    # NNI restores the graph module's own train flag onto every submodule midway; a fresh
    # GraphModule says "train", and BatchNorm running stats would drift on the random batches.
    gm.eval()
    try:
        with _silenced(), torch.enable_grad():  # NNI propagates sparsity through gradients
            ModelSpeedup(model, dummy_input[:1], full_masks, batch_size=nni_batch_size(gm, batch_size),
                         graph_module=gm,
                         customized_replacers=[_subclass_replacer()], logger=_QUIET).speedup_model()
    finally:
        model.train(was_training)  # NNI's replacement modules are new, hence in train mode
    for (path, attr), sizes in split_sizes.items():
        owner = model.get_submodule(path) if path else model
        setattr(owner, attr, type(getattr(owner, attr))(sizes))
    for path, (in_keep, out_keep) in padding.items():
        parent, _, leaf = path.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, leaf, ChannelRestore(getattr(owner, leaf), in_keep, out_keep))
    return model

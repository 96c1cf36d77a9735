"""MACs and parameters in the two conventions the papers use, dense or as if slimmed.

Dense models are counted through their traced graph (conv + linear MACs;
NNI's ``count_flops_params`` when the model does not trace) or by ptflops
(also BN, ReLU and pooling modules, conv bias). With masks the
count follows the live channels through the traced graph, so it equals
counting the slimmed network without building it: fast enough to search a
FLOPs target over many candidate masks.

``python -m cdp_gfi.flops MODEL_OR_CHECKPOINT [--per-layer]`` prints them
before and after pruning (``main``).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

import pandas as pd
import torch
from torch import nn

from ..files.checkpoint import CheckpointError, load_checkpoint, load_state_dict_strict
from ..files.mask_files import expand_masks
from ..graph.channels import live_channels
from ..graph.trace import ModelGraph, TraceError, is_depthwise, trace
from ..models import CIFAR_MODELS, DATASETS, MODEL_NAMES, build_model, input_size_for

CONVENTIONS = ("conv-linear", "ptflops")
_PTFLOPS_ELEMENTWISE = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.PReLU)
_PTFLOPS_POOLS = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)


def _check_convention(convention: str) -> None:
    if convention not in CONVENTIONS:
        raise ValueError(f"unknown FLOPs convention {convention!r}; choose one of {CONVENTIONS}")


def _dummy(model: nn.Module, input_size: Sequence[int]) -> torch.Tensor:
    p = next(model.parameters())
    return torch.zeros(1, *input_size, device=p.device, dtype=p.dtype)


def count_flops(model: nn.Module, input_size: Sequence[int], convention: str = "conv-linear",
                masks: Optional[Dict[str, Dict[str, torch.Tensor]]] = None) -> Tuple[int, int]:
    """Return ``(macs, params)`` for one image of ``input_size`` (C, H, W).

    With NNI-format ``masks`` the count is that of the slimmed network.
    """
    _check_convention(convention)
    if masks is not None:
        table = layer_table(model, input_size, convention, masks)
        return int(table["macs"].sum()), int(table["params"].sum())
    params = sum(p.numel() for p in model.parameters())
    if convention == "conv-linear":
        try:  # the traced graph's shapes: right for layer subclasses whose forward pads (NNI's counter is not)
            return macs_of(trace(model, _dummy(model, input_size)), {}, convention), params
        except TraceError:
            pass
    was_training = model.training
    model.eval()
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            if convention == "conv-linear":
                from nni.compression.utils.counter import count_flops_params
                macs, _, _ = count_flops_params(model, _dummy(model, input_size), verbose=False)
            else:
                from ptflops import get_model_complexity_info
                attached = set(vars(model))
                macs, _ = get_model_complexity_info(
                    model, tuple(input_size), as_strings=False, print_per_layer_stat=False,
                    backend="pytorch", backend_specific_config={"count_functional": False})
                for name in set(vars(model)) - attached:  # ptflops leaves bound methods: unpicklable
                    delattr(model, name)
    finally:
        model.train(was_training)
    return int(macs), int(params)


def keep_vectors(masks: Dict[str, Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
    """Per-conv boolean kept-filter vectors from NNI-format masks (a filter is kept if any weight is)."""
    out = {}
    for name, m in masks.items():
        w = m.get("weight") if isinstance(m, dict) else None
        if w is not None and w.dim() == 4:
            out[name] = w.detach().reshape(w.shape[0], -1).ne(0).any(dim=1).cpu()
    return out


def layer_table(model: nn.Module, input_size: Sequence[int], convention: str = "conv-linear",
                masks: Optional[Dict[str, Dict[str, torch.Tensor]]] = None,
                graph: Optional[ModelGraph] = None) -> pd.DataFrame:
    """Per-module MACs and parameters, as if slimmed by ``masks`` (dense when None)."""
    _check_convention(convention)
    graph = graph or trace(model, _dummy(model, input_size))
    keep = keep_vectors(masks) if masks else {}
    rows = layer_costs(graph, keep, convention)
    counted = {r["module"] for r in rows}
    for name, mod in model.named_modules():  # parameters of modules the walk does not cost
        if name not in counted and not list(mod.children()):
            n = sum(p.numel() for p in mod.parameters(recurse=False))
            if n:
                rows.append(dict(module=name, type=type(mod).__name__, macs=0, params=n))
    return pd.DataFrame(rows, columns=["module", "type", "macs", "params"])


def macs_of(graph: ModelGraph, keep: Dict[str, torch.Tensor], convention: str = "conv-linear") -> int:
    """Total MACs of the graph with ``keep`` vectors applied: the inner loop of FLOPs targeting."""
    return sum(r["macs"] for r in layer_costs(graph, keep, convention))


def layer_costs(graph: ModelGraph, keep: Dict[str, torch.Tensor], convention: str) -> list:
    """Cost rows (module, type, macs, params) for every costed module call, given live channels."""
    live = live_channels(graph, keep)
    rows = []
    for node in graph.gm.graph.nodes:
        mod = graph.module_of(node)
        if mod is None:
            continue
        src = next((a for a in node.args if hasattr(a, "op")), None)
        in_live = live.get(src) if src is not None else None
        in_shape = graph.shape(src) if src is not None else None
        out_shape = graph.shape(node)
        out_live = live.get(node)
        macs, params = _module_cost(mod, convention, in_shape, out_shape, in_live, out_live)
        if macs is not None:
            rows.append(dict(module=node.target, type=type(mod).__name__, macs=macs, params=params))
    return rows


def _count(vec: Optional[torch.Tensor], full: int) -> int:
    return full if vec is None else int(vec.sum())


@dataclass
class Counted:
    """What the command counts: the dense network, and the pruned one as masks (counted as if slimmed)."""

    title: str
    input_size: Tuple[int, int, int]
    dense: nn.Module
    masks: Optional[Dict[str, Dict[str, torch.Tensor]]] = None

    @property
    def pruned(self) -> bool:
        return self.masks is not None


def _dataset_for(name: str, given: Optional[str], saved: Any) -> str:
    """The data set fixing input size and head: --dataset, else the checkpoint's, else by architecture."""
    if given is not None:
        return given
    if saved in DATASETS:
        return saved
    return "cifar10" if name in CIFAR_MODELS else "imagenet"


def _dense(name: str, dataset: str, num_classes: Optional[int] = None) -> nn.Module:
    return build_model(name, dataset, num_classes).eval()


def _input_size(dataset: str, override: Optional[int]) -> Tuple[int, int, int]:
    size = input_size_for(dataset)
    return size if override is None else (3, override, override)


def counted_from(target: str, dataset: Optional[str] = None, model: Optional[str] = None,
                 input_size: Optional[int] = None) -> Counted:
    """Resolve a model name or a checkpoint file (dense, masks, slim, retrain, prune_cifar's) into a ``Counted``."""
    path = Path(target)
    if not path.is_file():
        if target in MODEL_NAMES:
            ds = _dataset_for(target, dataset, None)
            return Counted(f"{target} on {ds}", _input_size(ds, input_size), _dense(target, ds))
        if path.exists() or path.suffix or os.sep in target:
            raise FileNotFoundError(f"no checkpoint file {target!r}")
        raise ValueError(f"{target!r} is neither a checkpoint file nor a model name ({', '.join(MODEL_NAMES)})")
    return _from_checkpoint(path, dataset, model, input_size)


def _from_checkpoint(path: Path, dataset: Optional[str], model: Optional[str], input_size: Optional[int]
                     ) -> Counted:
    """The ``Counted`` of one checkpoint file; a bare state_dict needs ``model``."""
    ckpt = load_checkpoint(path)
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{str(path)!r} holds a {type(ckpt).__name__}, not a checkpoint")
    kind, args = ckpt.get("kind"), ckpt.get("args") or {}
    name = ckpt.get("model_name") or (ckpt["model"] if isinstance(ckpt.get("model"), str) else None) or model
    if name is None:
        raise CheckpointError(f"{str(path)!r} does not name its architecture (a bare state_dict?): give --model")
    ds = _dataset_for(name, dataset, ckpt.get("dataset", args.get("dataset")))
    dense = _dense(name, ds, ckpt.get("num_classes"))
    route = ckpt.get("route", kind)
    what = f"{name} on {ds}, {kind or 'training'} checkpoint {path}"
    size = _input_size(ds, input_size)
    if route in ("masks", "masked", "slim") and ckpt.get("masks") is not None:  # counted as if slimmed
        return Counted(what, size, dense, masks=expand_masks(dense, ckpt["masks"], source=str(path)))
    load_state_dict_strict(dense, ckpt, what=str(path))
    return Counted(f"{name} on {ds}, dense checkpoint {path}", size, dense)


def human(count: float) -> str:
    """125485696 -> '125.49M'."""
    for scale, unit in ((1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(count) >= scale:
            return f"{count / scale:.2f}{unit}"
    return str(int(count))


def totals_table(counted: Counted, exact: bool = False) -> pd.DataFrame:
    """MACs and parameters per convention: dense, or before and after pruning with reductions in percent."""
    rows = []
    for convention in CONVENTIONS:
        macs0, params0 = count_flops(counted.dense, counted.input_size, convention)
        row = {"convention": convention, "MACs": macs0, "params": params0}
        if counted.pruned:
            macs1, params1 = count_flops(counted.dense, counted.input_size, convention, counted.masks)
            row = {"convention": convention, "MACs before": macs0, "MACs after": macs1,
                   "MACs reduction %": round(100.0 * (1 - macs1 / macs0), 2), "params before": params0,
                   "params after": params1, "params reduction %": round(100.0 * (1 - params1 / params0), 2)}
        rows.append({k: (v if exact or not isinstance(v, int) else human(v)) for k, v in row.items()})
    return pd.DataFrame(rows)


def per_layer_table(counted: Counted, convention: str) -> pd.DataFrame:
    """Per-module MACs and parameters in ``convention``: dense, or before and after side by side."""
    before = layer_table(counted.dense, counted.input_size, convention)
    if not counted.pruned:
        return before
    after = layer_table(counted.dense, counted.input_size, convention, counted.masks)
    merged = before.merge(after[["module", "macs", "params"]], on="module", how="left", suffixes=("_before", "_after"))
    return merged.fillna(0).astype({"macs_after": int, "params_after": int})


def build_parser() -> argparse.ArgumentParser:
    """``python -m cdp_gfi.flops``: MACs and parameters of a model name or a checkpoint."""
    p = argparse.ArgumentParser(prog="python -m cdp_gfi.flops", description=(
        "Print MACs and parameters per image in both conventions (conv+linear, ptflops) of a model, or of a "
        "checkpoint this package writes (dense baseline, masks, slim, retrain, prune_cifar's last/best.pth): "
        "before and after pruning."))
    p.add_argument("target", help="a model name (resnet56, resnet50, ...) or a checkpoint file")
    p.add_argument("--dataset", choices=DATASETS,
                   help="fixes input size and classes (default: the checkpoint's; cifar10 for CIFAR models, "
                        "else imagenet)")
    p.add_argument("--model", help="architecture of a bare state_dict checkpoint")
    p.add_argument("--input-size", type=int, help="input height = width (default 32 for CIFAR/digits, 224)")
    p.add_argument("--per-layer", action="store_true", help="also print the per-module table")
    p.add_argument("--convention", choices=CONVENTIONS, default="conv-linear",
                   help="convention of the per-layer table (default conv-linear)")
    p.add_argument("--exact", action="store_true", help="print exact integers instead of 125.49M")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command; 0 on success, 2 with one ``error:`` line for bad input."""
    args = build_parser().parse_args(argv)
    try:
        counted = counted_from(args.target, args.dataset, args.model, args.input_size)
        totals = totals_table(counted, args.exact)
        layers = per_layer_table(counted, args.convention) if args.per_layer else None
    except (ValueError, OSError, CheckpointError) as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    print(f"{counted.title} (input {'x'.join(map(str, counted.input_size))})")
    print(totals.to_string(index=False))
    if layers is not None:
        print(f"\nPer module ({args.convention})\n{layers.to_string(index=False)}")
    return 0


def _module_cost(mod, convention, in_shape, out_shape, in_live, out_live):
    """(macs, params) of one module call with live channel vectors, or (None, None) if uncosted."""
    ptf = convention == "ptflops"
    if isinstance(mod, nn.Conv2d):
        cin = _count(in_live, mod.in_channels)
        cout = _count(out_live, mod.out_channels)
        # a depthwise conv keeps one input per filter; a grouped one loses inputs evenly per group
        per_group = mod.in_channels // mod.groups if is_depthwise(mod) else cin // mod.groups
        k = mod.kernel_size[0] * mod.kernel_size[1]
        positions = out_shape[2] * out_shape[3]
        macs = positions * k * per_group * cout
        bias = mod.bias is not None
        if ptf and bias:
            macs += positions * cout
        return macs, k * per_group * cout + (cout if bias else 0)
    if isinstance(mod, nn.Linear):
        fin = _count(in_live, mod.in_features)
        bias = mod.bias is not None
        macs = fin * mod.out_features + (mod.out_features if ptf and bias else 0)
        return macs, fin * mod.out_features + (mod.out_features if bias else 0)
    if isinstance(mod, nn.BatchNorm2d):
        c = _count(in_live, mod.num_features)
        spatial = in_shape[2] * in_shape[3]
        affine = 2 if mod.affine else 0
        return ((2 if mod.affine else 1) * c * spatial if ptf else 0), affine * c
    if ptf and isinstance(mod, _PTFLOPS_ELEMENTWISE):
        return _count(out_live, out_shape[1]) * out_shape[2:].numel(), 0
    if ptf and isinstance(mod, _PTFLOPS_POOLS):
        return _count(in_live, in_shape[1]) * in_shape[2:].numel(), 0
    return None, None

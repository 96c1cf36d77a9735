"""CDP/GFI-AP masks next to NNI's own pruners: run L1Norm, FPGM or Taylor, merge masks, measure agreement.

    cdp = CDPPruner(copy.deepcopy(model), config, loader, stop_batch=20)
    _, a = cdp.compress()
    b = nni_masks(model, config, "l1", layers=cdp.layers)  # the same convs, NNI's per-layer L1 ranking
    mask_agreement(a, b)                                    # one row per conv: Jaccard of pruned filters
    slim(model, merge_masks(a, b, "and"), dummy)            # prune what either one prunes

All masks are NNI's ``{conv name: {"weight": 0/1, "bias": 0/1 or None}}``
with whole filters masked. NNI applies ``sparse_ratio`` to each layer; CDP
and GFI-AP rank all layers of an entry together.
"""
from __future__ import annotations

import copy
from typing import Dict, Optional, Sequence

import pandas as pd
import torch
from torch import nn

from ..flops import keep_vectors

Masks = Dict[str, Dict[str, Optional[torch.Tensor]]]
PRUNERS = ("l1", "l2", "fpgm", "taylor")


def _pruner_class(pruner: str):
    """NNI's pruner class for a short name."""
    from nni.compression.pruning import FPGMPruner, L1NormPruner, L2NormPruner, TaylorPruner

    classes = {"l1": L1NormPruner, "l2": L2NormPruner, "fpgm": FPGMPruner, "taylor": TaylorPruner}
    if pruner not in classes:
        raise ValueError(f"unknown NNI pruner {pruner!r}; choose one of {PRUNERS}")
    return classes[pruner]


def nni_masks(model: nn.Module, config_list: Sequence[Dict], pruner: str = "l1", evaluator=None, *,
              layers: Optional[Sequence[str]] = None, training_steps: int = 1) -> Masks:
    """Masks of NNI's own ``pruner`` on a copy of ``model`` (left untouched); ``layers`` narrows every entry.

    Taylor needs an NNI ``TorchEvaluator``; it trains the copy for
    ``training_steps`` batches to gather gradients.
    """
    cls = _pruner_class(pruner)
    if pruner == "taylor" and evaluator is None:
        raise ValueError("the Taylor pruner needs an NNI TorchEvaluator (it trains to collect gradients)")
    config = [dict(entry, op_names=list(layers)) if layers is not None else dict(entry) for entry in config_list]
    work = copy.deepcopy(model)
    args = (evaluator, training_steps) if pruner == "taylor" else ()
    instance = cls(work, config, *args)
    _, masks = instance.compress()
    instance.unwrap_model()
    return {name: _filter_mask(m) for name, m in masks.items() if m.get("weight") is not None}


def _filter_mask(mask: Dict[str, Optional[torch.Tensor]]) -> Dict[str, Optional[torch.Tensor]]:
    """One NNI mask as float 0/1 tensors on the CPU."""
    return {k: (v.detach().float().cpu() if v is not None else None) for k, v in mask.items()}


def _from_keep(keep: torch.Tensor, like: Dict[str, Optional[torch.Tensor]]) -> Dict[str, Optional[torch.Tensor]]:
    """A whole-filter mask for kept-filter vector ``keep``, shaped like the mask ``like``."""
    w = like["weight"]
    k = keep.to(w.device, w.dtype)
    bias = like.get("bias")
    return {"weight": k.view(-1, *[1] * (w.dim() - 1)).expand_as(w).clone(),
            "bias": k.clone() if bias is not None else None}


def merge_masks(a: Masks, b: Masks, how: str = "and") -> Masks:
    """Filter-wise merge: "and" keeps a filter only if both keep it, "or" if either does.

    A layer only one side masks is dense on the other: "and" takes its mask,
    "or" keeps it whole.
    """
    if how not in ("and", "or"):
        raise ValueError(f"how must be 'and' or 'or', got {how!r}")
    ka, kb = keep_vectors(a), keep_vectors(b)
    merged = {}
    for name in list(ka) + [n for n in kb if n not in ka]:
        like = a[name] if name in ka else b[name]
        dense = torch.ones(like["weight"].shape[0], dtype=torch.bool)
        x, y = ka.get(name, dense), kb.get(name, dense)
        if x.shape != y.shape:
            raise ValueError(f"{name}: masks of {x.numel()} and {y.numel()} filters cannot be merged")
        keep = x & y if how == "and" else x | y
        if not keep.any():
            raise ValueError(f"merging with {how!r} removes every filter of {name}")
        merged[name] = _from_keep(keep, like)
    return merged


def mask_agreement(a: Masks, b: Masks) -> pd.DataFrame:
    """Per conv both mask: filters, pruned by each and by both, Jaccard of the pruned sets, share of equal decisions."""
    ka, kb = keep_vectors(a), keep_vectors(b)
    rows = []
    for name in (n for n in ka if n in kb):
        pa, pb = ~ka[name], ~kb[name]
        both, either = int((pa & pb).sum()), int((pa | pb).sum())
        rows.append({"layer": name, "filters": pa.numel(), "pruned_a": int(pa.sum()), "pruned_b": int(pb.sum()),
                     "pruned_both": both, "jaccard": both / either if either else 1.0,
                     "agreement": float((pa == pb).float().mean())})
    return pd.DataFrame(rows, columns=["layer", "filters", "pruned_a", "pruned_b", "pruned_both", "jaccard",
                                       "agreement"])

"""Per-filter importance scores of CDP (TF-IDF) and GFI-AP, as pure functions of statistics.

Formulas and conventions: ALGORITHMS.md. Each function returns
``{conv name: 1-D float tensor}``; CDP also returns its tie-break key (tf).
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import torch

from ..statistics.store import Statistics

METHODS = ("cdp", "gfi")
CDP_MODES = ("classwise", "sample")


def cdp_layer_scores(activations: torch.Tensor, coe: Optional[float] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """TF-IDF scores of one layer's filters from A[c, d] (filters x documents): (score, tf).

    Documents in which no filter fires are left out (the authors' code made
    NaN there); a filter that never fires scores 0.
    """
    a = activations.double()
    if a.dim() != 2:
        raise ValueError(f"activations must be [filters, documents], got shape {tuple(a.shape)}")
    col = a.sum(dim=0)
    a = a[:, col > 0]
    c, d = a.shape
    if d == 0:
        zeros = torch.zeros(c, dtype=torch.float64)
        return zeros.float(), zeros.float()
    b = 1.0 + math.log(c / coe) if coe is not None and coe > 0 else 1.0
    mu = a.mean(dim=1, keepdim=True)
    m = (a >= mu).double()
    n = m.sum(dim=1)
    tf_doc = b * a / a.sum(dim=0, keepdim=True)
    tf = (tf_doc * m).sum(dim=1) / n
    idf = torch.log(d / (n + 1.0))
    score = tf * idf
    dead = a.sum(dim=1) == 0
    score[dead] = 0.0
    tf[dead] = 0.0
    return score.float(), tf.float()


def cdp_document_matrix(stats: Statistics, name: str, mode: str = "classwise") -> torch.Tensor:
    """A[c, d] for one layer: class means (classes absent from the sample left out) or per image."""
    if mode == "classwise":
        stats.require("cdp_class")
        present = stats.class_counts > 0
        means = stats.cdp_class[name][present] / stats.class_counts[present].unsqueeze(1).float()
        return means.t()
    if mode == "sample":
        stats.require("cdp_sample")
        return stats.cdp_sample[name].t()
    raise ValueError(f"unknown cdp_mode {mode!r}; choose one of {CDP_MODES}")


def cdp_scores(stats: Statistics, mode: str = "classwise", coe: Optional[float] = None,
               layers=None) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
    """CDP scores and tf tie-break keys of every layer (or of ``layers``)."""
    layers = list(layers) if layers is not None else list(stats.layers)
    stats.check_layers(layers)
    scores, tfs = {}, {}
    for name in layers:
        scores[name], tfs[name] = cdp_layer_scores(cdp_document_matrix(stats, name, mode), coe)
    return scores, tfs


def gfi_scores(stats: Statistics, layers=None) -> Dict[str, torch.Tensor]:
    """GFI-AP importance I(l,k) = max over sampled classes of mean_hw |class-mean map|."""
    stats.require("gfi")
    layers = list(layers) if layers is not None else list(stats.layers)
    stats.check_layers(layers)
    present = stats.class_counts > 0
    if not present.any():
        raise ValueError("GFI-AP statistics hold no labelled images")
    return {name: stats.gfi[name][present].max(dim=0).values for name in layers}


def statistics_kinds(method: str, cdp_mode: str = "classwise") -> Tuple[str, ...]:
    """Which statistics a method needs."""
    if method == "cdp":
        if cdp_mode not in CDP_MODES:
            raise ValueError(f"unknown cdp_mode {cdp_mode!r}; choose one of {CDP_MODES}")
        return ("cdp_class",) if cdp_mode == "classwise" else ("cdp_sample",)
    if method == "gfi":
        return ("gfi",)
    raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")


def scores_from_statistics(stats: Statistics, method: str, cdp_mode: str = "classwise",
                           coe: Optional[float] = None, layers=None
                           ) -> Tuple[Dict[str, torch.Tensor], Optional[Dict[str, torch.Tensor]]]:
    """(scores, tie-break keys or None) for ``method`` from gathered statistics."""
    statistics_kinds(method, cdp_mode)
    if method == "cdp":
        return cdp_scores(stats, cdp_mode, coe, layers)
    return gfi_scores(stats, layers), None


def compute_scores(model, loader, method: str = "cdp", *, cdp_mode: str = "classwise",
                   coe: Optional[float] = None, layers=None, stop_batch: Optional[int] = None,
                   num_classes: Optional[int] = None, memory_budget_gb: Optional[float] = None,
                   device=None, progress: bool = True) -> Dict[str, torch.Tensor]:
    """Per-filter scores ``{conv name: 1-D tensor}`` of ``method`` over sampled ``loader`` (or NNI evaluator) batches.

    ``layers`` defaults to the block-internal scope (``scope.default_scope``).
    """
    from ..graph.scope import default_scope
    from ..graph.trace import trace
    from ..statistics.collect import _is_evaluator, _split_batch, collect_statistics

    kinds = statistics_kinds(method, cdp_mode)
    dummy = loader.get_dummy_input() if _is_evaluator(loader) else _split_batch(next(iter(loader)))[0]
    if not torch.is_tensor(dummy):
        raise ValueError("give the NNI evaluator a dummy_input tensor: compute_scores traces the model with it")
    if layers is None:
        layers = default_scope(trace(model, dummy[:1]))
    stats = collect_statistics(model, loader, layers, kinds, num_classes=num_classes, stop_batch=stop_batch,
                               memory_budget_gb=memory_budget_gb, device=device, dummy_input=dummy[:1],
                               progress=progress)
    return scores_from_statistics(stats, method, cdp_mode, coe, layers)[0]

"""Making scores of different layers comparable before one global ranking.

Both papers rank every prunable filter of the network in one list, by raw
score. Raw CDP and GFI-AP scores are not on one scale across layers (a
layer's activation magnitude and width set its scores' level), so a global
threshold mostly decides how much each *layer* loses, not which filters.
These transforms act on each layer's (or unit's) scores as a whole and keep
the order within a layer; they are pure functions of the scores (and, for
``cost``, of the MACs one filter costs).

- ``normalize``: ``none`` (published), ``mean`` (divide by the layer's mean
  score), ``max`` (divide by its max), ``rank`` (a filter's rank within its
  layer over the layer's width: every layer loses about the same fraction).
- ``cost_power`` p: divide by (MACs of one filter / mean over layers)^p, so
  an expensive filter must be proportionally more important to stay.
- ``weight_power`` q: multiply each filter's score by its weights' norm^q
  (``graph.readers.filter_weights``: its own norm times that of the weights
  reading its channel). Unlike the two above it reorders filters within a
  layer, so it acts on filters' scores before any of them.
"""
from __future__ import annotations

from typing import Dict, Mapping

import torch

NORMALIZATIONS = ("none", "mean", "max", "rank")
Scores = Dict[str, torch.Tensor]


def normalize(scores: Mapping[str, torch.Tensor], how: str = "none") -> Scores:
    """Each layer's scores rescaled by ``how`` (one of NORMALIZATIONS); the order within a layer is kept."""
    if how not in NORMALIZATIONS:
        raise ValueError(f"unknown score normalization {how!r}; choose one of {NORMALIZATIONS}")
    out: Scores = {}
    for name, s in scores.items():
        s = s.double()
        if how == "mean":
            s = s / s.mean().clamp_min(1e-12)
        elif how == "max":
            s = s / s.max().clamp_min(1e-12)
        elif how == "rank":
            s = (torch.argsort(torch.argsort(s, stable=True)).double() + 1.0) / s.numel()
        out[name] = s.float()
    return out


def cost_weighted(scores: Mapping[str, torch.Tensor], costs: Mapping[str, float], power: float) -> Scores:
    """Scores divided by (cost / mean cost)^power: with power > 0 expensive filters need more importance to stay."""
    if power < 0:
        raise ValueError(f"cost power must be >= 0, got {power}")
    if power == 0:
        return dict(scores)
    mean = sum(costs[n] for n in scores) / max(len(scores), 1)
    return {n: s / (max(costs[n], 1e-12) / mean) ** power for n, s in scores.items()}


def weight_scaled(scores: Mapping[str, torch.Tensor], weights: Mapping[str, torch.Tensor], power: float) -> Scores:
    """Each filter's score times its weight norm^power (``filter_weights``); power 0 leaves the scores as they are."""
    if power < 0:
        raise ValueError(f"weight power must be >= 0, got {power}")
    if power == 0:
        return dict(scores)
    return {n: (s.double() * weights[n].double().clamp_min(0) ** power).float() for n, s in scores.items()}

"""From scores to masks: one global ranking, GFI-AP's adaptive threshold, FLOPs targets.

A selection is ``{conv name: bool tensor of kept filters}``; ``to_nni_masks``
turns it into NNI's ``{name: {'weight': 0/1, 'bias': 0/1 or None}}``.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, List, Mapping, Optional, Tuple, Union

import torch
from torch import nn

from ..flops import keep_vectors, macs_of
from ..graph.channels import batchnorm_keep
from ..graph.groups import Unit
from ..graph.readers import filter_weights
from ..graph.trace import ModelGraph
from ..scores.ranking import cost_weighted, normalize, weight_scaled

Keep = Dict[str, torch.Tensor]
Scores = Dict[str, torch.Tensor]


class LayerEmptiedError(ValueError):
    """A selection would remove every filter of a layer."""


def check_fraction(value: float, what: str) -> float:
    """Return ``value`` if it lies strictly between 0 and 1, else raise naming ``what``."""
    if value is None or not (isinstance(value, (int, float)) and 0.0 < float(value) < 1.0) or math.isnan(value):
        raise ValueError(f"{what} must lie strictly between 0 and 1, got {value!r}")
    return float(value)


def removal_order(scores: Scores, tiebreak: Optional[Scores] = None) -> List[Tuple[str, int]]:
    """All filters, least important first: by score, then tie-break key, then layer order and index."""
    entries = []
    for pos, (name, s) in enumerate(scores.items()):
        t = tiebreak[name] if tiebreak is not None else torch.zeros_like(s)
        for i in range(s.numel()):
            entries.append((float(s[i]), float(t[i]), pos, i, name))
    entries.sort(key=lambda e: e[:4])
    return [(e[4], e[3]) for e in entries]


def _caps(scores: Scores, max_layer_sparsity: Optional[float]) -> Dict[str, int]:
    """Most filters each layer may lose: floor(cap x n), and never all of them."""
    caps = {}
    for name, s in scores.items():
        n = s.numel()
        caps[name] = n if max_layer_sparsity is None else min(n - 1, math.floor(max_layer_sparsity * n))
    return caps


def select_by_count(scores: Scores, n_remove: int, tiebreak: Optional[Scores] = None,
                    max_layer_sparsity: Optional[float] = None,
                    order: Optional[List[Tuple[str, int]]] = None, refill: bool = True) -> Keep:
    """Remove the ``n_remove`` lowest filters of one global ranking (``removal_order``: ties by key, then place).

    With a per-layer cap and ``refill`` (CDP's global rule), a capped layer's
    filters are skipped and the next lowest elsewhere go instead; without
    ``refill`` (the adaptive rule) they simply stay. Without a cap, emptying a
    layer is an error.
    """
    keep = {n: torch.ones(s.numel(), dtype=torch.bool) for n, s in scores.items()}
    caps, lost, removed = _caps(scores, max_layer_sparsity), dict.fromkeys(scores, 0), 0
    order = order or removal_order(scores, tiebreak)
    for name, i in order if refill else order[:n_remove]:
        if removed >= n_remove:
            break
        if lost[name] < caps[name]:
            keep[name][i] = False
            lost[name] += 1
            removed += 1
    if refill and removed < n_remove:
        raise LayerEmptiedError(f"cannot remove {n_remove} filters within the per-layer cap "
                                f"{max_layer_sparsity}; at most {removed} can go")
    _check_not_empty(keep)
    return keep


def select_by_threshold(scores: Scores, fraction: float, max_layer_sparsity: Optional[float] = None) -> Keep:
    """GFI-AP's published threshold: prune every filter scoring <= sorted[floor(p x total)].

    Each layer then loses at most floor(g x n) filters, g = (1 + p) / 2 unless
    ``max_layer_sparsity`` says otherwise (the lowest-scored ones go). Tied
    scores at the threshold all go, so the fraction removed can jump past p.
    """
    everything = torch.cat([s.flatten().float() for s in scores.values()])
    threshold = everything.sort().values[math.floor(fraction * everything.numel())]
    caps = _caps(scores, adaptive_cap(fraction, max_layer_sparsity))
    keep = {}
    for name, s in scores.items():
        below = torch.nonzero(s <= threshold).flatten()
        below = below[torch.argsort(s[below], stable=True)][: caps[name]]
        k = torch.ones(s.numel(), dtype=torch.bool)
        k[below] = False
        keep[name] = k
    return keep


def adaptive_cap(fraction: float, max_layer_sparsity: Optional[float]) -> float:
    """GFI-AP's per-layer cap for pruning fraction p: (1 + p) / 2, unless a cap is given."""
    return (1.0 + fraction) / 2.0 if max_layer_sparsity is None else max_layer_sparsity


def _check_not_empty(keep: Keep) -> None:
    empty = [n for n, k in keep.items() if not k.any()]
    if empty:
        raise LayerEmptiedError(
            f"this sparsity would remove every filter of {empty}; lower it or set a per-layer cap "
            "(max_layer_sparsity / NNI's max_sparse_ratio)")


RULES = ("global", "adaptive", "threshold")


def default_rule(method: str) -> str:
    """Each paper's own selection: CDP one global ranking, GFI-AP its threshold with its cap."""
    return "threshold" if method == "gfi" else "global"


def selector(rule: str, scores: Scores, tiebreak: Optional[Scores] = None,
             max_layer_sparsity: Optional[float] = None) -> Callable[[float], Keep]:
    """A function from pruning fraction p (of prunable filters) to a selection.

    ``global`` removes exactly p of them in one ranking, a capped layer's
    share going elsewhere; ``adaptive`` removes the same lowest p, then GFI-AP's
    per-layer cap (1 + p) / 2 keeps what a layer may not lose; ``threshold`` is
    the paper's GFI-AP: every filter at or below the score at p (all ties),
    then the cap. Ties in ``global`` and ``adaptive`` follow ``removal_order``.
    """
    if rule not in RULES:
        raise ValueError(f"unknown selection rule {rule!r}; choose one of {RULES}")
    total = sum(s.numel() for s in scores.values())
    if rule == "threshold":
        return lambda p: select_by_threshold(scores, p, max_layer_sparsity)
    order = removal_order(scores, tiebreak)
    if rule == "adaptive":
        return lambda p: select_by_count(scores, round(p * total), tiebreak,
                                         adaptive_cap(p, max_layer_sparsity), order, refill=False)
    return lambda p: select_by_count(scores, round(p * total), tiebreak, max_layer_sparsity, order)


def select_for_target(select: Callable[[float], Keep], measure: Callable[[Keep], float], target: float,
                      what: str, tolerance: float = 0.005, emptied_first: bool = False) -> Tuple[Keep, float, float]:
    """Bisect the pruning fraction until ``measure`` (a reduction in [0, 1]) meets ``target`` within ``tolerance``.

    Returns (selection, fraction, achieved). When no fraction gets there, the
    error names the nearest reachable reductions below and above the target;
    with ``emptied_first``, a layer that would lose every filter is the error.
    """
    below = above = emptied = None  # (keep, fraction, reduction) nearest the target from each side
    lo, hi = 0.0, 1.0
    for _ in range(40):
        mid = (lo + hi) / 2
        try:
            keep = select(mid)
        except LayerEmptiedError as err:
            hi, emptied = mid, err
            continue
        red = measure(keep)
        if red > target:
            hi = mid
            if above is None or red < above[2]:
                above = (keep, mid, red)
        else:
            lo = mid
            if below is None or red > below[2]:
                below = (keep, mid, red)
        best = min((c for c in (below, above) if c is not None), key=lambda c: abs(c[2] - target))
        if abs(best[2] - target) < tolerance / 10:
            break
    candidates = [c for c in (below, above) if c is not None]
    best = min(candidates, key=lambda c: abs(c[2] - target)) if candidates else None
    if best is None or abs(best[2] - target) > tolerance:
        reach = [f"{c[2]:.2%} {side}" for c, side in ((below, "below it"), (above, "above it")) if c is not None]
        if emptied_first and emptied is not None and above is None:  # what stopped it: an emptied layer
            raise LayerEmptiedError(f"{emptied} (closest reachable: {', '.join(reach) or 'nothing'})")
        raise ValueError(f"cannot remove {target:.2%} of {what} by pruning these layers (closest reachable: "
                         f"{', '.join(reach) or 'nothing'}); widen the scope, raise the per-layer cap "
                         "(--max_layer_sparsity) or change the target")
    return best


def select_for_flops(select: Callable[[float], Keep], graph: ModelGraph, target: float,
                     convention: str = "conv-linear", tolerance: float = 0.005,
                     fixed: Optional[Keep] = None) -> Tuple[Keep, float, float]:
    """Bisect the pruning fraction until MACs fall by ``target`` (within ``tolerance``).

    Returns (selection, fraction, achieved reduction). ``fixed`` holds
    selections of other layers that stay as they are.
    """
    fixed = fixed or {}
    dense = macs_of(graph, {}, convention)
    return select_for_target(select, lambda keep: 1.0 - macs_of(graph, {**fixed, **keep}, convention) / dense,
                             target, "MACs", tolerance)


def groups_removed(keep: Keep, units: Dict[str, Unit]) -> float:
    """Fraction of the units' channel groups (coupled filters, or single filters) that ``keep`` removes."""
    groups = [g for u in units.values() for g in u.groups]
    return sum(all(not keep[c][k] for c, k in g) for g in groups) / max(len(groups), 1)


def filters_removed(keep: Keep, layers) -> float:
    """Fraction of the filters of ``layers`` that ``keep`` removes."""
    total = sum(keep[n].numel() for n in layers)
    return sum(int((~keep[n]).sum()) for n in layers) / max(total, 1)


def to_nni_masks(model: Union[nn.Module, Mapping[str, nn.Module]], keep: Keep
                 ) -> Dict[str, Dict[str, Optional[torch.Tensor]]]:
    """NNI's masks format: per conv, 0/1 weight mask of the weight's shape and bias mask.

    ``model`` may be a ``{name: module}`` mapping (convs captured before NNI wrapped them).
    """
    modules = model if isinstance(model, Mapping) else dict(model.named_modules())
    masks = {}
    for name, k in keep.items():
        conv = modules[name]
        k = k.to(conv.weight.device)
        w = k.view(-1, 1, 1, 1).expand_as(conv.weight).to(conv.weight.dtype).clone()
        b = k.to(conv.weight.dtype).clone() if conv.bias is not None else None
        masks[name] = {"weight": w, "bias": b}
    return masks


def with_batchnorm_masks(graph: ModelGraph, masks: Dict[str, Dict[str, torch.Tensor]]) -> Dict[str, Dict[str, torch.Tensor]]:
    """Add masks for every BatchNorm reading a pruned channel (after a conv, a depthwise conv or a
    concatenation), so pruned channels are exactly zero.

    The CDP authors left these BNs unmasked: a "pruned" channel then still
    carried BN's shift, and the masked and slimmed networks differed.
    """
    out = dict(masks)
    for bn, k in batchnorm_keep(graph, keep_vectors(masks)).items():
        kf = k.to(graph.modules[bn].weight.device, graph.modules[bn].weight.dtype)
        out[bn] = {"weight": kf.clone(), "bias": kf.clone()}
    return out


@torch.no_grad()
def apply_masks(model: nn.Module, masks: Dict[str, Dict[str, torch.Tensor]], graph: ModelGraph) -> nn.Module:
    """Zero the pruned filters and their BatchNorm channels in place: the masked network."""
    modules = dict(model.named_modules())
    for name, m in with_batchnorm_masks(graph, masks).items():
        mod = modules[name]
        for attr, mask in m.items():
            param = getattr(mod, attr, None)
            if mask is not None and param is not None:
                param.mul_(mask.to(param.device, param.dtype))
    return model


def unit_scores(units: Dict[str, Unit], scores: Scores, tiebreak: Optional[Scores] = None
                ) -> Tuple[Scores, Optional[Scores]]:
    """A coupled group's score (and tie-break key): the mean over its member filters.

    Each member's score is already normalised within its own layer, so the
    mean keeps groups comparable with single filters in one global ranking
    (NNI averages the metrics of a dependency group the same way).
    """
    def mean(table: Scores) -> Scores:
        return {name: torch.stack([torch.stack([table[c][k] for c, k in g]).float().mean() for g in unit.groups])
                for name, unit in units.items()}
    return mean(scores), (mean(tiebreak) if tiebreak is not None else None)


def round_up(units: Dict[str, Unit], keep: Keep, scores: Scores, multiple: int) -> Keep:
    """Keep a multiple of ``multiple`` channels in every conv (or all of them): the best removed groups return.

    Groups that reach the same convs are rounded together, so each conv's
    count is a sum of multiples (a residual stream's first stage reaches every
    later stage's convs, a later stage's own groups only its own).
    """
    out = {}
    for name, unit in units.items():
        k = keep[name].clone()
        parts: Dict[frozenset, List[int]] = {}
        for i, g in enumerate(unit.groups):
            parts.setdefault(frozenset(c for c, _ in g), []).append(i)
        for members in parts.values():
            idx = torch.tensor(members)
            kept = int(k[idx].sum())
            missing = min(len(members), -(-kept // multiple) * multiple) - kept
            removed = idx[~k[idx]]
            k[removed[torch.argsort(scores[name][removed], descending=True, stable=True)][:missing]] = True
        out[name] = k
    return out


def _keep_each_conv(units: Dict[str, Unit], unit_keep: Keep, unit_score: Scores) -> Keep:
    """A conv of a unit (ranked or follower) left with no channel gets its best group back."""
    out = {}
    for name, unit in units.items():
        k = unit_keep[name].clone()
        for groups, _ in unit.members().values():
            if not k[groups].any():
                k[groups[torch.argmax(unit_score[name][groups])]] = True
        out[name] = k
    return out


def expand_units(units: Dict[str, Unit], unit_keep: Keep, sizes: Dict[str, int]) -> Keep:
    """Per-conv kept filters from kept groups; a follower shared by units keeps what all of them keep."""
    keep: Keep = {}
    for name, unit in units.items():
        for conv, k in unit.expand(unit_keep[name], sizes).items():
            keep[conv] = keep[conv] & k if conv in keep else k
    return keep


def group_costs(graph: ModelGraph, units: Dict[str, Unit], sizes: Dict[str, int],
                convention: str = "conv-linear") -> Dict[str, float]:
    """MACs removed with one group of each unit (its filters, their BN channels, the consumers' inputs)."""
    dense = macs_of(graph, {}, convention)
    costs = {}
    for name, unit in units.items():
        keep = torch.ones(len(unit.groups), dtype=torch.bool)
        keep[0] = False
        costs[name] = float(dense - macs_of(graph, unit.expand(keep, sizes), convention))
    return costs


def ranked_unit_scores(units: Dict[str, Unit], scores: Scores, tiebreak: Optional[Scores] = None,
                       graph: Optional[ModelGraph] = None, normalization: str = "none", cost_power: float = 0.0,
                       convention: str = "conv-linear", weight_power: float = 0.0
                       ) -> Tuple[Scores, Optional[Scores]]:
    """Units' group scores as every target ranks them: filters' scores weight-scaled, means over coupled filters,
    normalised, cost-weighted."""
    if weight_power:
        if graph is None:
            raise ValueError("weight_power > 0 needs the model graph to read each filter's weights")
        scores = weight_scaled(scores, filter_weights(graph, list(scores)), weight_power)
    u_scores, u_tie = unit_scores(units, scores, tiebreak)
    u_scores = normalize(u_scores, normalization)
    if cost_power:
        if graph is None:
            raise ValueError("cost_power > 0 needs the model graph to count each filter's MACs")
        sizes = {name: s.numel() for name, s in scores.items()}
        u_scores = cost_weighted(u_scores, group_costs(graph, units, sizes, convention), cost_power)
    return u_scores, u_tie


def select(method: str, scores: Scores, tiebreak: Optional[Scores] = None, *,
           sparsity: Optional[float] = None, flops_reduction: Optional[float] = None,
           graph: Optional[ModelGraph] = None, max_layer_sparsity: Optional[float] = None,
           convention: str = "conv-linear", fixed: Optional[Keep] = None,
           units: Optional[Dict[str, Unit]] = None, round_to: Optional[int] = None,
           normalization: str = "none", cost_power: float = 0.0, rule: Optional[str] = None,
           weight_power: float = 0.0) -> Tuple[Keep, float]:
    """Kept filters per conv for a target: ``sparsity`` (fraction of the ranked filters or groups) or
    ``flops_reduction``. ``units`` couples channels across convs (``groups.coupled_units``); by
    default each conv is its own unit. ``weight_power`` scales filters' scores by their weights' norm;
    ``normalization`` and ``cost_power`` make units' scores comparable before the global ranking
    (``ranking``); ``rule`` is the selection (``RULES``; by default the method's own, ``default_rule``). The
    selection also holds the units' follower convs (depthwise, squeeze-excitation), with the channels they follow. Returns (selection, pruning fraction used).
    """
    if (sparsity is None) == (flops_reduction is None):
        raise ValueError("give exactly one of sparsity and flops_reduction")
    if max_layer_sparsity is not None:
        check_fraction(max_layer_sparsity, "max_layer_sparsity")
    if round_to is not None and (not isinstance(round_to, int) or round_to < 1):
        raise ValueError(f"round_to must be a positive integer, got {round_to!r}")
    sizes = {name: s.numel() for name, s in scores.items()}
    units = units or {n: Unit(convs=[n], groups=[[(n, k)] for k in range(sizes[n])]) for n in scores}
    u_scores, u_tie = ranked_unit_scores(units, scores, tiebreak, graph, normalization, cost_power, convention,
                                         weight_power)
    pick_units = selector(rule or default_rule(method), u_scores, u_tie, max_layer_sparsity)

    def pick(p: float) -> Keep:
        chosen = pick_units(p)
        chosen = _keep_each_conv(units, chosen, u_scores)
        if round_to:
            chosen = round_up(units, chosen, u_scores, round_to)
        return expand_units(units, chosen, sizes)

    if sparsity is not None:
        p = check_fraction(sparsity, "sparsity")
        whole = max(sum(len(u.groups) for u in units.values()), 1)
        keep, used, _ = select_for_target(pick, lambda keep: groups_removed(keep, units), p,
                                          "the ranked filters", max(0.005, 1.0 / whole), emptied_first=True)
        return keep, used
    target = check_fraction(flops_reduction, "flops_reduction")
    if graph is None:
        raise ValueError("a flops_reduction target needs the model graph")
    keep, p, _ = select_for_flops(pick, graph, target, convention, fixed=fixed)
    return keep, p

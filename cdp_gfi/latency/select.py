"""Selection for a latency target: the criterion's ranking cut where the latency falls enough, or a greedy.

Two orders (``ORDERS``). ``ranking``: the criterion's own ranking, exactly as
its MACs target ranks (normalised, MACs-weighted, its rule and caps), cut at
the pruning fraction whose slim network the latency table predicts meets the
target; where latency follows MACs (the CIFAR ResNets on a CPU) this keeps
the accuracy of a MACs target and only moves where the cut lies. ``greedy``:
each step removes a unit's lowest-scored groups down to its next width (one
group, or the next grid width when the curve is flat until there; never
further, so a noisy curve cannot make it overshoot), choosing the move with
the least score lost per second the table says it saves; it reaches
reductions the ranking cannot where latency does not follow MACs
(MobileNetV2 at batch 1). ``auto`` (``auto_order``) takes the greedy for
networks with depthwise convs, or where the table predicts only the greedy
reaches the target, and the ranking otherwise. Within a unit the
criterion's order is kept either way. The slim network is then timed end to
end and the reduction asked of the table corrected (between the nearest
tries on either side) until the measured one is within ``tolerance`` of the
one wanted.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from ..graph.groups import Unit
from ..graph.readers import filter_weights
from ..graph.trace import ModelGraph, is_depthwise
from ..masks.select import (RULES, Keep, LayerEmptiedError, Scores, _keep_each_conv, check_fraction, expand_units,
                            ranked_unit_scores, round_up, selector, to_nni_masks)
from ..scores.ranking import weight_scaled
from ..slimming.speedup import slim
from .table import Curve, LatencyTable, latency_table
from .timing import BenchmarkTimer, Timer, check_batch, hardware_multiple, resolve_device

Move = Tuple[str, int, float]  # (unit, kept groups after the move, seconds saved so far)
Picker = Tuple[Callable[[float], Keep], float]  # (selection for a reduction the table predicts, largest reachable)
ORDERS = ("auto", "ranking", "greedy")


@dataclass
class Try:
    """One round of the correction: the reduction asked of the table, the one measured, what was timed."""

    asked: float
    measured: float
    keep: Keep
    dense: float
    slim: float


@dataclass
class LatencyResult:
    """The selection, the measured reduction it reached, and every (asked, measured) try of the correction."""

    keep: Keep
    measured: float
    dense_seconds: float
    slim_seconds: float
    tries: List[Tuple[float, float]] = field(default_factory=list)
    table: Optional[LatencyTable] = None
    round_to: int = 1  # the channel multiple kept (``round_to``, or the device's: ``timing.hardware_multiple``)
    order: str = "greedy"  # the order that selected (``ORDERS``; ``auto`` resolved)


def removal_path(curves: Dict[str, Curve], costs: Dict[str, np.ndarray], floors: Dict[str, int],
                 adaptive_cap: bool = False) -> List[Move]:
    """The greedy's moves, cheapest score lost per second saved first; ``costs[u]`` in removal order.

    ``adaptive_cap``: GFI-AP's per-layer cap, as its MACs selection applies it: no unit loses more than
    (1 + p) / 2 of its groups, p being the fraction of all groups removed after the move (the cap loosens
    as the path goes on, so a move it blocks may come later)."""
    values = {u: np.interp(np.arange(len(c) + 1), curves[u].widths, curves[u].seconds) for u, c in costs.items()}
    prefix = {u: np.concatenate([[0.0], np.cumsum(c)]) for u, c in costs.items()}
    kept = {u: len(c) for u, c in costs.items()}
    order = {u: i for i, u in enumerate(costs)}
    total, removed = sum(kept.values()), 0

    def allowed(u: str, k2: int) -> bool:
        if k2 < floors[u]:
            return False
        if not adaptive_cap:
            return True
        n, p = len(costs[u]), (removed + kept[u] - k2) / total
        return n - k2 <= math.floor((1.0 + p) / 2.0 * n + 1e-9)

    def next_width(u: str, k: int) -> int:
        """One group less, or, where that saves nothing (a flat stretch), the next grid width below that does:
        never a jump past a width that already saves time (noisy curves made jumps overshoot)."""
        if k < 1 or values[u][k] - values[u][k - 1] > 0:
            return k - 1
        lower = [w for w in curves[u].widths if w < k and values[u][k] - values[u][w] > 0]
        return max(lower) if lower else k - 1

    def best_move(u: str):
        k, n = kept[u], len(costs[u])
        k2 = next_width(u, k)
        gain = values[u][k] - values[u][k2] if k2 >= 0 else 0.0
        if not (gain > 0 and allowed(u, k2)):
            return None
        ratio = float(f"{(prefix[u][n - k2] - prefix[u][n - k]) / gain:.12g}")  # equal up to rounding
        return ratio, order[u], -k2, gain  # ties: the earlier unit

    candidates = {u: best_move(u) for u in costs}
    path, saved = [], 0.0
    while any(m is not None for m in candidates.values()):
        u = min((u for u, m in candidates.items() if m is not None), key=lambda u: candidates[u])
        _, _, neg_k2, gain = candidates[u]
        k2 = -neg_k2
        saved += gain
        removed += kept[u] - k2
        kept[u] = k2
        path.append((u, k2, saved))
        for v in (costs if adaptive_cap else (u,)):  # the cap moved: every unit's best move may have changed
            candidates[v] = best_move(v)
    return path


def kept_for(path: List[Move], sizes: Dict[str, int], seconds: float) -> Dict[str, int]:
    """Kept groups per unit after the fewest moves saving at least ``seconds`` (all moves if none does)."""
    kept, reached = dict(sizes), 0.0
    for u, k, saved in path:
        if reached >= seconds:
            break
        kept[u], reached = k, saved
    return kept


def _removal_order(score: torch.Tensor, tie: Optional[torch.Tensor]) -> List[int]:
    """A unit's groups, least important first (score, tie-break key, index), as the global ranking orders them."""
    t = tie if tie is not None else torch.zeros_like(score)
    return sorted(range(score.numel()), key=lambda i: (float(score[i]), float(t[i]), i))


def _floors(units: Dict[str, Unit], max_layer_sparsity: Optional[float]) -> Dict[str, int]:
    """Fewest groups each unit keeps: at least one, and what the per-layer cap holds back."""
    out = {}
    for name, unit in units.items():
        n = len(unit.groups)
        out[name] = 1 if max_layer_sparsity is None else max(1, n - math.floor(max_layer_sparsity * n))
    return out


def slimmed_copy(model: nn.Module, keep: Keep, dummy_input: torch.Tensor, leaf_modules: Sequence = ()) -> nn.Module:
    """A copy of ``model`` slimmed by ``keep`` (``model`` stays as it is)."""
    twin = copy.deepcopy(model).eval()
    return slim(twin, to_nni_masks(twin, keep), dummy_input[:1], leaf_modules=leaf_modules)


def time_pair(dense: nn.Module, slim_model: nn.Module, example: torch.Tensor, timer: Timer,
              rounds: int = 3) -> Tuple[float, float]:
    """Median seconds of the dense and the slim network, timed in alternation so that load drifts hit both."""
    pairs = [(timer(dense, example), timer(slim_model, example)) for _ in range(rounds)]
    ratios = sorted(range(rounds), key=lambda i: pairs[i][1] / pairs[i][0])
    return pairs[ratios[rounds // 2]]


def greedy_picker(table: LatencyTable, units: Dict[str, Unit], scores: Scores, tiebreak: Optional[Scores],
                  max_layer_sparsity: Optional[float], round_to: Optional[int], normalization: str,
                  rule: str = "global") -> Picker:
    """The greedy's selection for each reduction the table predicts, and the largest reduction it reaches.

    Scores are normalised as the global ranking normalises them, but not weighted by MACs: the greedy's measured
    seconds are the cost (a MACs weight as well would count a filter's cost twice). ``rule`` ``adaptive`` or
    ``threshold`` without ``max_layer_sparsity`` caps units as GFI-AP does."""
    sizes = {name: s.numel() for name, s in scores.items()}
    u_scores, u_tie = ranked_unit_scores(units, scores, tiebreak, normalization=normalization)
    orders = {u: _removal_order(u_scores[u], u_tie[u] if u_tie else None) for u in units}
    floor = min(float(s.min()) for s in u_scores.values())
    costs = {u: np.array([float(u_scores[u][i]) - min(floor, 0.0) for i in orders[u]]) for u in units}
    if rule not in RULES:
        raise ValueError(f"unknown selection rule {rule!r}; choose one of {RULES}")
    path = removal_path(table.curves, costs, _floors(units, max_layer_sparsity),
                        adaptive_cap=rule != "global" and max_layer_sparsity is None)
    n_groups = {u: len(unit.groups) for u, unit in units.items()}

    def pick(predicted: float) -> Keep:
        chosen = {}
        for u, k in kept_for(path, n_groups, predicted * table.dense).items():
            keep = torch.ones(n_groups[u], dtype=torch.bool)
            keep[orders[u][: n_groups[u] - k]] = False
            chosen[u] = keep
        return _finish(units, chosen, u_scores, sizes, round_to)

    return pick, (path[-1][2] / table.dense if path else 0.0)


def ranking_picker(table: LatencyTable, units: Dict[str, Unit], scores: Scores, tiebreak: Optional[Scores],
                   max_layer_sparsity: Optional[float], round_to: Optional[int], normalization: str,
                   rule: str, graph: ModelGraph, cost_power: float = 0.0, steps: int = 30) -> Picker:
    """The criterion's ranking as its MACs target ranks (``masks.select.select``: normalised, MACs-weighted by
    ``cost_power``, ``rule`` and caps), cut at the smallest pruning fraction (bisected, ``steps`` halvings) whose
    selection the table predicts saves the reduction asked; the largest reduction any fraction reaches."""
    sizes = {name: s.numel() for name, s in scores.items()}
    u_scores, u_tie = ranked_unit_scores(units, scores, tiebreak, graph, normalization, cost_power)
    pick_units = selector(rule, u_scores, u_tie, max_layer_sparsity)

    def at(p: float) -> Optional[Tuple[Keep, float]]:
        """The units' selection at fraction ``p`` and the reduction the table predicts; None where p empties one."""
        try:
            chosen = pick_units(p)
        except LayerEmptiedError:
            return None
        saved = sum(table.curves[u].saved(int(k.sum())) for u, k in chosen.items())
        return chosen, saved / table.dense

    p_max, top = 1.0, at(1.0)  # the largest fraction that empties no unit (1.0 with a cap that always keeps one)
    if top is None:
        lo, hi = 0.0, 1.0
        for _ in range(steps):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if at(mid) is not None else (lo, mid)
        p_max, top = lo, at(lo)
    reachable = top[1]

    def pick(predicted: float) -> Keep:
        lo, hi = 0.0, p_max
        for _ in range(steps):
            mid = (lo + hi) / 2
            found = at(mid)
            lo, hi = (mid, hi) if found is not None and found[1] < predicted else (lo, mid)
        return _finish(units, at(hi)[0], u_scores, sizes, round_to)

    return pick, reachable


def _finish(units: Dict[str, Unit], chosen: Keep, u_scores: Scores, sizes: Dict[str, int],
            round_to: Optional[int]) -> Keep:
    """Units' kept groups to kept filters per conv: each conv keeps a channel, widths rounded up to ``round_to``."""
    chosen = _keep_each_conv(units, chosen, u_scores)
    if round_to:
        chosen = round_up(units, chosen, u_scores, round_to)
    return expand_units(units, chosen, sizes)


def select_for_latency(scores: Scores, tiebreak: Optional[Scores] = None, *, reduction: float,
                       model: nn.Module, graph: ModelGraph, units: Dict[str, Unit], dummy_input: torch.Tensor,
                       device: Optional[str] = None, batch: int = 1, timer: Optional[Timer] = None,
                       cache_dir=None, max_layer_sparsity: Optional[float] = None, round_to: Optional[int] = None,
                       normalization: str = "none", tolerance: float = 0.02, max_tries: int = 6, rounds: int = 3,
                       slim_input: Optional[torch.Tensor] = None, rule: str = "global", order: str = "auto",
                       cost_power: float = 0.0, weight_power: float = 0.0) -> LatencyResult:
    """Kept filters per conv (as ``masks.select.select``) whose slim network's measured latency on ``device``
    at ``batch`` is (1 - ``reduction``) of the dense one's, within ``tolerance``.

    ``scores`` are per conv of ``units``; the table is measured once per key and cached in ``cache_dir``.
    Each try times the dense and the slim network ``rounds`` times in alternation (the median ratio counts).
    Kept channels are a multiple of ``round_to``, by default the device's (``timing.hardware_multiple``: 8 on CUDA,
    1 on the CPU). ``order`` (``ORDERS``): ``ranking`` cuts the criterion's ranking (with ``rule`` and
    ``cost_power``, as its MACs target ranks), ``greedy`` spends the budget by score lost per measured second,
    ``auto`` as ``auto_order`` decides (the greedy for depthwise convs). ``rule``
    (``masks.select.RULES``): under the greedy, ``adaptive`` and ``threshold`` without a cap keep GFI-AP's
    per-layer cap (1 + p) / 2 (``removal_path``); within a unit the order is the criterion's either way.
    ``weight_power`` scales filters' scores by their weights' norm first (``scores.ranking.weight_scaled``), for both.
    ``slim_input`` (default ``dummy_input``) is what NNI slims each try with: a smaller one
    (64x64 for nets that pool adaptively) keeps its memory and time down (ResNet-50 at 224x224 took 18 GB).
    """
    check_fraction(reduction, "latency_reduction")
    check_batch(batch)
    check_batch(rounds, "rounds")
    if order not in ORDERS:
        raise ValueError(f"unknown latency order {order!r}; choose one of {ORDERS}")
    if max_layer_sparsity is not None:
        check_fraction(max_layer_sparsity, "max_layer_sparsity")
    dev = resolve_device(device, next(model.parameters()).device)
    round_to = check_batch(round_to, "round_to") if round_to is not None else hardware_multiple(dev)
    timer = timer or BenchmarkTimer()
    dtype = next(model.parameters()).dtype
    example = torch.randn(batch, *dummy_input.shape[1:], device=dev, dtype=dtype)
    table = latency_table(model, graph, units, example, timer, dev, cache_dir)
    if weight_power:
        scores = weight_scaled(scores, filter_weights(graph, list(scores)), weight_power)

    rounding = round_to if round_to > 1 else None
    pickers: Dict[str, Picker] = {}
    if order != "greedy":
        pickers["ranking"] = ranking_picker(table, units, scores, tiebreak, max_layer_sparsity, rounding,
                                            normalization, rule, graph, cost_power)
    if order != "ranking":
        pickers["greedy"] = greedy_picker(table, units, scores, tiebreak, max_layer_sparsity, rounding, normalization,
                                          rule)
    used = auto_order(pickers, reduction, graph) if order == "auto" else order
    pick, reachable = pickers[used]
    dense_model = copy.deepcopy(model).to(dev).eval()
    tries: List[Try] = []
    asked = reduction
    for _ in range(max_tries):
        asked = min(max(asked, 0.0), reachable)
        keep = pick(asked)
        slim_model = slimmed_copy(model, keep, dummy_input if slim_input is None else slim_input,
                                  graph.leaf_modules).to(dev)
        dense, seconds = time_pair(dense_model, slim_model, example, timer, rounds)
        tries.append(Try(asked, 1.0 - seconds / dense, keep, dense, seconds))
        if abs(tries[-1].measured - reduction) <= tolerance:
            break
        if asked >= reachable and tries[-1].measured < reduction:
            break
        asked = next_ask(tries, reduction)
    best = min(tries, key=lambda t: abs(t.measured - reduction))
    if abs(best.measured - reduction) > tolerance:
        if tries[-1].asked < reachable:
            raise ValueError(f"the measured latency reduction did not settle within {100 * tolerance:g} points of "
                             f"{reduction:.2%} in {len(tries)} tries (closest: {best.measured:.2%}): timings on "
                             "this device vary too much; time on a quieter machine or with more rounds")
        raise ValueError(f"cannot cut the measured latency by {reduction:.2%} by pruning these layers (closest "
                         f"reachable: {best.measured:.2%}); widen the scope, raise the per-layer cap "
                         "(--max_layer_sparsity) or change the target")
    return LatencyResult(best.keep, best.measured, best.dense, best.slim, [(t.asked, t.measured) for t in tries],
                         table, round_to, used)


def auto_order(pickers: Dict[str, Picker], reduction: float, graph: ModelGraph) -> str:
    """``auto`` resolved: ``greedy`` for a network with depthwise convs (memory-bound: their time does not follow
    their MACs, so a MACs-weighted ranking spends the budget where little time goes) or where the table predicts
    only the greedy reaches ``reduction``; else ``ranking``, whose accuracy at equal latency is the MACs target's.
    Decided by structure, not by the table's predictions, which carry each unit's timing noise."""
    ranking_reach, greedy_reach = pickers["ranking"][1], pickers["greedy"][1]
    if ranking_reach < reduction <= greedy_reach:
        return "greedy"
    depthwise = any(isinstance(m, nn.Conv2d) and is_depthwise(m) for m in graph.modules.values())
    return "greedy" if depthwise else "ranking"


def next_ask(tries: List[Try], wanted: float) -> float:
    """The next reduction to ask the table for: between the tries measured nearest below and above ``wanted``
    (regula falsi, kept off the ends), else (one side only, or noise broke the order) shifted by the last miss."""
    below = [t for t in tries if t.measured < wanted]
    above = [t for t in tries if t.measured > wanted]
    last = tries[-1]
    if below and above:
        lo, hi = max(below, key=lambda t: t.measured), min(above, key=lambda t: t.measured)
        if lo.asked < hi.asked:
            frac = min(max((wanted - lo.measured) / (hi.measured - lo.measured), 0.1), 0.9)
            return lo.asked + frac * (hi.asked - lo.asked)
    return last.asked + (wanted - last.measured)

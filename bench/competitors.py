"""The other tools of the benchmarks, brought to a MACs target: NNI's L1Norm/FPGM/Taylor, Torch-Pruning, random.

NNI's pruners take one sparse_ratio per layer: a uniform ratio over our default
scope is bisected until conv+linear MACs (counted through the masks) fall by
the target within 0.5 pt, then the masks are slimmed with ``cdp_gfi.slim``.
The L1 layer-normalised row ranks filters' L1 norms over their layer's mean in
one global ranking through our selection. Torch-Pruning (a benchmark-only dependency) prunes coupled groups with its
default ``GroupMagnitudeImportance`` (L2, mean-normalised), globally or per
layer, the ratio bisected the same way; every conv outside our scope and the
classifier are in ``ignored_layers``.
"""
from __future__ import annotations

import copy
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple, TypeVar

import torch
from torch import nn

from cdp_gfi import count_flops, select, slim, to_nni_masks
from cdp_gfi.graph.trace import ModelGraph

T = TypeVar("T")
Masks = Dict[str, Dict[str, Optional[torch.Tensor]]]
NNI_METHODS = ("nni-l1", "nni-fpgm", "nni-taylor")
TOLERANCE = 0.005


def bisect_ratio(make: Callable[[float], T], reduction_of: Callable[[T], float], target: float,
                 steps: int = 16) -> Tuple[T, float, float]:
    """(result, ratio, MACs reduction) of the ratio whose result removes ``target`` of MACs, closest found."""
    lo, hi, best = 0.0, 0.95, None
    for _ in range(steps):
        mid = (lo + hi) / 2
        result = make(mid)
        red = reduction_of(result)
        if best is None or abs(red - target) < abs(best[2] - target):
            best = (result, mid, red)
        if abs(red - target) < TOLERANCE / 2:
            break
        lo, hi = (mid, hi) if red < target else (lo, mid)
    if abs(best[2] - target) > TOLERANCE:
        print(f"warning: closest MACs reduction {best[2]:.2%} for target {target:.0%}", flush=True)
    return best


def _mask_reduction(model: nn.Module, size: Sequence[int]) -> Callable[[Masks], float]:
    dense = count_flops(model, size)[0]
    return lambda masks: 1.0 - count_flops(model, size, masks=masks)[0] / dense


def nni_masks(method: str, model: nn.Module, scope: List[str], ratio: float,
              evaluator_factory: Optional[Callable[[nn.Module], object]] = None) -> Masks:
    """Masks of NNI's pruner for one uniform ``sparse_ratio`` over ``scope`` (the model is left as it was)."""
    from nni.compression.pruning import FPGMPruner, L1NormPruner, TaylorPruner

    work = copy.deepcopy(model)
    config = [{"op_names": list(scope), "op_types": ["Conv2d"], "sparse_ratio": ratio}]
    if method == "nni-taylor":
        pruner = TaylorPruner(work, config, evaluator_factory(work), training_steps=8)
    else:
        pruner = (L1NormPruner if method == "nni-l1" else FPGMPruner)(work, config)
    _, masks = pruner.compress()
    pruner.unwrap_model()
    return {name: {"weight": m["weight"].detach().cpu(), "bias": None} for name, m in masks.items()
            if m.get("weight") is not None}


def taylor_masks_by_ratio(model: nn.Module, scope: List[str],
                          evaluator_factory: Callable[[nn.Module], object]) -> Callable[[float], Masks]:
    """NNI TaylorPruner's masks as a function of the uniform ratio, its gradient batches run once.

    Taylor's metrics do not depend on the ratio; NNI recomputes them on every
    ``compress()``, which made each bisection step re-run its 8 batches.
    """
    from nni.compression.pruning import TaylorPruner
    from nni.compression.pruning.tools import generate_sparsity

    captured: Dict[str, Dict[str, torch.Tensor]] = {}
    modules = dict(model.named_modules())

    class Capturing(TaylorPruner):
        def _calculate_metrics(self, data):
            captured.update(super()._calculate_metrics(data))
            return captured

    work = copy.deepcopy(model)
    pruner = Capturing(work, [{"op_names": list(scope), "op_types": ["Conv2d"], "sparse_ratio": 0.5}],
                       evaluator_factory(work), training_steps=8)
    pruner.compress()
    pruner.unwrap_model()

    def masks(ratio: float) -> Masks:
        for spaces in pruner._target_spaces.values():
            for space in spaces.values():
                if space.sparse_ratio is not None:
                    space.sparse_ratio = float(ratio)
        generated = generate_sparsity(captured, pruner._target_spaces)  # per-filter [C, 1, 1, 1] masks
        return {name: {"weight": m["weight"].detach().cpu().expand_as(modules[name].weight).clone(), "bias": None}
                for name, m in generated.items() if m.get("weight") is not None}
    return masks


def nni_at_macs(method: str, model: nn.Module, scope: List[str], target: float, size: Sequence[int],
                evaluator_factory: Optional[Callable[[nn.Module], object]] = None) -> Tuple[Masks, float, float]:
    """(masks, uniform ratio, MACs reduction) of NNI's ``method`` at the MACs ``target``."""
    if method == "nni-taylor":
        make = taylor_masks_by_ratio(model, scope, evaluator_factory)
    else:
        make = lambda r: nni_masks(method, model, scope, r)  # noqa: E731
    return bisect_ratio(make, _mask_reduction(model, size), target)


def random_masks(model: nn.Module, graph: ModelGraph, scope: Iterable[str], target: float, seed: int) -> Masks:
    """Random scores through ``cdp_gfi.masks.select`` at the MACs ``target``."""
    gen = torch.Generator().manual_seed(seed)
    scores = {n: torch.rand(graph.modules[n].out_channels, generator=gen) for n in scope}
    keep, _ = select("cdp", scores, flops_reduction=target, graph=graph)
    return to_nni_masks(model, keep)


def l1_normalised_masks(model: nn.Module, graph: ModelGraph, scope: Iterable[str], target: float) -> Masks:
    """Filters' L1 norms divided by their layer's mean, one global ranking at the MACs ``target`` (our selection)."""
    modules = dict(model.named_modules())
    scores = {n: modules[n].weight.detach().abs().flatten(1).sum(1) for n in scope}
    keep, _ = select("cdp", scores, flops_reduction=target, graph=graph, normalization="mean", rule="global")
    return to_nni_masks(model, keep)


def slimmed(model: nn.Module, masks: Masks, size: Sequence[int]) -> nn.Module:
    """A slim copy of ``model`` with ``masks`` removed."""
    return slim(copy.deepcopy(model).cpu().eval(), masks, torch.zeros(1, *size))


def tp_pruned(model: nn.Module, scope: Iterable[str], ratio: float, size: Sequence[int],
              global_pruning: bool = True) -> nn.Module:
    """A copy pruned by Torch-Pruning's group magnitude at ``ratio``, global or per layer (groups led by ``scope``)."""
    import torch_pruning as tp

    work = copy.deepcopy(model).cpu().eval()
    keep = set(scope)
    ignored = [m for n, m in work.named_modules() if isinstance(m, nn.Linear) or
               (isinstance(m, nn.Conv2d) and n not in keep)]
    pruner = tp.pruner.MagnitudePruner(work, torch.zeros(1, *size), importance=tp.importance.GroupMagnitudeImportance(),
                                       global_pruning=global_pruning, pruning_ratio=ratio, ignored_layers=ignored)
    pruner.step()
    return work


def tp_at_macs(model: nn.Module, scope: Iterable[str], target: float, size: Sequence[int],
               global_pruning: bool = True) -> Tuple[nn.Module, float, float]:
    """(pruned copy, ratio, MACs reduction) of Torch-Pruning's group magnitude at the MACs ``target``."""
    scope = list(scope)
    dense = count_flops(model, size)[0]
    return bisect_ratio(lambda r: tp_pruned(model, scope, r, size, global_pruning),
                        lambda m: 1.0 - count_flops(m, size)[0] / dense, target)

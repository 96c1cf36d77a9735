"""CDPPruner and GFIPruner: NNI 3.0 pruners driven by sampled feature-map statistics.

Used like NNI's own pruners::

    pruner = CDPPruner(model, [{"op_types": ["Conv2d"], "sparse_ratio": 0.5}], loader, stop_batch=20)
    _, masks = pruner.compress()
    pruner.unwrap_model()
    slim(model, masks, dummy_input)

The data source is a DataLoader or an NNI ``TorchEvaluator`` (its training
loop only feeds batches: nothing trains). ``scope="internal"`` (default)
ranks the block-internal convs both papers prune; ``scope="all"`` ranks every
conv, channels that meet in an addition as one group (``groups.py``).
Config entries select within the scope; each entry is one global ranking.
The criterion variant (``site``, ``normalize``, ``cost_power``, ``weight_power``, ``rule``,
``cdp_mode``, the per-layer cap) defaults to the one shipped for the method;
``published=True`` gives the paper's. ``leaf_modules`` (module classes or
names) are kept whole when the model is traced: a way past a module whose
forward torch.fx cannot trace (its channels are then pinned).
``latency_reduction`` (instead of ``flops_reduction``) targets the slim
network's measured latency on ``latency_device`` at ``latency_batch``
(``latency.select``; ``latency_order`` ``auto``, ``ranking`` or ``greedy``
says how it spends the budget); ``latency_timer`` replaces the benchmark timer.
"""
from __future__ import annotations

import copy
from typing import Dict, List, Optional, Sequence

import torch
from nni.compression.base.compressor import Pruner
from nni.compression.utils.evaluator import Evaluator
from torch import nn

from .graph.scope import follower_convs, prunable_units, resolve_config_list
from .graph.sites import read_points
from .graph.channels import pinned_ops
from .graph.leaves import LeafSpec, torch_base
from .graph.trace import trace
from .latency.select import LatencyResult, select_for_latency
from .latency.timing import Timer, check_batch, resolve_device
from .scores.importance import scores_from_statistics, statistics_kinds
from .statistics.collect import _split_batch, collect_statistics
from .statistics.store import Statistics
from .masks.select import check_fraction, select, to_nni_masks
from .masks.variants import resolve_variant


class _StatisticsPruner(Pruner):
    """Shared machinery: scope, statistics, scores, global selection, NNI masks."""

    method: str = ""

    def __init__(self, model: nn.Module, config_list: List[Dict], data=None, *,
                 dummy_input: Optional[torch.Tensor] = None, stop_batch: Optional[int] = None,
                 statistics: Optional[Statistics] = None, num_classes: Optional[int] = None,
                 flops_reduction: Optional[float] = None, flops_convention: str = "conv-linear",
                 max_layer_sparsity: Optional[float] = None, memory_budget_gb: Optional[float] = None,
                 scope: str = "internal", round_to: Optional[int] = None, published: bool = False,
                 site: Optional[str] = None, normalize: Optional[str] = None, cost_power: Optional[float] = None,
                 rule: Optional[str] = None, weight_power: Optional[float] = None, progress: bool = True,
                 leaf_modules: Sequence[LeafSpec] = (),
                 latency_reduction: Optional[float] = None, latency_device: Optional[str] = None,
                 latency_batch: int = 1, latency_timer: Optional[Timer] = None, latency_order: str = "auto",
                 existed_wrappers=None, **method_options):
        self.data, self.stop_batch, self.statistics = data, stop_batch, statistics
        self.num_classes, self.memory_budget_gb, self.progress = num_classes, memory_budget_gb, progress
        self.flops_reduction, self.flops_convention = flops_reduction, flops_convention
        self.max_layer_sparsity, self.method_options = max_layer_sparsity, method_options
        self.round_to = round_to
        self.latency_reduction, self.latency_device = latency_reduction, latency_device
        self.latency_batch, self.latency_timer, self.latency_order = latency_batch, latency_timer, latency_order
        self.latency: Optional[LatencyResult] = None
        self.variant = resolve_variant(self.method, published, site, normalize, cost_power, rule,
                                       method_options.pop("cdp_mode", None), weight_power=weight_power)
        statistics_kinds(self.method, self.variant.cdp_mode)
        if data is None and statistics is None:
            raise ValueError(f"{type(self).__name__} needs data (a DataLoader or an NNI evaluator) "
                             "or precomputed statistics")
        self.dummy_input = self._dummy(dummy_input, data)
        self.graph = trace(model, self.dummy_input, leaf_modules)
        self.units = prunable_units(self.graph, scope)
        self.groups = resolve_config_list(model, config_list, self.units, pinned_ops(self.graph))
        self._check_targets()
        self._convs = {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
        _register_subclasses(self._convs.values())
        nni_config = [{"op_names": self._convs_of(g.names) + follower_convs({n: self.units[n] for n in g.names}),
                       "sparse_ratio": g.sparse_ratio or 0.0} for g in self.groups]
        super().__init__(model, nni_config, data if isinstance(data, Evaluator) else None, existed_wrappers)
        self.scores: Dict[str, torch.Tensor] = {}
        self.keep: Dict[str, torch.Tensor] = {}

    @staticmethod
    def _dummy(dummy_input, data) -> torch.Tensor:
        if dummy_input is not None:
            return dummy_input[:1]
        if isinstance(data, Evaluator):
            dummy = data.get_dummy_input()
            if torch.is_tensor(dummy):
                return dummy[:1]
            raise ValueError("pass dummy_input= (or give the TorchEvaluator a dummy_input) to trace the model")
        if data is None:
            raise ValueError("pass dummy_input= when pruning from precomputed statistics")
        x, _ = _split_batch(next(iter(data)))
        return x[:1]

    def _check_targets(self) -> None:
        """One target: ``sparse_ratio`` per entry, or ``flops_reduction`` (keyword, or key of a one-entry list), or
        ``latency_reduction`` (keyword)."""
        keyed = [g.flops_reduction for g in self.groups if g.flops_reduction is not None]
        if keyed and self.flops_reduction is not None and keyed[0] != self.flops_reduction:
            raise ValueError(f"flops_reduction is {self.flops_reduction} as the pruner keyword but {keyed[0]} in "
                             "config_list: give it once")
        self.flops_reduction = keyed[0] if keyed else self.flops_reduction
        if self.latency_reduction is not None:
            if self.flops_reduction is not None:
                raise ValueError("give latency_reduction or flops_reduction, not both: they are two targets")
            check_fraction(self.latency_reduction, "latency_reduction")
            resolve_device(self.latency_device, torch.device("cpu"))  # a device that is not there stops here
            check_batch(self.latency_batch)
            if len(self.groups) != 1:
                raise ValueError("a latency_reduction target takes a config_list with one entry")
            return
        if self.flops_reduction is not None:
            check_fraction(self.flops_reduction, "flops_reduction")
            if len(self.groups) != 1:
                raise ValueError("a flops_reduction target (the pruner keyword or a config_list key) takes a "
                                 "config_list with one entry: MACs are removed by one global ranking")
            if keyed and self.groups[0].sparse_ratio is not None:
                raise ValueError("give sparse_ratio (fraction of filters) or flops_reduction (fraction of MACs) in a "
                                 "config_list entry, not both")
            return  # the keyword wins over the entry's sparse_ratio, which then only selects modules (as before)
        for g in self.groups:
            if g.sparse_ratio is None:
                raise ValueError(f"the config_list entry selecting {g.names[:3]} sets no target: give it sparse_ratio "
                                 "(fraction of filters removed) or flops_reduction (fraction of MACs removed; also "
                                 "the pruner keyword flops_reduction=)")
            check_fraction(g.sparse_ratio, f"sparse_ratio of the entry selecting {g.names[:3]}")

    def _convs_of(self, unit_names: List[str]) -> List[str]:
        return [c for u in unit_names for c in self.units[u].convs]

    @property
    def layers(self) -> List[str]:
        """The convs this pruner ranks, in model order of their units."""
        return self._convs_of([n for g in self.groups for n in g.names])

    def collect(self) -> Statistics:
        """Gather the statistics this method needs over the data (unwrapped model, eval, no_grad)."""
        kinds = statistics_kinds(self.method, self.variant.cdp_mode)
        wrapped = self._is_wrapped
        if wrapped:
            self.unwrap_model()
        try:
            return collect_statistics(
                self.bound_model, self.data, self.layers, kinds, num_classes=self.num_classes,
                stop_batch=self.stop_batch, memory_budget_gb=self.memory_budget_gb,
                dummy_input=self.dummy_input, progress=self.progress,
                read_at=read_points(self.graph, self.layers, self.variant.site))
        finally:
            if wrapped:
                self.wrap_model()

    def _single_compress(self, max_steps: Optional[int], max_epochs: Optional[int]) -> None:
        if self.statistics is None:
            self.statistics = self.collect()
        self.statistics.check_model(self._convs)
        self.statistics.check_layers(self.layers)
        scores, tiebreak = scores_from_statistics(self.statistics, self.method, layers=self.layers,
                                                  cdp_mode=self.variant.cdp_mode, **self.method_options)
        self.scores, self.keep = scores, {}
        for g in self.groups:
            convs = self._convs_of(g.names)
            part = {n: scores[n] for n in convs}
            tie = {n: tiebreak[n] for n in convs} if tiebreak else None
            caps = (self.max_layer_sparsity, g.max_sparse_ratio, self.variant.max_layer_sparsity)
            cap = next((c for c in caps if c is not None), None)  # explicit, then NNI's config, then the variant
            if self.latency_reduction is not None:
                self.keep.update(self._select_for_latency(part, tie, {n: self.units[n] for n in g.names}, cap))
                continue
            keep, _ = select(self.method, part, tie, sparsity=None if self.flops_reduction else g.sparse_ratio,
                             flops_reduction=self.flops_reduction, graph=self.graph,
                             max_layer_sparsity=cap, convention=self.flops_convention,
                             units={n: self.units[n] for n in g.names}, round_to=self.round_to,
                             normalization=self.variant.normalize, cost_power=self.variant.cost_power,
                             rule=self.variant.rule, weight_power=self.variant.weight_power)
            self.keep.update(keep)
        self.update_masks(to_nni_masks(self._convs, self.keep))

    def _select_for_latency(self, scores, tiebreak, units, cap) -> Dict[str, torch.Tensor]:
        """The latency target's selection, timed on an unwrapped copy of the model."""
        wrapped = self._is_wrapped
        if wrapped:
            self.unwrap_model()
        try:
            model = copy.deepcopy(self.bound_model)
        finally:
            if wrapped:
                self.wrap_model()
        self.latency = select_for_latency(
            scores, tiebreak, reduction=self.latency_reduction, model=model, graph=self.graph, units=units,
            dummy_input=self.dummy_input, device=self.latency_device, batch=self.latency_batch,
            timer=self.latency_timer, max_layer_sparsity=cap, round_to=self.round_to,
            normalization=self.variant.normalize, rule=self.variant.rule, order=self.latency_order,
            cost_power=self.variant.cost_power, weight_power=self.variant.weight_power)
        return self.latency.keep

    def compress(self, max_steps: Optional[int] = None, max_epochs: Optional[int] = None):
        """Gather statistics (unless given), score, select; returns ``(model, masks)`` as NNI does."""
        return super().compress(max_steps, max_epochs)


def _register_subclasses(modules) -> None:
    """Give NNI's pruning settings (looked up by class name) each conv subclass the settings of its base."""
    from nni.compression.base.setting import PruningSetting

    for mod in modules:
        name, base = type(mod).__name__, torch_base(mod).__name__
        if name not in PruningSetting.registry and base in PruningSetting.registry:
            PruningSetting.register(name, PruningSetting.registry[base])


class CDPPruner(_StatisticsPruner):
    """CDP (Xu et al., ACM MM 2021): TF-IDF class-wise discriminative power of each filter.

    Options: ``cdp_mode`` ("classwise", the paper's; or "sample", the
    authors' code), ``coe`` (layer rescaling b = 1 + ln(C / coe); None: b = 1).
    """

    method = "cdp"

    def __init__(self, model: nn.Module, config_list: List[Dict], data=None, *,
                 cdp_mode: Optional[str] = None, coe: Optional[float] = None, **kwargs):
        super().__init__(model, config_list, data, cdp_mode=cdp_mode, coe=coe, **kwargs)


class GFIPruner(_StatisticsPruner):
    """GFI-AP (Mondal et al., CVIU 2022): global filter importance, adaptive global threshold.

    The fraction p comes from ``sparse_ratio``; each layer loses at most
    floor((1 + p) / 2 x n) filters unless ``max_layer_sparsity`` says otherwise.
    """

    method = "gfi"

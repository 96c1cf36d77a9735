"""Which convs a run prunes: block-internal ones (default) or all with coupled groups, narrowed by NNI config lists."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

from torch import nn

from .groups import Unit, coupled_units, internal_units
from .trace import ModelGraph

SCOPES = ("internal", "all")


@dataclass
class PruneGroup:
    """Units ranked together, with the fraction of their filters (or coupled groups) to remove."""

    names: List[str]
    sparse_ratio: Optional[float]
    max_sparse_ratio: Optional[float] = None
    flops_reduction: Optional[float] = None


def default_scope(graph: ModelGraph) -> List[str]:
    """Convs both papers prune: CIFAR basic-block conv1, bottleneck conv1/conv2, every VGG conv,
    MobileNetV2's expansions (their depthwise partners follow)."""
    return list(internal_units(graph))


def prunable_units(graph: ModelGraph, scope: str = "internal") -> Dict[str, Unit]:
    """Units of a scope: each block-internal conv alone ("internal"), or every conv in coupled groups ("all")."""
    if scope == "internal":
        return internal_units(graph)
    if scope == "all":
        return coupled_units(graph)
    raise ValueError(f"unknown scope {scope!r}; choose one of {SCOPES}")


def unit_convs(units: Dict[str, Unit]) -> List[str]:
    """Every ranked conv of the units, unit by unit: the layers whose statistics a run needs."""
    return [c for unit in units.values() for c in unit.convs]


def follower_convs(units: Dict[str, Unit]) -> List[str]:
    """Convs whose filters follow the units' channels (depthwise, squeeze-excitation): masked, never ranked."""
    return list(dict.fromkeys(c for unit in units.values() for c in unit.follower_widths))


def resolve_config_list(model: nn.Module, config_list: Sequence[Dict], units: Dict[str, Unit],
                        why_none: str = "") -> List[PruneGroup]:
    """Turn NNI config entries into groups of in-scope units (model order), one global ranking each.

    A unit belongs to the first entry that selects every one of its convs; ``op_types`` ``Conv2d``
    selects its subclasses too. Besides NNI's keys (``sparse_ratio``, ``max_sparse_ratio``, legacy
    ``sparsity``) an entry may set the pruners' ``flops_reduction`` and ``max_layer_sparsity``.
    ``why_none`` says why no unit exists, for the error when none does.
    """
    from nni.compression.base.config import select_modules_by_config, trans_legacy_config_list

    if not isinstance(config_list, (list, tuple)) or not config_list:
        raise ValueError("config_list must be a non-empty list of dicts, e.g. "
                         "[{'op_types': ['Conv2d'], 'sparse_ratio': 0.5}]")
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    groups, taken = [], set()
    for idx, entry in enumerate(trans_legacy_config_list([dict(c) for c in config_list])):
        if not isinstance(entry, dict) or not ({"op_types", "op_names", "op_names_re"} & set(entry)):
            raise ValueError(f"config_list[{idx}] must select modules with op_types, op_names or op_names_re")
        selected, _, _ = select_modules_by_config(model, _with_subclasses(model, entry))
        names = sorted((n for n, u in units.items() if set(u.convs) <= set(selected) and n not in taken),
                       key=order.__getitem__)
        if not names:
            scope = list(units)
            listed = f"the prunable ones are: {scope[:6]}{' ...' if len(scope) > 6 else ''}" if scope else \
                f"no conv is prunable in this model{f' ({why_none})' if why_none else ''}"
            raise ValueError(f"config_list[{idx}] ({entry}) matches no prunable conv; {listed}")
        taken.update(names)
        groups.append(PruneGroup(names, entry_setting(entry, "sparse_ratio"),
                                 entry_setting(entry, "max_sparse_ratio", "max_layer_sparsity"),
                                 entry.get("flops_reduction")))
    return groups


def _with_subclasses(model: nn.Module, entry: Dict) -> Dict:
    """``entry`` with the class names of the model's subclasses of its ``op_types`` added (NNI matches names)."""
    types = entry.get("op_types")
    if not types:
        return entry
    extra = {type(m).__name__ for m in model.modules() if any(c.__name__ in types for c in type(m).__mro__)}
    return {**entry, "op_types": list(dict.fromkeys([*types, *sorted(extra)]))}


def entry_setting(entry: Dict, *keys: str) -> Optional[float]:
    """The first of ``keys`` a config entry sets, at its top level or in NNI's ``target_settings`` of the weight
    (where NNI puts a legacy ``sparsity`` / ``max_sparsity_per_layer``); None when it sets none."""
    weight = (entry.get("target_settings") or {}).get("weight") or {}
    for key in keys:
        for where in (entry, weight):
            if where.get(key) is not None:
                return where[key]
    return None

"""The published CDP and GFI-AP, and the variants this package ships as defaults.

A variant keeps its paper's criterion (CDP: TF-IDF of sampled activations and
labels; GFI-AP: max over classes of mean |class-mean map|) and changes three
things around it, each a named option (docs/algorithms.md has the numbers):

- ``site``: where feature maps are read (``sites.SITES``; published ``conv``);
- ``normalize``: how each layer's scores are rescaled before the one global
  ranking (``ranking.NORMALIZATIONS``; published ``none``);
- ``cost_power``: how much a filter's MACs count against it (published 0);
- ``weight_power``: how much a filter's weights (its own norm times the norm
  of the weights that read its channel) count for it (published 0);
- ``rule``: the selection (``masks.RULES``): CDP's one global ranking,
  GFI-AP's per-layer cap on the same exact ranking (``adaptive``), or the
  paper's GFI-AP threshold, every tie at it included (``threshold``);
- ``cdp_mode``: CDP's documents, classes (the paper) or images (its code);
- ``max_layer_sparsity``: the most of its filters one layer may lose (None:
  no cap for the global rule, GFI-AP's (1 + p) / 2 for the other two).

``published=True`` selects the papers' definitions; options given explicitly
override either preset.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

from ..graph.sites import SITES
from ..scores.importance import CDP_MODES
from ..scores.ranking import NORMALIZATIONS
from .select import RULES, check_fraction


@dataclass(frozen=True)
class Variant:
    """Where statistics are read, how layers' scores are normalised, how MACs weigh in."""

    site: str = "conv"
    normalize: str = "none"
    cost_power: float = 0.0
    rule: str = "global"
    cdp_mode: str = "classwise"
    max_layer_sparsity: Optional[float] = None
    weight_power: float = 0.0

    def label(self, method: str) -> str:
        """A short name such as ``cdp[sample,input,mean,cost0.5,adaptive]``; ``cdp[published]`` for the paper's."""
        name = "gfi-ap" if method == "gfi" else method
        if self == PUBLISHED[method]:
            return f"{name}[published]"
        docs = f"{self.cdp_mode}," if method == "cdp" else ""
        cap = f",cap{self.max_layer_sparsity:g}" if self.max_layer_sparsity is not None else ""
        weight = f",weight{self.weight_power:g}" if self.weight_power else ""
        return f"{name}[{docs}{self.site},{self.normalize},cost{self.cost_power:g},{self.rule}{cap}{weight}]"


PUBLISHED: Dict[str, Variant] = {"cdp": Variant(), "gfi": Variant(rule="threshold")}
DEFAULTS: Dict[str, Variant] = {"cdp": Variant("input", "mean", 1.0, "adaptive", "sample", 0.6, weight_power=2.0),
                                "gfi": Variant("input", "mean", 0.5, "adaptive", weight_power=2.0)}


def resolve_variant(method: str, published: bool = False, site: Optional[str] = None,
                    normalize: Optional[str] = None, cost_power: Optional[float] = None,
                    rule: Optional[str] = None, cdp_mode: Optional[str] = None,
                    max_layer_sparsity: Optional[float] = None, weight_power: Optional[float] = None) -> Variant:
    """The variant a run uses: the published or default preset of ``method``, with explicit options on top."""
    presets = PUBLISHED if published else DEFAULTS
    if method not in presets:
        raise ValueError(f"unknown method {method!r}; choose one of {tuple(presets)}")
    base = presets[method]
    variant = Variant(site if site is not None else base.site,
                      normalize if normalize is not None else base.normalize,
                      float(cost_power) if cost_power is not None else base.cost_power,
                      rule if rule is not None else base.rule,
                      cdp_mode if cdp_mode is not None else base.cdp_mode,
                      max_layer_sparsity if max_layer_sparsity is not None else base.max_layer_sparsity,
                      float(weight_power) if weight_power is not None else base.weight_power)
    if variant.site not in SITES:
        raise ValueError(f"--site must be one of {SITES}, got {variant.site!r}")
    if variant.normalize not in NORMALIZATIONS:
        raise ValueError(f"--normalize must be one of {NORMALIZATIONS}, got {variant.normalize!r}")
    if not variant.cost_power >= 0:
        raise ValueError(f"--cost_power must be >= 0, got {variant.cost_power}")
    if not variant.weight_power >= 0:
        raise ValueError(f"--weight_power must be >= 0, got {variant.weight_power}")
    if variant.rule not in RULES:
        raise ValueError(f"--rule must be one of {RULES}, got {variant.rule!r}")
    if variant.max_layer_sparsity is not None:
        check_fraction(variant.max_layer_sparsity, "--max_layer_sparsity")
    if variant.cdp_mode not in CDP_MODES:
        raise ValueError(f"unknown cdp_mode {variant.cdp_mode!r}; choose one of {CDP_MODES}")
    return variant


@dataclass(frozen=True)
class CriterionOptions:
    """The criterion settings every run takes (scripts' flags); None means the method's preset."""

    method: str = "cdp"
    scope: str = "internal"
    round_to: Optional[int] = None
    cdp_mode: Optional[str] = None
    coe: Optional[float] = None
    published: bool = False
    site: Optional[str] = None
    normalize: Optional[str] = None
    cost_power: Optional[float] = None
    rule: Optional[str] = None
    max_layer_sparsity: Optional[float] = None
    weight_power: Optional[float] = None

    def variant(self) -> Variant:
        """The variant these options select: the published or default preset, explicit options on top."""
        return resolve_variant(self.method, self.published, self.site, self.normalize, self.cost_power,
                               self.rule, self.cdp_mode, self.max_layer_sparsity, self.weight_power)

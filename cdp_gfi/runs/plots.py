"""The figures researchers compare pruning tools by, as PNG files (matplotlib, no display needed).

- ``plot_pruning_effect``: a sweep's effect against the requested targets,
  GFI-AP style (threshold, MACs and parameters retained, accuracy after
  pruning, after BatchNorm re-estimation and after fine-tuning, seconds per
  point; constant panels left out);
- ``plot_kept_filters``: filters kept of each pruned layer of one run;
- ``plot_accuracy_vs_macs``: accuracy against MACs for several methods.

Each returns its ``Figure`` (and saves it when given a path), so callers and
tests can inspect axes, labels and data.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import pandas as pd
from matplotlib.figure import Figure

PathLike = Union[str, Path]
# (sweep.csv column or computed series, y label) per panel of the pruning-effect figure
EFFECT_PANELS = (
    ("threshold", "score threshold"),
    ("macs_retained_pct", "MACs retained (%)"),
    ("params_retained_pct", "parameters retained (%)"),
    ("pruned_top1_before_finetune", "top-1 after pruning (%)"),
    ("pruned_top1_recalibrated", "top-1 after BN re-estimation (%)"),
    ("pruned_top1", "top-1 after fine-tuning (%)"),
    ("point_time_s", "time per point (s)"),
)
# x label per sweep target: the requested values, as the user typed them
TARGET_LABELS = {"sparsity": "requested sparsity (fraction of filters removed)",
                 "flops_reduction": "requested MACs reduction (fraction)",
                 "latency_reduction": "requested latency reduction (fraction)"}


def _save(figure: Figure, path: Optional[PathLike]) -> Figure:
    """Write ``figure`` as PNG to ``path`` (folders created) when one is given."""
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path, dpi=120)
    return figure


def varies(values: pd.Series) -> bool:
    """Whether a panel of ``values`` would show anything: at least two distinct values that are not NaN."""
    return values.dropna().nunique() > 1


def plot_pruning_effect(sweep: pd.DataFrame, path: Optional[PathLike] = None, title: str = "Pruning effect",
                        target: str = "sparsity") -> Figure:
    """Panels against the requested ``target`` (a key of ``TARGET_LABELS``), one point per row of
    ``sweep`` (``sweep.csv``); a panel whose values do not vary (or are missing) is left out."""
    frame = sweep.assign(macs_retained_pct=100.0 - sweep["macs_reduction_pct"],
                         params_retained_pct=100.0 - sweep["params_reduction_pct"]).sort_values(target)
    panels = [(column, label) for column, label in EFFECT_PANELS if column in frame and varies(frame[column])]
    columns = min(3, max(1, len(panels)))
    rows = max(1, -(-len(panels) // columns))
    figure = Figure(figsize=(4 * columns, 3.5 * rows), layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False).flat
    for (column, label), ax in zip(panels, axes):  # panels first: zip takes no axis beyond the last panel
        ax.plot(frame[target], frame[column], marker="o")
        ax.set_xlabel(TARGET_LABELS[target])
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    for ax in list(axes):
        figure.delaxes(ax)
    figure.suptitle(title)
    return _save(figure, path)


def plot_kept_filters(layers: pd.DataFrame, path: Optional[PathLike] = None, title: str = "Filters kept per layer"
                      ) -> Figure:
    """Bars of filters before (light) and kept (dark) for each pruned layer of ``layers.csv``."""
    figure = Figure(figsize=(max(6.0, 0.35 * len(layers) + 2), 4.5), layout="constrained")
    ax = figure.subplots()
    positions = range(len(layers))
    ax.bar(positions, layers["total"], color="lightgray", label="before")
    ax.bar(positions, layers["kept"], color="tab:blue", label="kept")
    ax.set_xticks(list(positions), layers["layer"], rotation=90, fontsize=7)
    ax.set_xlabel("layer")
    ax.set_ylabel("filters")
    ax.set_title(title)
    ax.legend()
    return _save(figure, path)


def plot_accuracy_vs_macs(results: pd.DataFrame, path: Optional[PathLike] = None,
                          title: str = "Accuracy vs MACs", baseline: Optional[float] = None) -> Figure:
    """One line per ``method``: mean ``top1`` against ``macs_m`` (MMACs), with ``top1_std`` error bars if given."""
    figure = Figure(figsize=(7, 5), layout="constrained")
    ax = figure.subplots()
    for method, group in results.sort_values("macs_m").groupby("method", sort=False):
        spread = group["top1_std"] if "top1_std" in group else None
        ax.errorbar(group["macs_m"], group["top1"], yerr=spread, marker="o", capsize=3, label=method)
    if baseline is not None:
        ax.axhline(baseline, color="gray", linestyle="--", label="baseline")
    ax.set_xlabel("MACs (M, conv + linear)")
    ax.set_ylabel("top-1 (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(figure, path)

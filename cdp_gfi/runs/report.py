"""What a pruning run reports: kept filters per layer, MACs and parameters before/after, and the run summary.

Tables go to stdout and to CSV (pandas); the summary to ``summary.json`` and a
one-row ``summary.csv``; the result, rounded, to one printed line (``result_line``).
MACs are counted in both conventions of ``flops``:
conv + linear (the papers' "FLOPs") and ptflops (GFI-AP's).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Sequence, Tuple

import pandas as pd
import torch
from torch import nn

from ..files.checkpoint import PathLike, atomic_open
from ..flops import CONVENTIONS, count_flops, human

Costs = Dict[str, Tuple[int, int]]  # convention -> (MACs, params)


def kept_table(keep: Mapping[str, torch.Tensor]) -> pd.DataFrame:
    """One row per pruned conv: filters kept, filters before, percentage removed."""
    rows = [{"layer": name, "kept": int(k.sum()), "total": k.numel(),
             "removed_pct": 100.0 * (1.0 - int(k.sum()) / k.numel())} for name, k in keep.items()]
    return pd.DataFrame(rows, columns=["layer", "kept", "total", "removed_pct"])


def removed_fraction(keep: Mapping[str, torch.Tensor]) -> float:
    """Fraction of all prunable filters that were removed."""
    total = sum(k.numel() for k in keep.values())
    return 1.0 - sum(int(k.sum()) for k in keep.values()) / total


def measure(model: nn.Module, input_size: Sequence[int]) -> Costs:
    """(MACs, params) of ``model`` for one image, in every counting convention."""
    return {convention: count_flops(model, input_size, convention) for convention in CONVENTIONS}


def _reduction(before: int, after: int) -> float:
    return 100.0 * (1.0 - after / before) if before else math.nan


def cost_table(before: Costs, after: Costs) -> pd.DataFrame:
    """MACs and parameters before and after pruning, with reductions in percent, one row per convention."""
    rows = []
    for convention in CONVENTIONS:
        (macs0, params0), (macs1, params1) = before[convention], after[convention]
        rows.append({"convention": convention, "macs_before": macs0, "macs_after": macs1,
                     "macs_reduction_pct": _reduction(macs0, macs1), "params_before": params0,
                     "params_after": params1, "params_reduction_pct": _reduction(params0, params1)})
    return pd.DataFrame(rows)


def cost_summary(costs: pd.DataFrame) -> Dict[str, Any]:
    """Flat summary fields from ``cost_table``: conv-linear MACs unprefixed, ptflops MACs prefixed, params once."""
    out: Dict[str, Any] = {}
    for row in costs.to_dict("records"):
        prefix = "" if row["convention"] == "conv-linear" else f"{row['convention']}_"
        for key in ("macs_before", "macs_after", "macs_reduction_pct"):
            out[prefix + key] = row[key]
    first = costs.iloc[0]
    out.update(params_before=int(first["params_before"]), params_after=int(first["params_after"]),
               params_reduction_pct=float(first["params_reduction_pct"]))
    return out


def write_table(frame: pd.DataFrame, path: PathLike, title: str) -> None:
    """Print ``frame`` under ``title`` and write it to ``path`` as CSV (atomically)."""
    print(f"\n{title}\n{frame.to_string(index=False, float_format=lambda v: f'{v:.2f}')}\n", flush=True)
    with atomic_open(path, "w") as handle:
        frame.to_csv(handle, index=False)


def write_summary(summary: Mapping[str, Any], directory: PathLike) -> Tuple[Path, Path]:
    """Write ``summary`` as ``summary.json`` and a one-row ``summary.csv`` in ``directory``; returns both paths."""
    directory = Path(directory)
    json_path, csv_path = directory / "summary.json", directory / "summary.csv"
    with atomic_open(json_path, "w") as handle:
        json.dump(dict(summary), handle, indent=2)
    with atomic_open(csv_path, "w") as handle:
        pd.DataFrame([dict(summary)]).to_csv(handle, index=False)
    return json_path, csv_path


def _joined(values: Sequence[float], fmt: Callable[[float], str]) -> str:
    return " / ".join(fmt(v) for v in values)


def result_line(folder: PathLike, rows: Sequence[Mapping[str, Any]], label: str = "result") -> str:
    """A run's result on one line, rounded (the files keep full precision): baseline -> pruned top-1, MACs and
    parameters before -> after, and the folder. ``rows``: one summary record per point (a sweep gives several);
    keys ``baseline_top1``/``pruned_top1`` are left out where not measured. ``label`` starts the line."""
    first = rows[0]
    parts = []
    if all(row.get("pruned_top1") is not None for row in rows):
        before = f"{first['baseline_top1']:.2f}% -> " if first.get("baseline_top1") is not None else ""
        parts.append(f"top-1 {before}{_joined([r['pruned_top1'] for r in rows], '{:.2f}'.format)}%")
    for what, key in (("MACs", "macs"), ("params", "params")):
        after = [r[f"{key}_after"] for r in rows]
        removed = [_reduction(r[f"{key}_before"], r[f"{key}_after"]) for r in rows]
        parts.append(f"{what} {human(first[f'{key}_before'])} -> {_joined(after, human)} "
                     f"({_joined(removed, '{:.1f}'.format)}% removed)")
    return f"{label}: {'; '.join(parts)}; files in {folder}"

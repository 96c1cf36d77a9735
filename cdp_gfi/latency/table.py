"""The latency model: per unit, the latency its kept width costs, measured on the device and cached on disk.

For each unit and each width on a grid (kept groups), the modules whose
channel counts that width changes (the unit's convs, their followers and
BatchNorms, the consumers' inputs, parameter-free layers between) are built
standalone at those widths and timed together; widths between grid points
are interpolated. A unit's saving is its curve at full width minus at the
kept width, other units dense; the end-to-end correction (``select``) absorbs
what this leaves out. Units whose modules and shapes are equal at every grid
width (a stage's repeated blocks) share one measured curve. The cache key
holds device name, torch version, dtype, input shape, threads, timer and the
network's structure: a table measured under any other key is rebuilt, never
reused.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from ..graph.channels import live_channels
from ..graph.groups import Unit
from ..graph.trace import ModelGraph, is_depthwise
from .timing import Timer, device_name

GRID = (0.125, 0.25, 0.5, 0.75, 1.0)
FORMAT = 1


@dataclass
class Curve:
    """Seconds the modules a unit's width touches take, at kept-group counts ``widths`` (ascending)."""

    widths: List[int]
    seconds: List[float]

    def at(self, kept: float) -> float:
        """Latency at ``kept`` groups, linear between grid widths."""
        return float(np.interp(kept, self.widths, self.seconds))

    def saved(self, kept: float) -> float:
        """Seconds saved by keeping ``kept`` groups instead of all."""
        return self.at(self.widths[-1]) - self.at(kept)


@dataclass
class LatencyTable:
    """Dense end-to-end seconds and each unit's curve; ``reused`` says it came from the cache."""

    key: Dict[str, Any]
    dense: float
    curves: Dict[str, Curve]
    reused: bool = False

    def predicted_reduction(self, kept: Dict[str, float]) -> float:
        """Fraction of the dense latency saved with ``kept`` groups per unit (others dense), from the curves."""
        return sum(self.curves[u].saved(k) for u, k in kept.items()) / self.dense


class _Bundle(nn.Module):
    """Standalone modules, each run on its own input: one timing call for all a unit's width touches. The inputs
    are buffers, so that ``.to(memory_format=...)`` converts them with the weights."""

    def __init__(self, modules: Sequence[nn.Module], inputs: Sequence[torch.Tensor]):
        super().__init__()
        self.parts = nn.ModuleList(modules)
        for i, x in enumerate(inputs):
            self.register_buffer(f"input{i}", x, persistent=False)

    def forward(self, _: Optional[torch.Tensor] = None) -> None:
        for i, mod in enumerate(self.parts):
            mod(getattr(self, f"input{i}"))


def _standalone(mod: nn.Module, cin: int, cout: int) -> Optional[nn.Module]:
    """A fresh module like ``mod`` reading ``cin`` and writing ``cout`` channels; None if it has none to change."""
    if isinstance(mod, nn.Conv2d):
        groups = cin if is_depthwise(mod) else mod.groups
        return nn.Conv2d(cin, cout, mod.kernel_size, mod.stride, mod.padding, mod.dilation, groups,
                         mod.bias is not None)
    if isinstance(mod, nn.Linear):
        return nn.Linear(cin, mod.out_features, mod.bias is not None)
    if isinstance(mod, nn.BatchNorm2d):
        return nn.BatchNorm2d(cin)
    if not any(True for _ in mod.parameters()) and not any(True for _ in mod.children()):
        return copy.deepcopy(mod)  # activations, pooling: channel-agnostic
    return None


def _count(vec: Optional[torch.Tensor], full: int) -> int:
    return full if vec is None else int(vec.sum())


def _touched(graph: ModelGraph, keep: Dict[str, torch.Tensor]) -> List[Tuple[nn.Module, Tuple[int, ...], int, int]]:
    """(module, input shape, live inputs, live outputs) of every module call whose channel counts ``keep`` changes."""
    live = live_channels(graph, keep)
    out = []
    for node in graph.gm.graph.nodes:
        mod = graph.module_of(node)
        src = next((a for a in node.args if hasattr(a, "op")), None)
        if mod is None or src is None or len(graph.shape(src)) < 2:
            continue
        shape, n_out = tuple(graph.shape(src)), graph.shape(node)[1]
        cin, cout = _count(live.get(src), shape[1]), _count(live.get(node), n_out)
        if (cin, cout) != (shape[1], n_out):
            out.append((mod, shape, cin, cout))
    return out


def _first_kept(unit: Unit, kept: int) -> torch.Tensor:
    k = torch.zeros(len(unit.groups), dtype=torch.bool)
    k[:kept] = True
    return k


def grid_widths(n_groups: int, grid: Sequence[float] = GRID) -> List[int]:
    """Kept-group counts to measure: the grid's fractions of ``n_groups`` (at least one), ascending, ending at all."""
    return sorted({max(1, round(f * n_groups)) for f in grid} | {n_groups})


Part = Tuple[nn.Module, Tuple[int, ...]]  # a standalone module and its input's shape (batch excluded)


def unit_parts(graph: ModelGraph, unit: Unit, grid: Sequence[float] = GRID) -> Tuple[List[int], List[List[Part]]]:
    """The grid widths of ``unit`` and, at each, the standalone modules its width touches (other units dense)."""
    sizes = {c: graph.modules[c].out_channels for c in unit.convs}
    widths = grid_widths(len(unit.groups), grid)
    smallest = {(id(m), s): (m, s) for m, s, _, _ in _touched(graph, unit.expand(_first_kept(unit, widths[0]), sizes))}
    per_width = []
    for kept in widths:
        counts = {(id(m), s): (ci, co) for m, s, ci, co in _touched(graph, unit.expand(_first_kept(unit, kept), sizes))}
        parts = []
        for key, (mod, shape) in smallest.items():
            cin, cout = counts.get(key, (shape[1], None))
            if cout is None:  # at this width the module is whole
                cout = mod.out_channels if isinstance(mod, nn.Conv2d) else cin
            part = _standalone(mod, cin, cout)
            if part is not None:
                parts.append((part, (cin, *shape[2:])))
        per_width.append(parts)
    return widths, per_width


def parts_signature(widths: Sequence[int], per_width: Sequence[Sequence[Part]]) -> str:
    """What a unit's curve depends on: its widths and each width's modules (configuration) and input shapes. Units
    of equal signature (the repeated blocks of a stage) cost the same, so the table times one of them."""
    return repr((list(widths), [[(repr(m), s) for m, s in parts] for parts in per_width]))


def time_parts(widths: Sequence[int], per_width: Sequence[Sequence[Part]], timer: Timer, batch: int,
               device: torch.device, dtype: torch.dtype) -> Curve:
    """Time each width's modules together, each on a random input of its shape at ``batch``."""
    seconds = []
    for parts in per_width:
        modules = [m.to(device, dtype).eval() for m, _ in parts]
        inputs = [torch.randn(batch, *shape, device=device, dtype=dtype) for _, shape in parts]
        seconds.append(timer(_Bundle(modules, inputs), None) if modules else 0.0)
    return Curve(list(widths), seconds)


def _structure(graph: ModelGraph, units: Dict[str, Unit]) -> str:
    """A digest of what the table depends on in the network: costed calls with their shapes, and the units."""
    calls = [(str(n.target), type(graph.module_of(n)).__name__, list(graph.shape(n)), repr(graph.module_of(n)))
             for n in graph.gm.graph.nodes if graph.module_of(n) is not None]
    parts = {name: [u.convs, len(u.groups), sorted(u.follower_widths)] for name, u in units.items()}
    return hashlib.sha256(json.dumps([calls, parts], default=str).encode()).hexdigest()


def cache_key(graph: ModelGraph, units: Dict[str, Unit], input_shape: Sequence[int], device: torch.device,
              dtype: torch.dtype, timer: Timer, grid: Sequence[float] = GRID) -> Dict[str, Any]:
    """Everything a measured table depends on; a table is reused only under an equal key."""
    threads = (getattr(timer, "threads", None) or torch.get_num_threads()) if device.type == "cpu" else None
    return {"format": FORMAT, "device": device_name(device), "torch": torch.__version__, "dtype": str(dtype),
            "input": list(input_shape), "threads": threads,
            "timer": timer.name, "grid": list(grid), "network": _structure(graph, units)}


def default_cache_dir() -> Path:
    """``$CDP_GFI_CACHE/latency``, by default ``~/.cache/cdp_gfi/latency``."""
    return Path(os.environ.get("CDP_GFI_CACHE", Path.home() / ".cache" / "cdp_gfi")) / "latency"


def cache_file(key: Dict[str, Any], cache_dir: Optional[Path] = None) -> Path:
    """Where the table of ``key`` lives: one file per key, named by its digest."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return Path(cache_dir or default_cache_dir()) / f"{digest}.json"


def _load(path: Path, key: Dict[str, Any]) -> Optional[LatencyTable]:
    """The cached table at ``path`` if it was measured under ``key``; None if absent, unreadable or stale."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("key") != key:
        return None
    curves = {u: Curve(list(c["widths"]), list(c["seconds"])) for u, c in data["curves"].items()}
    return LatencyTable(key, float(data["dense"]), curves, reused=True)


def _save(path: Path, table: LatencyTable) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    curves = {u: {"widths": c.widths, "seconds": c.seconds} for u, c in table.curves.items()}
    tmp.write_text(json.dumps({"key": table.key, "dense": table.dense, "curves": curves}))
    os.replace(tmp, path)


def latency_table(model: nn.Module, graph: ModelGraph, units: Dict[str, Unit], example: torch.Tensor,
                  timer: Timer, device: torch.device, cache_dir: Optional[Path] = None,
                  grid: Sequence[float] = GRID) -> LatencyTable:
    """The table of ``units`` for inputs like ``example`` (batch included) on ``device``: cached, else measured."""
    dtype = next(model.parameters()).dtype
    key = cache_key(graph, units, example.shape, device, dtype, timer, grid)
    path = cache_file(key, cache_dir)
    table = _load(path, key)
    if table is not None:
        return table
    dense = timer(copy.deepcopy(model).to(device).eval(), example.to(device, dtype))
    measured: Dict[str, Curve] = {}  # by signature: a stage's repeated blocks are timed once
    curves = {}
    for name, unit in units.items():
        widths, per_width = unit_parts(graph, unit, grid)
        signature = parts_signature(widths, per_width)
        if signature not in measured:
            measured[signature] = time_parts(widths, per_width, timer, example.shape[0], device, dtype)
        curves[name] = Curve(list(measured[signature].widths), list(measured[signature].seconds))
    table = LatencyTable(key, dense, curves)
    _save(path, table)
    return table

"""Statistics: the gathered per-layer sums, with their file format and model checks."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Mapping, Optional, Union

import torch
from torch import nn

from ..files.checkpoint import CheckpointError, UnsafeCheckpointError, load_checkpoint, save_atomic
from .fingerprint import check_fingerprint

FORMAT = "cdp_gfi.statistics/1"
KINDS = ("cdp_class", "cdp_sample", "gfi")


class StatisticsError(ValueError):
    """Statistics cannot be gathered, or do not belong to this model."""


@dataclass
class Statistics:
    """Sampled feature-map statistics of some convs of one model."""

    layers: Dict[str, List[int]]  # conv name -> weight shape
    num_classes: int
    num_images: int
    class_counts: torch.Tensor  # [K] images per class (zeros when unlabelled)
    cdp_class: Dict[str, torch.Tensor] = field(default_factory=dict)
    cdp_sample: Dict[str, torch.Tensor] = field(default_factory=dict)
    gfi: Dict[str, torch.Tensor] = field(default_factory=dict)
    meta: Dict[str, object] = field(default_factory=dict)

    def has(self, kind: str) -> bool:
        return bool(getattr(self, kind))

    def require(self, kind: str) -> None:
        """Raise unless statistics of ``kind`` were gathered."""
        if not self.has(kind):
            raise StatisticsError(
                f"these statistics hold no {kind!r} data (they hold {self.kinds()}); "
                f"gather them with kinds including {kind!r}")

    def kinds(self) -> List[str]:
        return [k for k in KINDS if self.has(k)]

    def save(self, path: str) -> None:
        """Write to ``path`` atomically (temp file, then rename)."""
        save_atomic({"format": FORMAT, **{k: _cpu(v) for k, v in self.__dict__.items()}}, path)

    @classmethod
    def load(cls, path: str, model: Optional[nn.Module] = None, fingerprint: Optional[Mapping[str, Any]] = None,
             hint: str = "") -> "Statistics":
        """Read a statistics file (weights_only: it runs no code); with ``model``, refuse one of another model,
        with ``fingerprint`` (`fingerprint.fingerprint`), one from other weights or sampling settings."""
        if not os.path.isfile(path):
            raise FileNotFoundError(f"statistics file not found: {path}")
        try:
            data = load_checkpoint(path)
        except UnsafeCheckpointError:
            raise
        except CheckpointError as exc:
            raise StatisticsError(f"{path} is not a readable statistics file: {exc}") from exc
        if not isinstance(data, dict) or data.pop("format", None) != FORMAT:
            raise StatisticsError(f"{path} is not a cdp_gfi statistics file (format {FORMAT})")
        stats = cls(**data)
        if fingerprint is not None:
            check_fingerprint(stats.meta.get("fingerprint"), fingerprint, f"statistics file {path!r}", hint)
        if model is not None:
            stats.check_model(model, source=path)
        return stats

    def check_model(self, model: Union[nn.Module, Mapping[str, nn.Module]], source: str = "statistics") -> None:
        """Raise unless every layer exists in ``model`` (or a name->module map) with the same weight shape."""
        modules = model if isinstance(model, Mapping) else dict(model.named_modules())
        problems = []
        for name, shape in self.layers.items():
            mod = modules.get(name)
            if not isinstance(mod, nn.Conv2d):
                problems.append(f"{name}: not a Conv2d of this model")
            elif list(mod.weight.shape) != list(shape):
                problems.append(f"{name}: weight {list(shape)} in file, {list(mod.weight.shape)} in model")
        if problems:
            more = f" (and {len(problems) - 8} more)" if len(problems) > 8 else ""
            raise StatisticsError(
                f"{source} does not match this model ({self.meta.get('model', 'unknown model')} "
                f"in file): " + "; ".join(problems[:8]) + more)

    def check_layers(self, names: Iterable[str]) -> None:
        """Raise unless statistics cover every conv in ``names``."""
        missing = [n for n in names if n not in self.layers]
        if missing:
            raise StatisticsError(f"statistics hold no data for layers {missing[:8]}; gather them for this layer set")


def _cpu(v):
    if torch.is_tensor(v):
        return v.detach().cpu()
    if isinstance(v, dict):
        return {k: _cpu(x) for k, x in v.items()}
    return v

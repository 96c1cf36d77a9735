"""Where a statistics file comes from: a sha256 of the weights plus the sample's settings, checked on every reuse.

A float sum of the weights (what stage 1 compared before) is shared by
different checkpoints (a permutation of filters, a sign flip); a hash of the
state dict's tensor bytes, in key order, is not.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Union

import torch
from torch import nn

FIELDS = ("weights_sha256", "model", "dataroot", "seed", "stop_batch", "batch_size", "input_size", "scope",
          "feature_site", "extra")


class FingerprintMismatchError(ValueError):
    """A statistics file was gathered from other weights or with other sampling settings."""


def weights_sha256(weights: Union[nn.Module, Mapping[str, torch.Tensor]]) -> str:
    """sha256 over the state dict, in key order: each key, dtype, shape and the tensor's bytes."""
    state = weights.state_dict() if isinstance(weights, nn.Module) else weights
    digest = hashlib.sha256()
    for key, tensor in state.items():
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def fingerprint(weights: Union[nn.Module, Mapping[str, torch.Tensor]], *, model: str, dataroot: Optional[str],
                seed: int, stop_batch: int, batch_size: int, input_size: int, scope: str,
                feature_site: str = "output", extra: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """What statistics depend on besides the method: the weights' hash and the sample's settings.

    ``dataroot`` is resolved to an absolute path (None for built-in data); ``extra`` holds any further
    setting (plain values) a caller needs matched.
    """
    return {"weights_sha256": weights_sha256(weights), "model": model,
            "dataroot": str(Path(dataroot).resolve()) if dataroot else None, "seed": int(seed),
            "stop_batch": int(stop_batch), "batch_size": int(batch_size), "input_size": int(input_size),
            "scope": scope, "feature_site": feature_site, "extra": dict(extra or {})}


def check_fingerprint(stored: Optional[Mapping[str, Any]], expected: Mapping[str, Any], source: str,
                      hint: str = "") -> None:
    """Refuse statistics whose recorded fingerprint differs from ``expected``, naming every field that differs."""
    if not isinstance(stored, Mapping):
        raise FingerprintMismatchError(f"{source} records no fingerprint (written by an older cdp_gfi?), so it "
                                       f"cannot be matched to these weights and settings{hint}")
    differ = []
    for name in FIELDS:
        was, now = stored.get(name), expected.get(name)
        if name == "extra":
            differ += [f"extra.{k} {(was or {}).get(k)!r} in file, {(now or {}).get(k)!r} now"
                       for k in sorted(set(was or {}) | set(now or {})) if (was or {}).get(k) != (now or {}).get(k)]
        elif was != now:
            differ.append(f"{name} {_shown(name, was)!r} in file, {_shown(name, now)!r} now")
    if differ:
        what = "other weights" if stored.get("weights_sha256") != expected.get("weights_sha256") else "other settings"
        raise FingerprintMismatchError(f"{source} was gathered from {what}: " + "; ".join(differ) + hint)


def _shown(name: str, value: Any) -> Any:
    return value[:12] if name == "weights_sha256" and isinstance(value, str) else value

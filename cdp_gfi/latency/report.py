"""Latency figures for summaries: median and spread of a network at each batch size, on a named device."""
from __future__ import annotations

import copy
from typing import Any, Dict, Optional, Sequence

import torch
from torch import nn

from .timing import BenchmarkTimer, check_batch, device_name, resolve_device


def latency_summary(model: nn.Module, input_size: Sequence[int], device: Optional[str] = None,
                    batches: Sequence[int] = (1,), prefix: str = "", threads: Optional[int] = None,
                    min_run_time: float = 1.0, amp: bool = False, channels_last: bool = False) -> Dict[str, Any]:
    """Flat ``summary.json`` / ``results.csv`` fields: ``{prefix}latency_ms_b{N}`` (median) and
    ``{prefix}latency_iqr_ms_b{N}`` per batch, with the device, threads and timer (``amp``, ``channels_last``:
    see ``timing.BenchmarkTimer``) they were measured with."""
    for b in batches:
        check_batch(b, "a latency batch size")
    param = next(model.parameters())
    dev = resolve_device(device, param.device)
    timer = BenchmarkTimer(threads, min_run_time, amp=amp, channels_last=channels_last)
    twin = copy.deepcopy(model).to(dev).eval()
    out: Dict[str, Any] = {"latency_device": device_name(dev),
                           "latency_threads": timer.threads if dev.type == "cpu" else None,
                           "latency_timer": timer.name}
    for b in batches:
        m = timer.measurement(twin, torch.randn(b, *input_size, device=dev, dtype=param.dtype))
        out[f"{prefix}latency_ms_b{b}"] = 1e3 * m.median
        out[f"{prefix}latency_iqr_ms_b{b}"] = 1e3 * m.iqr
    return out


def compare_latency(dense: nn.Module, slim: nn.Module, input_size: Sequence[int], device: Optional[str] = None,
                    batches: Sequence[int] = (1,), threads: Optional[int] = None, min_run_time: float = 1.0,
                    amp: bool = False, channels_last: bool = False) -> Dict[str, Any]:
    """``latency_summary`` of the dense (``dense_`` fields) and the slim network (``slim_``), and the reduction
    in percent per batch (``latency_reduction_pct_b{N}``): the pruning's latency figures beside MACs and params."""
    out = {**latency_summary(dense, input_size, device, batches, "dense_", threads, min_run_time, amp, channels_last),
           **latency_summary(slim, input_size, device, batches, "slim_", threads, min_run_time, amp, channels_last)}
    for b in batches:
        out[f"latency_reduction_pct_b{b}"] = 100.0 * (1.0 - out[f"slim_latency_ms_b{b}"] / out[f"dense_latency_ms_b{b}"])
    return out


def latency_line(fields: Dict[str, Any], batches: Sequence[int]) -> str:
    """``compare_latency``'s figures on one line, e.g. for a script's log."""
    parts = [f"batch {b}: {fields[f'dense_latency_ms_b{b}']:.3g} -> {fields[f'slim_latency_ms_b{b}']:.3g} ms "
             f"({fields[f'latency_reduction_pct_b{b}']:.1f}% less)" for b in batches]
    threads = f", {fields['latency_threads']} thread(s)" if fields.get("latency_threads") else ""
    return f"latency on {fields['latency_device']}{threads}: " + "; ".join(parts)

"""Timing one module on one device: the ``Timer`` interface the latency table and selection use.

A timer takes a module and an input already on the device and returns the
median seconds of one forward pass. ``BenchmarkTimer`` measures with
``torch.utils.benchmark``; tests pass a deterministic stand-in.
"""
from __future__ import annotations

import platform
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Protocol

import torch
from torch import nn

from ..distributed import check_device

if TYPE_CHECKING:
    from torch.utils.benchmark import Measurement


class Timer(Protocol):
    """Median seconds of ``module(x)``; ``name`` (and ``threads``, where a timer has it) enter the cache key,
    so tables of different timers never mix."""

    name: str

    def __call__(self, module: nn.Module, x: torch.Tensor) -> float: ...


class BenchmarkTimer:
    """``torch.utils.benchmark`` over timed blocks of at least ``min_run_time`` seconds in all (on CUDA its clock
    synchronises the device before each reading, so queued kernels are counted).

    ``amp``: forward passes under ``torch.autocast`` (float16 on CUDA, bfloat16 on the CPU); ``channels_last``: the
    module (converted in place) and its 4-d inputs in channels-last memory format. Both enter ``name``, hence the
    latency table's cache key.
    """

    def __init__(self, threads: Optional[int] = None, min_run_time: float = 0.2, warmup: int = 2,
                 amp: bool = False, channels_last: bool = False):
        self.threads = threads or torch.get_num_threads()
        self.min_run_time, self.warmup = min_run_time, warmup
        self.amp, self.channels_last = amp, channels_last
        self.name = "torch.utils.benchmark" + ("+amp" if amp else "") + ("+channels_last" if channels_last else "")

    @torch.no_grad()
    def measurement(self, module: nn.Module, x: Optional[torch.Tensor]) -> "Measurement":
        """All timed blocks (median, interquartile range, ...) after ``warmup`` untimed calls."""
        from torch.utils import benchmark  # imported here: it loads cpp_extension, which logs on CUDA-less hosts

        if self.channels_last:
            module = module.to(memory_format=torch.channels_last)
            x = x.contiguous(memory_format=torch.channels_last) if x is not None and x.dim() == 4 else x
        run = _Autocast(module, _device_type(module, x)) if self.amp else module
        for _ in range(self.warmup):
            run(x)
        timer = benchmark.Timer("module(x)", globals={"module": run, "x": x}, num_threads=self.threads)
        return timer.blocked_autorange(min_run_time=self.min_run_time)

    def __call__(self, module: nn.Module, x: torch.Tensor) -> float:
        return float(self.measurement(module, x).median)


class _Autocast:
    """``module(x)`` under ``torch.autocast``: float16 on CUDA, bfloat16 on the CPU (its autocast type)."""

    def __init__(self, module: nn.Module, device_type: str):
        self.module, self.device_type = module, device_type
        self.dtype = torch.float16 if device_type == "cuda" else torch.bfloat16

    def __call__(self, x: Optional[torch.Tensor]):
        with torch.autocast(self.device_type, dtype=self.dtype):
            return self.module(x)


def _device_type(module: nn.Module, x: Optional[torch.Tensor]) -> str:
    """Where a timed call runs: its input's device, else its module's (a bundle carries its own inputs)."""
    if x is not None:
        return x.device.type
    tensor = next(iter(module.parameters()), None)
    if tensor is None:
        tensor = next(iter(module.buffers()), None)
    return tensor.device.type if tensor is not None else "cpu"


def resolve_device(name: Optional[str], fallback: torch.device) -> torch.device:
    """The device to time on: ``cpu``, ``cuda`` or ``cuda:N`` (None: ``fallback``); one not there is a ValueError
    (``distributed.check_device``)."""
    return torch.device(fallback) if name is None else check_device(name, f"latency device {name!r}")


def hardware_multiple(device: torch.device) -> int:
    """The channel multiple a latency target keeps when no ``round_to`` is given: 8 on CUDA (cuDNN and tensor-core
    kernels tile channels by 8), 1 on the CPU (not measured per machine: the table's per-width curves already show
    what widths cost there, and steps between neighbouring widths drown in the noise of a loaded host)."""
    return 8 if torch.device(device).type == "cuda" else 1


def check_batch(batch: int, what: str = "latency_batch") -> int:
    """Return ``batch`` if it is a positive integer, else raise naming ``what``."""
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"{what} must be a positive integer, got {batch!r}")
    return batch


def device_name(device: torch.device) -> str:
    """What the device is (GPU model, CPU model), so a table measured on other hardware is never reused."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return "cpu: " + line.split(":", 1)[1].strip()
    return "cpu: " + (platform.processor() or platform.machine())


"""The settings of a CIFAR / digits run: PruneConfig, its defaults and its checks."""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any, Dict, Optional

import torch

from ..distributed import parse_device
from ..flops import CONVENTIONS
from ..graph.scope import SCOPES
from ..latency.select import ORDERS
from ..latency.timing import check_batch, resolve_device
from ..masks.select import check_fraction
from ..masks.variants import CriterionOptions
from ..models import models_for
from ..scores.importance import statistics_kinds
from ..slimming.reconstruct import DEFAULT_BATCHES as RECONSTRUCT_BATCHES, LAYERS as RECONSTRUCT_LAYERS
from ..train.distill import DEFAULT_TEMPERATURE, DEFAULT_WEIGHT, check_distillation

DATASETS = ("cifar10", "cifar100", "digits")
SCHEDULES = ("cosine", "step")
DIGITS_FLOPS_REDUCTION = 0.45
BASELINE_LR = 0.1
# Where files live, not what they compute: free to differ when a run is resumed.
RUNTIME_ONLY = frozenset({"resume", "workers", "device", "gpus", "dataroot", "download", "integrity_check",
                          "save_dir", "statistics_file", "baseline_dir"})
# A save_dir holding any of these holds a run: a fresh run refuses it, or takes the next free name (runs.folders).
RUN_FILES = ("args.json", "summary.json", "pruned.pth", "last.pth", "best.pth", "log.csv", "layers.csv",
             "costs.csv", "sweep.csv", "baseline", "point_*")


@dataclass(frozen=True)
class PruneConfig(CriterionOptions):
    """Every setting of a run; None means "the default for this dataset and schedule" (see ``resolve``)."""

    dataset: str = "cifar10"
    model: Optional[str] = None
    dataroot: Optional[str] = None
    download: bool = False
    integrity_check: bool = True
    pretrained_dir: Optional[str] = None
    train_baseline: bool = False
    baseline_epochs: Optional[int] = None
    baseline_dir: str = "ckpt/base"
    sparsity: Optional[float] = None
    flops_reduction: Optional[float] = None
    flops_convention: str = "conv-linear"
    latency_reduction: Optional[float] = None
    latency_device: Optional[str] = None
    latency_batch: int = 1
    latency_order: str = "auto"
    latency_amp: bool = False
    latency_channels_last: bool = False
    stop_batch: Optional[int] = None
    batch_size: Optional[int] = None
    epochs: Optional[int] = None
    lr: Optional[float] = None
    momentum: float = 0.9
    wd: float = 5e-4
    schedule: str = "cosine"
    layerwise_retrain: int = 0
    bn_recalibrate: Optional[int] = None
    reconstruct: Optional[bool] = None
    reconstruct_layers: str = "downstream"
    reconstruct_batches: int = RECONSTRUCT_BATCHES
    distill: Optional[bool] = None
    distill_temperature: float = DEFAULT_TEMPERATURE
    distill_weight: float = DEFAULT_WEIGHT
    seed: int = 0
    save_dir: Optional[str] = None
    resume: bool = False
    statistics_file: Optional[str] = None
    device: Optional[str] = None
    gpus: Optional[str] = None
    workers: Optional[int] = None


def defaults(config: PruneConfig) -> Dict[str, Any]:
    """Defaults: the CDP README's for CIFAR (GFI-AP's lr and epochs with the step schedule); a 3-minute digits demo."""
    step = config.schedule == "step"
    out: Dict[str, Any] = dict(model="resnet20", stop_batch=200, batch_size=128, workers=4, baseline_epochs=200,
                               lr=0.08 if step else 0.01, epochs=80 if step else 300)
    if config.dataset == "digits":
        out.update(workers=0, baseline_epochs=6, epochs=6, batch_size=64)
        if config.sparsity is None and config.flops_reduction is None and config.latency_reduction is None:
            out["flops_reduction"] = DIGITS_FLOPS_REDUCTION
    out.update(asdict(config.variant()))
    # recovery won every cell of the held-out bench where it was measured (README); the papers' runs go without
    out.update(reconstruct=not config.published, distill=not config.published)
    out["save_dir"] = (f"runs/{config.dataset}_{config.model or out['model']}_{config.method}"
                       f"_seed{config.seed}")
    return out


def resolve(config: PruneConfig) -> PruneConfig:
    """``config`` with every None that has a default filled in."""
    return replace(config, **{k: v for k, v in defaults(config).items() if getattr(config, k) is None})


def _positive_int(config: PruneConfig, name: str, minimum: int = 1) -> None:
    value = getattr(config, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"--{name} must be an integer >= {minimum}, got {value!r}")


def check_target(config: PruneConfig) -> None:
    """Exactly one target: --sparsity, --flops_reduction or --latency_reduction (with its batch), in range."""
    given = [name for name in ("sparsity", "flops_reduction") if getattr(config, name) is not None]
    if config.latency_reduction is not None:
        if given:
            raise ValueError(f"give --latency_reduction or --{given[0]}, not both: they are two targets")
        given = ["latency_reduction"]
    elif len(given) != 1:
        raise ValueError("give exactly one of --sparsity and --flops_reduction (or --latency_reduction)")
    check_fraction(getattr(config, given[0]), f"--{given[0]}")
    check_batch(config.latency_batch, "--latency_batch")
    if config.latency_order not in ORDERS:
        raise ValueError(f"--latency_order must be one of {ORDERS}, got {config.latency_order!r}")


def check(config: PruneConfig) -> torch.device:
    """Refuse bad settings of a resolved config (ranges, choices, flag combinations, devices); returns the run's
    device."""
    if config.dataset not in DATASETS:
        raise ValueError(f"--dataset must be one of {DATASETS}, got {config.dataset!r}")
    if config.model not in models_for(config.dataset):
        raise ValueError(f"--model {config.model!r} is not one of {list(models_for(config.dataset))}")
    statistics_kinds(config.method, config.cdp_mode)
    check_target(config)
    if config.flops_convention not in CONVENTIONS:
        raise ValueError(f"--flops_convention must be one of {CONVENTIONS}, got {config.flops_convention!r}")
    if config.scope not in SCOPES:
        raise ValueError(f"--scope must be one of {SCOPES}, got {config.scope!r}")
    if config.round_to is not None:
        _positive_int(config, "round_to")
    if config.schedule not in SCHEDULES:
        raise ValueError(f"--schedule must be one of {SCHEDULES}, got {config.schedule!r}")
    if config.coe is not None and config.coe < 0:
        raise ValueError(f"--coe must be >= 0 (0: no layer rescaling), got {config.coe}")
    for name in ("stop_batch", "batch_size", "epochs", "baseline_epochs", "reconstruct_batches"):
        _positive_int(config, name)
    for name in ("workers", "layerwise_retrain"):
        _positive_int(config, name, minimum=0)
    if not config.lr > 0 or not 0 <= config.momentum < 1 or not config.wd >= 0:
        raise ValueError(f"need --lr > 0, 0 <= --momentum < 1, --wd >= 0; got {config.lr}, {config.momentum}, "
                         f"{config.wd}")
    check_distillation(config.distill_temperature, config.distill_weight)
    if config.reconstruct_layers not in RECONSTRUCT_LAYERS:
        raise ValueError(f"--reconstruct_layers must be one of {RECONSTRUCT_LAYERS}, got {config.reconstruct_layers!r}")
    if config.dataset == "digits" and config.dataroot:
        raise ValueError("--dataroot is not used with --dataset digits (scikit-learn ships the images)")
    if config.dataset != "digits" and not config.dataroot:
        raise ValueError(f"--dataroot is required for --dataset {config.dataset}")
    if config.pretrained_dir and config.train_baseline:
        raise ValueError("give --pretrained_dir or --train_baseline, not both")
    if config.dataset != "digits" and not (config.pretrained_dir or config.train_baseline):
        raise ValueError("give --pretrained_dir (a trained checkpoint) or --train_baseline (train one first)")
    device = parse_device(config.device, config.gpus)
    resolve_device(config.latency_device, device)  # where latency is measured (the run's device by default)
    return device

"""The steps of a CIFAR / digits run: baseline, statistics, masks, slimming, BatchNorm re-estimation, reports, fine-tuning."""
from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Protocol, Sequence, Tuple

import pandas as pd
import torch
from torch import nn
from torch.optim.lr_scheduler import ConstantLR
from torch.utils.data import DataLoader, Dataset

from ..data.datasets import Splits, cifar_datasets, digits_datasets
from ..data.samplers import EpochTaggedSampler, SeededAugmentation, make_loader, sample_loader
from ..files.checkpoint import atomic_open, ensure_writable_dir, load_state_dict_strict, save_atomic
from ..files.pretrained import load_pretrained
from ..flops import keep_vectors, macs_of
from ..graph.groups import Unit
from ..graph.scope import prunable_units, unit_convs
from ..graph.sites import read_points
from ..graph.trace import ModelGraph, trace
from ..latency.report import compare_latency, latency_line
from ..latency.select import select_for_latency
from ..latency.timing import BenchmarkTimer, Timer, resolve_device
from ..masks.masked import MaskEnforcer, Masks
from ..masks.select import filters_removed, select, to_nni_masks
from ..models import input_size_for, num_classes_for
from ..scores.importance import scores_from_statistics, statistics_kinds
from ..slimming.reconstruct import reconstruct
from ..slimming.slim_files import SLIM_DUMMY_SIZE, slim_recipe
from ..slimming.speedup import slim
from ..statistics.collect import collect_statistics
from ..statistics.fingerprint import fingerprint
from ..statistics.store import Statistics
from ..train.distill import Distillation
from ..train.loop import fit, seed_everything, train_one_epoch
from ..train.optim import build_optimizer, build_scheduler
from ..train.recalibrate import recalibrate_batchnorm
from .cifar_config import BASELINE_LR, RUNTIME_ONLY, PruneConfig
from .report import cost_table, kept_table, measure, write_table

REPORT_MIN_RUN_TIME = 0.2  # seconds of timed runs per network and batch size in a run's latency report


class LatencySettings(Protocol):
    """The latency flags a run's config carries (``PruneConfig``, ``imagenet_stage1.Stage1Config``)."""

    latency_device: Optional[str]
    latency_amp: bool
    latency_channels_last: bool
    batch_size: int


def load_splits(config: PruneConfig) -> Splits:
    """(train with augmentation, train without, test) of the run's dataset; CIFAR is never downloaded unasked."""
    if config.dataset == "digits":
        return digits_datasets(config.seed)
    return cifar_datasets(config.dataroot, config.dataset, download=config.download,
                          check_integrity=config.integrity_check)


def baseline_recipe(config: PruneConfig) -> Dict[str, Any]:
    """How a baseline is trained here (see ``train_baseline``): another recipe caches another baseline."""
    return {"model": config.model, "dataset": config.dataset, "seed": config.seed, "epochs": config.baseline_epochs,
            "lr": BASELINE_LR, "momentum": config.momentum, "wd": config.wd, "batch_size": config.batch_size,
            "schedule": "cosine"}


def baseline_path(config: PruneConfig) -> Path:
    """Where a baseline trained by this package is cached: named for its model, data, seed, epochs and recipe hash."""
    recipe = hashlib.sha256(json.dumps(baseline_recipe(config), sort_keys=True).encode()).hexdigest()[:8]
    return Path(config.baseline_dir) / (f"{config.model}_{config.dataset}_seed{config.seed}"
                                        f"_e{config.baseline_epochs}_{recipe}.pth")


def load_baseline(config: PruneConfig, model: nn.Module) -> bool:
    """Load ``--pretrained_dir`` (or the cached baseline) strictly into ``model``; False when one must be trained."""
    if config.pretrained_dir:
        layout = load_pretrained(model, config.pretrained_dir, what="--pretrained_dir")
        print(f"baseline: {config.pretrained_dir} loaded ({layout} layout)", flush=True)
        return True
    path = baseline_path(config)
    if path.exists():
        load_state_dict_strict(model, path, what="cached baseline")
        print(f"baseline: reusing {path}", flush=True)
        return True
    return False


def load_statistics(config: PruneConfig, model: nn.Module) -> Optional[Statistics]:
    """The statistics in an existing ``--statistics_file``, checked against model, fingerprint and method; else None."""
    if not config.statistics_file:
        return None
    path = Path(config.statistics_file)
    if not path.exists():
        ensure_writable_dir(path.parent)
        return None
    stats = Statistics.load(str(path), model, fingerprint=statistics_fingerprint(config, model),
                            hint="; delete it or give another --statistics_file")
    for kind in statistics_kinds(config.method, config.cdp_mode):
        stats.require(kind)
    return stats


def statistics_fingerprint(config: PruneConfig, model: nn.Module) -> Dict[str, Any]:
    """The fingerprint a statistics file of this run records: the weights' hash and the sample's settings."""
    return fingerprint(model, model=config.model, dataroot=config.dataroot, seed=config.seed,
                       stop_batch=config.stop_batch, batch_size=config.batch_size,
                       input_size=input_size_for(config.dataset)[1], scope=config.scope,
                       feature_site=config.site, extra={"dataset": config.dataset})


def record_arguments(config: PruneConfig, save_dir: Path, overrides: Optional[Dict[str, Any]] = None) -> None:
    """Write the run's arguments to args.json, or, when resuming, refuse arguments other than the saved ones.

    ``overrides`` replaces some of them (a sweep records its list of targets). A fresh run's folder holds no
    other run (``cifar.claim_folder``): nothing is removed here.
    """
    path = save_dir / "args.json"
    current = {k: v for k, v in asdict(config).items() if k not in RUNTIME_ONLY}
    current.update(overrides or {})
    if config.resume:
        if not path.exists():
            raise FileNotFoundError(f"--resume: {save_dir} holds no run to continue (no args.json); drop --resume")
        saved = json.loads(path.read_text())
        differ = [f"--{k} {saved.get(k)!r} -> {v!r}" for k, v in current.items() if saved.get(k) != v]
        if differ:
            raise ValueError(f"--resume: the run in {save_dir} had other arguments ({'; '.join(differ)}); "
                             "resume with the same arguments or use another --save_dir")
        return
    with atomic_open(path, "w") as handle:
        json.dump(current, handle, indent=2)


def train_loader(config: PruneConfig, dataset: Dataset) -> DataLoader:
    """Shuffled augmented batches whose order and augmentation depend on (seed, epoch) only: resumes exactly."""
    sampler = EpochTaggedSampler(dataset, num_replicas=1, rank=0, shuffle=True, seed=config.seed)
    return make_loader(SeededAugmentation(dataset, config.seed), config.batch_size, shuffle=False,
                       workers=config.workers, seed=config.seed, sampler=sampler)


def train_baseline(config: PruneConfig, model: nn.Module, loaders: Tuple[DataLoader, DataLoader],
                   device: torch.device, save_dir: Path) -> None:
    """Train ``model`` from scratch (SGD lr 0.1, cosine; log in save_dir/baseline) and cache it atomically."""
    optimizer = build_optimizer(model, BASELINE_LR, config.momentum, config.wd)
    scheduler = build_scheduler(optimizer, "cosine", config.baseline_epochs, len(loaders[0]))
    print(f"baseline: training {config.model} for {config.baseline_epochs} epochs", flush=True)
    log = fit(model, *loaders, epochs=config.baseline_epochs, optimizer=optimizer, scheduler=scheduler,
              device=device, run_dir=save_dir / "baseline", resume=config.resume)
    save_atomic({"state_dict": model.state_dict(), "recipe": baseline_recipe(config), "model": config.model,
                 "dataset": config.dataset, "top1": log.attrs["final_top1"]}, baseline_path(config))


def gather_statistics(config: PruneConfig, model: nn.Module, dataset: Dataset, graph: ModelGraph, layers,
                      device: torch.device) -> Statistics:
    """Statistics at ``config.site`` over a seeded sample of un-augmented training images, read class by class
    (GFI-AP then holds one class's maps at a time); written to ``--statistics_file`` if set."""
    loader = sample_loader(dataset, config.batch_size, config.stop_batch, config.seed, config.workers,
                           class_ordered=True)
    stats = collect_statistics(
        model, loader, layers, statistics_kinds(config.method, config.cdp_mode),
        num_classes=num_classes_for(config.dataset), stop_batch=config.stop_batch, device=device,
        dummy_input=_dummy(config), read_at=read_points(graph, layers, config.site),
        meta={"model": config.model, "dataset": config.dataset,
              "fingerprint": statistics_fingerprint(config, model)})
    if config.statistics_file:
        stats.save(config.statistics_file)
    return stats


def latency_timer(config: PruneConfig) -> Timer:
    """How a latency target times networks (a test swaps in a deterministic timer here)."""
    return BenchmarkTimer(amp=config.latency_amp, channels_last=config.latency_channels_last)


def choose_masks(config: PruneConfig, model: nn.Module, stats: Statistics, graph: ModelGraph,
                 units: Dict[str, Unit], dummy_input: torch.Tensor, device: torch.device
                 ) -> Tuple[Masks, Dict[str, Any]]:
    """Scores of the method, then one global selection over the units for the sparsity, FLOPs or latency target
    (latency measured on ``--latency_device``, by default ``device``, at inputs like ``dummy_input``).

    Returns the masks and what the selection reports (for a latency target: the measured reduction and tries)."""
    scores, tiebreak = scores_from_statistics(stats, config.method, config.cdp_mode, config.coe, unit_convs(units))
    selection: Dict[str, Any] = {}
    if config.latency_reduction is not None:
        keep, selection = _select_for_latency(config, model, scores, tiebreak, graph, units, dummy_input, device)
    else:
        keep, _ = select(config.method, scores, tiebreak, sparsity=config.sparsity,
                         flops_reduction=config.flops_reduction, graph=graph, convention=config.flops_convention,
                         units=units, round_to=config.round_to, normalization=config.normalize,
                         cost_power=config.cost_power, rule=config.rule, max_layer_sparsity=config.max_layer_sparsity,
                         weight_power=config.weight_power)
    layers = unit_convs(units)
    macs = 1 - macs_of(graph, keep, config.flops_convention) / macs_of(graph, {}, config.flops_convention)
    print(f"selection: {filters_removed(keep, layers):.1%} of the {sum(keep[n].numel() for n in layers)} ranked "
          f"filters and {macs:.1%} of MACs ({config.flops_convention}) removed", flush=True)
    return to_nni_masks(model, keep), selection


def _select_for_latency(config: PruneConfig, model: nn.Module, scores, tiebreak, graph: ModelGraph,
                        units: Dict[str, Unit], dummy_input: torch.Tensor, device: torch.device
                        ) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """``select_for_latency`` on the run's settings; the kept filters and the summary fields of the selection."""
    on = resolve_device(config.latency_device, device)
    result = select_for_latency(scores, tiebreak, reduction=config.latency_reduction, model=model, graph=graph,
                                units=units, dummy_input=dummy_input, device=str(on), batch=config.latency_batch,
                                timer=latency_timer(config), max_layer_sparsity=config.max_layer_sparsity,
                                round_to=config.round_to, normalization=config.normalize,
                                slim_input=dummy_input[..., :SLIM_DUMMY_SIZE, :SLIM_DUMMY_SIZE], rule=config.rule,
                                order=config.latency_order, cost_power=config.cost_power,
                                weight_power=config.weight_power)
    print(f"latency: {result.measured:.1%} measured reduction at batch {config.latency_batch} on {on} "
          f"(target {config.latency_reduction:.1%}, {result.order} order, {len(result.tries)} tries, widths multiples "
          f"of {result.round_to}, "
          f"latency table "
          f"{'reused' if result.table is not None and result.table.reused else 'measured'})", flush=True)
    return result.keep, {"latency_measured_reduction_pct": 100.0 * result.measured,
                         "latency_tries": len(result.tries), "latency_round_to": result.round_to,
                         "latency_order_used": result.order,
                         "latency_selection_dense_ms": 1e3 * result.dense_seconds,
                         "latency_selection_slim_ms": 1e3 * result.slim_seconds}


def layerwise_retrain(config: PruneConfig, model: nn.Module, masks: Masks, graph: ModelGraph,
                      loader: DataLoader, device: torch.device) -> None:
    """GFI-AP's layer-by-layer schedule: mask one layer more at a time, then train N epochs holding masks at zero.

    Layers that lose no filter are masked without retraining. The masks
    themselves stay those chosen once on the original network.
    """
    optimizer = build_optimizer(model, config.lr, config.momentum, config.wd)
    scheduler = ConstantLR(optimizer, factor=1.0, total_iters=0)
    criterion, held, epoch = nn.CrossEntropyLoss(), {}, 0
    for name, mask in masks.items():
        held[name] = mask
        if mask["weight"].all():
            continue
        enforce = MaskEnforcer(model, held, graph)
        enforce(model)
        for _ in range(config.layerwise_retrain):
            loader.sampler.set_epoch(epoch)
            result = train_one_epoch(model, loader, optimizer, scheduler, device, criterion=criterion,
                                     after_step=enforce, epoch=epoch)
            epoch += 1
        print(f"layerwise: {name} pruned, {config.layerwise_retrain} epoch(s), train top-1 {result['top1']:.2f}%",
              flush=True)


def _dummy(config: PruneConfig) -> torch.Tensor:
    return torch.zeros(1, *input_size_for(config.dataset))


def prune(config: PruneConfig, baseline: nn.Module, stats: Optional[Statistics], plain_train: Dataset,
          loader: DataLoader, device: torch.device) -> Tuple[nn.Module, Masks, Dict[str, Any]]:
    """Statistics (unless given), masks, optional layer-wise retraining, slimming: a pruned copy of ``baseline``,
    its masks and what the selection reports (``choose_masks``)."""
    seed_everything(config.seed)
    graph = trace(baseline, _dummy(config))
    units = prunable_units(graph, config.scope)
    stats = stats or gather_statistics(config, baseline, plain_train, graph, unit_convs(units), device)
    model = copy.deepcopy(baseline).cpu()
    masks, selection = choose_masks(config, model, stats, graph, units, _dummy(config), device)
    if config.layerwise_retrain:
        layerwise_retrain(config, model.to(device), masks, graph, loader, device)
    slim(model.cpu().eval(), masks, _dummy(config))
    return model.to(device), masks, selection


def recalibrate(config: PruneConfig, model: nn.Module, plain_train: Dataset, batches: int,
                device: torch.device) -> None:
    """Re-estimate the pruned network's BatchNorm statistics on ``batches`` seeded batches of plain training images."""
    loader = make_loader(plain_train, config.batch_size, shuffle=True, workers=config.workers, seed=config.seed)
    recalibrate_batchnorm(model, loader, batches, device)


def refit(config: PruneConfig, baseline: nn.Module, model: nn.Module, masks: Masks, plain_train: Dataset,
          device: torch.device) -> None:
    """``--reconstruct``: refit ``--reconstruct_layers`` on a seeded sample of plain training images."""
    batches = config.reconstruct_batches
    loader = sample_loader(plain_train, config.batch_size, batches, config.seed + 1000, config.workers)
    names = reconstruct(baseline, model, masks, loader, batches=batches, layers=config.reconstruct_layers)
    print(f"reconstruction: {len(names)} layer(s) ({config.reconstruct_layers}) refitted by least squares on "
          f"{batches} batches", flush=True)


def report(config: PruneConfig, baseline: nn.Module, model: nn.Module, masks: Masks, save_dir: Path
           ) -> pd.DataFrame:
    """Print and save kept filters per layer (layers.csv) and MACs/params before and after (costs.csv)."""
    size = input_size_for(config.dataset)
    write_table(kept_table(keep_vectors(masks)), save_dir / "layers.csv", "Filters kept per pruned layer")
    costs = cost_table(measure(baseline, size), measure(model, size))
    write_table(costs, save_dir / "costs.csv", "MACs and parameters per image, before and after pruning")
    return costs


def measure_latency(config: LatencySettings, dense: nn.Module, slim_model: nn.Module, input_size: Sequence[int],
                    device: torch.device) -> Dict[str, Any]:
    """Dense and slim latency on ``--latency_device`` (default ``device``, the run's) at batch 1 and the run's
    batch size, with the run's --latency_amp / --latency_channels_last, printed and returned as summary fields
    (``latency.report.compare_latency``). ``config``: a CIFAR or an ImageNet stage-1 config."""
    batches = sorted({1, config.batch_size})
    fields = compare_latency(dense, slim_model, input_size, str(resolve_device(config.latency_device, device)),
                             batches, min_run_time=REPORT_MIN_RUN_TIME, amp=config.latency_amp,
                             channels_last=config.latency_channels_last)
    print(latency_line(fields, batches), flush=True)
    return fields


def finetune(config: PruneConfig, model: nn.Module, masks: Masks, loaders: Tuple[DataLoader, DataLoader],
             device: torch.device, save_dir: Path,
             on_epoch_end: Optional[Callable[[int, Dict[str, float]], None]] = None,
             teacher: Optional[nn.Module] = None) -> pd.DataFrame:
    """Fine-tune the slim network (SGD Nesterov, cosine or step); checkpoints carry its recipe and args.

    With ``config.distill`` the dense ``teacher`` joins the loss (``train.distill``)."""
    if config.distill and teacher is None:
        raise ValueError("--distill needs the dense network as teacher")
    distill = (Distillation(teacher.to(device), config.distill_temperature, config.distill_weight)
               if config.distill else None)
    seed_everything(config.seed)
    optimizer = build_optimizer(model, config.lr, config.momentum, config.wd, nesterov=True)
    scheduler = build_scheduler(optimizer, config.schedule, config.epochs, len(loaders[0]))
    extra = {"route": "slim", **slim_recipe(config.model, config.dataset, num_classes_for(config.dataset), masks),
             "args": asdict(config)}
    return fit(model, *loaders, epochs=config.epochs, optimizer=optimizer, scheduler=scheduler, device=device,
               run_dir=save_dir, make_checkpoint=lambda: extra, resume=config.resume, on_epoch_end=on_epoch_end,
               distill=distill)

"""One pruning run on 32x32 data: pretrained (or freshly trained) network in, slim fine-tuned network out.

``run(PruneConfig(...))`` is what ``prune_cifar.py`` calls; an NNI trial or
another script calls it, or its steps, the same way. Everything cheap is
checked before any long work. Files written in ``save_dir``:

- ``args.json``: the run's arguments (``resume`` refuses other ones);
- ``baseline/``: the training log of a baseline trained here (its weights are
  cached as ``<baseline_dir>/<model>_<dataset>_seed<seed>_e<epochs>_<recipe hash>.pth``);
- ``pruned.pth``: the slimmed network before fine-tuning (a "slim" checkpoint,
  ``cdp_gfi.load_slim`` reads it); ``layers.csv`` and ``layers.png`` (kept filters) and ``costs.csv`` (MACs
  and parameters, both conventions);
- ``log.csv``, ``last.pth``, ``best.pth``: fine-tuning (``train.fit``); each
  checkpoint also holds what rebuilds the slim network (``slim_files.slim_recipe``:
  ``load_slim`` reads them too) and ``args``;
- ``summary.json`` and ``summary.csv``: the results in one record (and one printed line, rounded).

A fresh run never writes into a folder holding another run (``claim_folder``);
only ``resume`` continues one. ``runs.sweep.sweep(config, targets)`` runs several
targets from one statistics pass, each point as above in ``point_<target>/``,
then writes ``sweep.csv`` and ``sweep.png`` in ``save_dir``."""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple

import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader

from ..data.datasets import Splits
from ..data.samplers import make_loader
from ..files.checkpoint import ensure_writable_dir
from ..flops import keep_vectors
from ..masks.masked import Masks
from ..models import build_model, input_size_for, num_classes_for
from ..slimming.slim_files import rebuild_slim, save_slim_checkpoint
from ..statistics.store import Statistics
from ..train.loop import evaluate, seed_everything
from ..train.recalibrate import check_batches
from .cifar_config import RUN_FILES, PruneConfig, check, defaults, resolve
from .cifar_steps import (
    finetune,
    load_baseline,
    load_splits,
    load_statistics,
    measure_latency,
    prune,
    recalibrate,
    refit,
    record_arguments,
    report,
    train_baseline,
    train_loader,
)
from .folders import claim
from .imagenet_stage2 import load_pruned_checkpoint
from .plots import plot_kept_filters
from .report import cost_summary, removed_fraction, result_line, write_summary


SELECTION_KEY = "selection"  # pruned.pth's args: what the selection reported, for a resumed run's summary


@dataclass
class Session:
    """What every point of a run shares: device, data, the evaluated baseline and its statistics (if loaded)."""

    device: torch.device
    splits: Splits
    loaders: Tuple[DataLoader, DataLoader]
    baseline: nn.Module
    baseline_top1: float
    stats: Optional[Statistics]
    recal_batches: int


def open_session(config: PruneConfig, record: Callable[[Path], None]) -> Session:
    """Check everything cheap, ``record`` the arguments in save_dir, then load (or train) and evaluate the baseline."""
    device = check(config)
    seed_everything(config.seed)
    splits = load_splits(config)
    recal_batches = check_batches(config.bn_recalibrate, -(-len(splits[1]) // config.batch_size))
    baseline = build_model(config.model, config.dataset)
    have_baseline = load_baseline(config, baseline)
    stats = load_statistics(config, baseline)
    save_dir = ensure_writable_dir(config.save_dir)
    if not have_baseline:
        ensure_writable_dir(config.baseline_dir)
    record(save_dir)
    loaders = (train_loader(config, splits[0]),
               make_loader(splits[2], config.batch_size, shuffle=False, workers=config.workers))
    baseline.to(device)
    if not have_baseline:
        train_baseline(config, baseline, loaders, device, save_dir)
    baseline_top1 = evaluate(baseline, loaders[1], device)["top1"]
    print(f"baseline top-1: {baseline_top1:.2f}%", flush=True)
    return Session(device, splits, loaders, baseline, baseline_top1, stats, recal_batches)


def run_point(config: PruneConfig, session: Session, started: float,
              on_epoch_end: Optional[Callable[[int, Dict[str, float]], None]] = None) -> Dict[str, Any]:
    """Masks, slim network, reports, fine-tuning and summary in ``config.save_dir``; returns the summary."""
    save_dir, device, loaders = Path(config.save_dir), session.device, session.loaders
    pruned_path = save_dir / "pruned.pth"
    if config.resume and pruned_path.exists():
        model, masks, selection = load_pruned(pruned_path)
        model.to(device)
    else:
        model, masks, selection = prune(config, session.baseline, session.stats, session.splits[1], loaders[0],
                                        device)
        if config.reconstruct:
            refit(config, session.baseline, model, masks, session.splits[1], device)
        save_slim_checkpoint(pruned_path, config.model, model, masks, num_classes_for(config.dataset),
                             {**asdict(config), SELECTION_KEY: selection}, dataset=config.dataset)
    costs = report(config, session.baseline, model, masks, save_dir)
    latency = measure_latency(config, session.baseline, model, input_size_for(config.dataset), device)
    plot_kept_filters(pd.read_csv(save_dir / "layers.csv"), save_dir / "layers.png",
                      f"{config.method} on {config.model} / {config.dataset}, {save_dir.name}")
    pruned_top1 = evaluate(model, loaders[1], device)["top1"]
    print(f"pruned top-1 right after pruning: {pruned_top1:.2f}%", flush=True)
    accuracies = {"baseline_top1": session.baseline_top1, "pruned_top1_before_finetune": pruned_top1,
                  "pruned_top1_recalibrated": None}
    if session.recal_batches:
        recalibrate(config, model, session.splits[1], session.recal_batches, device)
        accuracies["pruned_top1_recalibrated"] = evaluate(model, loaders[1], device)["top1"]
        print(f"pruned top-1 after BatchNorm re-estimation on {session.recal_batches} batches: "
              f"{accuracies['pruned_top1_recalibrated']:.2f}%", flush=True)
    log = finetune(config, model, masks, loaders, device, save_dir, on_epoch_end,
                   teacher=session.baseline if config.distill else None)
    summary = summarize(config, masks, costs, {**accuracies, "bn_recalibrate": session.recal_batches}, log,
                        time.perf_counter() - started, {**selection, **latency})
    write_summary(summary, save_dir)
    print(result_line(save_dir, [summary]), flush=True)
    return summary


def run(config: PruneConfig, on_epoch_end: Optional[Callable[[int, Dict[str, float]], None]] = None
        ) -> Dict[str, Any]:
    """The whole run (see the module docstring); returns the summary. ``on_epoch_end`` goes to ``fit``."""
    started = time.perf_counter()
    config = resolve(claim_folder(config))
    session = open_session(config, lambda save_dir: record_arguments(config, save_dir))
    return run_point(config, session, started, on_epoch_end)


def claim_folder(config: PruneConfig) -> PruneConfig:
    """``config`` with the folder the run writes to: ``--save_dir`` (refused when it holds another run, unless
    resuming) or, when none is given, the default folder or the next free name after it (``runs.folders``)."""
    default = config.save_dir is None
    directory = defaults(config)["save_dir"] if default else config.save_dir
    if not config.resume:
        directory = str(claim(directory, RUN_FILES, default=default, flag="--save_dir",
                              to_continue="continue it with --resume (same arguments)"))
    return replace(config, save_dir=directory)


def summarize(config: PruneConfig, masks: Masks, costs: pd.DataFrame, accuracies: Dict[str, float],
              log: pd.DataFrame, seconds: float, measured: Dict[str, Any]) -> Dict[str, Any]:
    """The run's results as one flat record (accuracies in percent; the pruned one is the last epoch's);
    ``measured``: what the selection reported (``cifar_steps.choose_masks``) and the latency report
    (``cifar_steps.measure_latency``)."""
    return {"model": config.model, "dataset": config.dataset, "method": config.method, "scope": config.scope,
            "cdp_mode": config.cdp_mode if config.method == "cdp" else None,
            "variant": config.variant().label(config.method), "site": config.site,
            "normalize": config.normalize, "cost_power": config.cost_power,
            "weight_power": config.weight_power, "rule": config.rule,
            "max_layer_sparsity": config.max_layer_sparsity,
            "sparsity": config.sparsity,
            "flops_reduction": config.flops_reduction,
            "latency_reduction": config.latency_reduction,
            "filters_removed_pct": 100.0 * removed_fraction(keep_vectors(masks)), **accuracies,
            "pruned_top1": log.attrs["final_top1"], "best_top1": log.attrs["best_top1"],
            "best_epoch": log.attrs["best_epoch"], **cost_summary(costs), **measured, "epochs": config.epochs,
            "layerwise_retrain": config.layerwise_retrain, "seed": config.seed, "wall_time_s": seconds}


def load_pruned(path: Path) -> Tuple[nn.Module, Masks, Dict[str, Any]]:
    """The slim network, its masks and what the selection reported, from this run's pruned.pth (written before
    fine-tuning began)."""
    _, ckpt = load_pruned_checkpoint(path)
    return (*rebuild_slim(ckpt, what=str(path)), dict(ckpt["args"].get(SELECTION_KEY, {})))

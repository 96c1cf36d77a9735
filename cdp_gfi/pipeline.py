"""One pruning run on 32x32 data: pretrained (or freshly trained) network in, slim fine-tuned network out.

``run(PruneConfig(...))`` is what ``prune_cifar.py`` calls; an NNI trial or
another script calls it, or its steps, the same way. Everything cheap is
checked before any long work. Files written in ``save_dir``:

- ``args.json``: the run's arguments (``resume`` refuses other ones);
- ``baseline/``: the training log of a baseline trained here (its weights are
  cached as ``<baseline_dir>/<model>_<dataset>_seed<seed>.pth``);
- ``pruned.pth``: the slimmed network before fine-tuning (a "slim" checkpoint,
  ``cdp_gfi.load_slim`` reads it); ``layers.csv`` (kept filters) and ``costs.csv`` (MACs
  and parameters, both conventions);
- ``log.csv``, ``last.pth``, ``best.pth``: fine-tuning (``train.fit``); each
  checkpoint also holds what rebuilds the slim network (``slim_files.slim_recipe``:
  ``load_slim`` reads them too) and ``args``;
- ``summary.json`` and ``summary.csv``: the results in one record.

``sweep(config, targets)`` runs several targets from one statistics pass, each
point as above in ``point_<target>/`` (plus ``layers.png``), then writes
``sweep.csv`` and ``sweep.png`` in ``save_dir``.
"""
from __future__ import annotations

import copy
import hashlib
import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import pandas as pd
import torch
from torch import nn
from torch.optim.lr_scheduler import ConstantLR
from torch.utils.data import DataLoader, Dataset

from .checkpoint import atomic_open, ensure_writable_dir, load_state_dict_strict, save_atomic
from .pretrained import load_pretrained
from .recalibrate import check_batches, recalibrate_batchnorm
from .data import Splits, cifar_datasets, digits_datasets, make_loader, sample_loader
from .distributed import parse_device
from .fingerprint import fingerprint
from .flops import CONVENTIONS, keep_vectors
from .graph import ModelGraph, trace
from .masked import MaskEnforcer, Masks
from .masks import check_fraction, select, to_nni_masks
from .models import build_model, input_size_for, models_for, num_classes_for
from .plots import plot_kept_filters, plot_pruning_effect
from .report import cost_summary, cost_table, kept_table, measure, removed_fraction, write_summary, write_table
from .mask_files import kept_vectors
from .retrain import EpochTaggedSampler, SeededAugmentation, load_pruned_checkpoint
from .slim_files import rebuild_slim, save_slim_checkpoint, slim_recipe
from .groups import Unit
from .scope import SCOPES, prunable_units, unit_convs
from .scores import scores_from_statistics, statistics_kinds
from .sites import read_points
from .variants import CriterionOptions
from .slim import slim
from .statistics import Statistics, collect_statistics
from .train import build_optimizer, build_scheduler, evaluate, fit, seed_everything, train_one_epoch

DATASETS = ("cifar10", "cifar100", "digits")
SCHEDULES = ("cosine", "step")
DIGITS_FLOPS_REDUCTION = 0.45
BASELINE_LR = 0.1
# Where files live, not what they compute: free to differ when a run is resumed.
RUNTIME_ONLY = frozenset({"resume", "workers", "device", "gpus", "dataroot", "download", "integrity_check",
                          "save_dir", "statistics_file", "baseline_dir"})
# A fresh run in an old save_dir removes these, so a later --resume never continues the old run.
RUN_FILES = ("pruned.pth", "last.pth", "best.pth", "log.csv", "baseline/last.pth", "baseline/best.pth",
             "baseline/log.csv")


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
    stop_batch: Optional[int] = None
    batch_size: Optional[int] = None
    epochs: Optional[int] = None
    lr: Optional[float] = None
    momentum: float = 0.9
    wd: float = 5e-4
    schedule: str = "cosine"
    layerwise_retrain: int = 0
    bn_recalibrate: Optional[int] = None
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
        if config.sparsity is None and config.flops_reduction is None:
            out["flops_reduction"] = DIGITS_FLOPS_REDUCTION
    out.update(asdict(config.variant()))
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


def check(config: PruneConfig) -> torch.device:
    """Refuse bad settings of a resolved config (ranges, choices, flag combinations, device); returns the device."""
    if config.dataset not in DATASETS:
        raise ValueError(f"--dataset must be one of {DATASETS}, got {config.dataset!r}")
    if config.model not in models_for(config.dataset):
        raise ValueError(f"--model {config.model!r} is not one of {list(models_for(config.dataset))}")
    statistics_kinds(config.method, config.cdp_mode)
    if (config.sparsity is None) == (config.flops_reduction is None):
        raise ValueError("give exactly one of --sparsity and --flops_reduction")
    check_fraction(config.sparsity if config.sparsity is not None else config.flops_reduction,
                   "--sparsity" if config.sparsity is not None else "--flops_reduction")
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
    for name in ("stop_batch", "batch_size", "epochs", "baseline_epochs"):
        _positive_int(config, name)
    for name in ("workers", "layerwise_retrain"):
        _positive_int(config, name, minimum=0)
    if not config.lr > 0 or not 0 <= config.momentum < 1 or not config.wd >= 0:
        raise ValueError(f"need --lr > 0, 0 <= --momentum < 1, --wd >= 0; got {config.lr}, {config.momentum}, "
                         f"{config.wd}")
    if config.dataset == "digits" and config.dataroot:
        raise ValueError("--dataroot is not used with --dataset digits (scikit-learn ships the images)")
    if config.dataset != "digits" and not config.dataroot:
        raise ValueError(f"--dataroot is required for --dataset {config.dataset}")
    if config.pretrained_dir and config.train_baseline:
        raise ValueError("give --pretrained_dir or --train_baseline, not both")
    if config.dataset != "digits" and not (config.pretrained_dir or config.train_baseline):
        raise ValueError("give --pretrained_dir (a trained checkpoint) or --train_baseline (train one first)")
    return parse_device(config.device, config.gpus)


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

    ``overrides`` replaces some of them (a sweep records its list of targets).
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
    for name in RUN_FILES:
        (save_dir / name).unlink(missing_ok=True)
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


def choose_masks(config: PruneConfig, model: nn.Module, stats: Statistics, graph: ModelGraph,
                 units: Dict[str, Unit]) -> Masks:
    """Scores of the method, then one global selection over the units for the sparsity or FLOPs target."""
    scores, tiebreak = scores_from_statistics(stats, config.method, config.cdp_mode, config.coe, unit_convs(units))
    keep, _ = select(config.method, scores, tiebreak, sparsity=config.sparsity,
                     flops_reduction=config.flops_reduction, graph=graph, convention=config.flops_convention,
                     units=units, round_to=config.round_to, normalization=config.normalize,
                     cost_power=config.cost_power, rule=config.rule, max_layer_sparsity=config.max_layer_sparsity)
    return to_nni_masks(model, keep)


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
          loader: DataLoader, device: torch.device) -> Tuple[nn.Module, Masks]:
    """Statistics (unless given), masks, optional layer-wise retraining, slimming: a pruned copy of ``baseline``."""
    seed_everything(config.seed)
    graph = trace(baseline, _dummy(config))
    units = prunable_units(graph, config.scope)
    stats = stats or gather_statistics(config, baseline, plain_train, graph, unit_convs(units), device)
    model = copy.deepcopy(baseline).cpu()
    masks = choose_masks(config, model, stats, graph, units)
    if config.layerwise_retrain:
        layerwise_retrain(config, model.to(device), masks, graph, loader, device)
    slim(model.cpu().eval(), masks, _dummy(config))
    return model.to(device), masks


def recalibrate(config: PruneConfig, model: nn.Module, plain_train: Dataset, batches: int,
                device: torch.device) -> None:
    """Re-estimate the pruned network's BatchNorm statistics on ``batches`` seeded batches of plain training images."""
    loader = make_loader(plain_train, config.batch_size, shuffle=True, workers=config.workers, seed=config.seed)
    recalibrate_batchnorm(model, loader, batches, device)


def report(config: PruneConfig, baseline: nn.Module, model: nn.Module, masks: Masks, save_dir: Path
           ) -> pd.DataFrame:
    """Print and save kept filters per layer (layers.csv) and MACs/params before and after (costs.csv)."""
    size = input_size_for(config.dataset)
    write_table(kept_table(keep_vectors(masks)), save_dir / "layers.csv", "Filters kept per pruned layer")
    costs = cost_table(measure(baseline, size), measure(model, size))
    write_table(costs, save_dir / "costs.csv", "MACs and parameters per image, before and after pruning")
    return costs


def finetune(config: PruneConfig, model: nn.Module, masks: Masks, loaders: Tuple[DataLoader, DataLoader],
             device: torch.device, save_dir: Path,
             on_epoch_end: Optional[Callable[[int, Dict[str, float]], None]] = None) -> pd.DataFrame:
    """Fine-tune the slim network (SGD Nesterov, cosine or step); checkpoints carry its recipe and args."""
    seed_everything(config.seed)
    optimizer = build_optimizer(model, config.lr, config.momentum, config.wd, nesterov=True)
    scheduler = build_scheduler(optimizer, config.schedule, config.epochs, len(loaders[0]))
    extra = {"route": "slim", **slim_recipe(config.model, config.dataset, num_classes_for(config.dataset), masks),
             "args": asdict(config)}
    return fit(model, *loaders, epochs=config.epochs, optimizer=optimizer, scheduler=scheduler, device=device,
               run_dir=save_dir, make_checkpoint=lambda: extra, resume=config.resume, on_epoch_end=on_epoch_end)


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
        model, masks = load_pruned(pruned_path)
        model.to(device)
    else:
        model, masks = prune(config, session.baseline, session.stats, session.splits[1], loaders[0], device)
        save_slim_checkpoint(pruned_path, config.model, model, masks, num_classes_for(config.dataset),
                             asdict(config), dataset=config.dataset)
    costs = report(config, session.baseline, model, masks, save_dir)
    pruned_top1 = evaluate(model, loaders[1], device)["top1"]
    print(f"pruned top-1 right after pruning: {pruned_top1:.2f}%", flush=True)
    accuracies = {"baseline_top1": session.baseline_top1, "pruned_top1_before_finetune": pruned_top1,
                  "pruned_top1_recalibrated": None}
    if session.recal_batches:
        recalibrate(config, model, session.splits[1], session.recal_batches, device)
        accuracies["pruned_top1_recalibrated"] = evaluate(model, loaders[1], device)["top1"]
        print(f"pruned top-1 after BatchNorm re-estimation on {session.recal_batches} batches: "
              f"{accuracies['pruned_top1_recalibrated']:.2f}%", flush=True)
    log = finetune(config, model, masks, loaders, device, save_dir, on_epoch_end)
    summary = summarize(config, masks, costs, {**accuracies, "bn_recalibrate": session.recal_batches}, log,
                        time.perf_counter() - started)
    write_summary(summary, save_dir)
    print("Summary\n" + json.dumps(summary, indent=2), flush=True)
    return summary


def run(config: PruneConfig, on_epoch_end: Optional[Callable[[int, Dict[str, float]], None]] = None
        ) -> Dict[str, Any]:
    """The whole run (see the module docstring); returns the summary. ``on_epoch_end`` goes to ``fit``."""
    started = time.perf_counter()
    config = resolve(config)
    session = open_session(config, lambda save_dir: record_arguments(config, save_dir))
    return run_point(config, session, started, on_epoch_end)


def sweep(config: PruneConfig, targets: Sequence[float]) -> pd.DataFrame:
    """Several targets (of ``--sparsity``, or of ``--flops_reduction`` when that is set) from one statistics pass.

    Each point runs like a single run in ``save_dir/point_<target>/``; then
    ``sweep.csv`` (one summary row per point, plus the selection's score
    threshold and the point's seconds) and ``sweep.png`` (the pruning effect)
    go to ``save_dir``. With ``resume``, finished points are kept and the
    others continue.
    """
    key = "sparsity" if config.sparsity is not None else "flops_reduction"
    targets = [check_fraction(t, f"--{key}") for t in targets]
    config = resolve(replace(config, **{key: targets[0]}))
    session = open_session(config, lambda save_dir: record_arguments(config, save_dir, {key: targets}))
    seed_everything(config.seed)
    graph = trace(session.baseline, _dummy(config))
    layers = unit_convs(prunable_units(graph, config.scope))
    session.stats = session.stats or gather_statistics(config, session.baseline, session.splits[1], graph, layers,
                                                       session.device)
    scores, _ = scores_from_statistics(session.stats, config.method, config.cdp_mode, config.coe, layers)
    rows = [sweep_point(replace(config, **{key: t}, save_dir=str(Path(config.save_dir) / f"point_{t:g}")),
                        session, scores) for t in targets]
    frame = pd.DataFrame(rows)
    write_table(frame, Path(config.save_dir) / "sweep.csv", f"Sweep over --{key}")
    plot_pruning_effect(frame, Path(config.save_dir) / "sweep.png",
                        f"{config.method} on {config.model} / {config.dataset}")
    return frame


def sweep_point(config: PruneConfig, session: Session, scores: Dict[str, torch.Tensor]) -> Dict[str, Any]:
    """One point of a sweep (skipped when resuming a finished one): its summary, threshold and seconds."""
    save_dir = Path(config.save_dir)
    resume = config.resume and (save_dir / "args.json").exists()
    config = replace(config, resume=resume)
    ensure_writable_dir(save_dir)
    record_arguments(config, save_dir)
    if resume and (save_dir / "summary.json").exists():
        summary = json.loads((save_dir / "summary.json").read_text())
        print(f"sweep: {save_dir.name} already finished", flush=True)
    else:
        summary = run_point(config, session, time.perf_counter())
        plot_kept_filters(pd.read_csv(save_dir / "layers.csv"), save_dir / "layers.png",
                          f"{config.method} on {config.model}, {save_dir.name}")
    _, ckpt = load_pruned_checkpoint(save_dir / "pruned.pth")
    return {**summary, "threshold": selection_threshold(scores, kept_vectors(ckpt["masks"])),
            "point_time_s": summary["wall_time_s"]}


def selection_threshold(scores: Dict[str, torch.Tensor], keep: Dict[str, torch.Tensor]) -> float:
    """The score threshold a selection used: the highest score among removed filters (GFI-AP's T)."""
    removed = [scores[name][~k] for name, k in keep.items() if (~k).any()]
    return float(torch.cat(removed).max()) if removed else float("nan")


def summarize(config: PruneConfig, masks: Masks, costs: pd.DataFrame, accuracies: Dict[str, float],
              log: pd.DataFrame, seconds: float) -> Dict[str, Any]:
    """The run's results as one flat record (accuracies in percent; the pruned one is the last epoch's)."""
    return {"model": config.model, "dataset": config.dataset, "method": config.method, "scope": config.scope,
            "cdp_mode": config.cdp_mode if config.method == "cdp" else None,
            "variant": config.variant().label(config.method), "site": config.site,
            "normalize": config.normalize, "cost_power": config.cost_power, "rule": config.rule,
            "max_layer_sparsity": config.max_layer_sparsity,
            "sparsity": config.sparsity,
            "flops_reduction": config.flops_reduction,
            "filters_removed_pct": 100.0 * removed_fraction(keep_vectors(masks)), **accuracies,
            "pruned_top1": log.attrs["final_top1"], "best_top1": log.attrs["best_top1"],
            "best_epoch": log.attrs["best_epoch"], **cost_summary(costs), "epochs": config.epochs,
            "layerwise_retrain": config.layerwise_retrain, "seed": config.seed, "wall_time_s": seconds}


def load_pruned(path: Path) -> Tuple[nn.Module, Masks]:
    """The slim network and its masks from this run's pruned.pth (written before fine-tuning began)."""
    _, ckpt = load_pruned_checkpoint(path)
    return rebuild_slim(ckpt, what=str(path))

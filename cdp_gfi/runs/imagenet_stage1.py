"""Stage 1 of the ImageNet pipeline: one statistics pass, then masks and a slim network per pruning target.

``run(Stage1Config(...))`` is what ``statistic_imagenet.py`` calls. Everything
cheap is checked before the statistics pass. The statistics come from
``stop_batch x batch_size`` training images drawn class-balanced and shuffled
with ``seed`` (the same images whatever the number of processes), read class
by class, so GFI-AP holds one class's maps at a time; under torchrun each rank
reads whole classes and the sums are all-reduced. A list of
targets (``sparsity=(0.3, 0.5)``) is a sweep scored from that one pass.

Files (only rank 0 writes):

- the statistics file (default ``<save_model_path>/statistics.pth``), reused
  by a later run when it matches the model, weights and sampling settings;
- per target, in ``save_model_path`` (one target) or
  ``save_model_path/<sparsity|flops_reduction>_<value>/`` (a sweep):
  ``masks.pth`` and ``slim.pth`` (``retrain``'s masks and slim checkpoints; the slim network
  with its BatchNorm statistics re-estimated on ``bn_recalibrate`` batches,
  which ``imagenet/imagenet.py --resume`` reads), ``layers.csv`` and ``layers.png``
  (filters kept per layer) and ``costs.csv`` (MACs and parameters, both conventions);
- ``results.csv`` in ``save_model_path``: one row per target.

A fresh run never writes into a folder holding another stage-1 run
(``claim_output``). It ends with one result line and the stage-2 command.
"""
from __future__ import annotations

import copy
import shlex
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..data.datasets import imagenet_datasets
from ..data.samplers import ClassShardSampler, dataset_targets, make_loader, sample_loader
from ..distributed import DEFAULT_TIMEOUT_S, DistInfo, from_main_rank, on_every_rank, same_on_every_rank
from ..files.checkpoint import ensure_writable_dir
from ..files.pretrained import load_pretrained
from ..flops import CONVENTIONS, keep_vectors
from ..graph.groups import Unit
from ..graph.scope import SCOPES, prunable_units, unit_convs
from ..graph.sites import read_points
from ..graph.trace import ModelGraph, trace
from ..latency.timing import resolve_device as latency_device
from ..masks.masked import Masks
from ..masks.select import check_fraction
from ..masks.variants import CriterionOptions
from ..models import build_model, check_model_name
from ..scores.importance import statistics_kinds
from ..slimming.slim_files import SLIM_DUMMY_SIZE, save_slim_checkpoint
from ..slimming.speedup import slim
from ..statistics.collect import collect_statistics
from ..statistics.fingerprint import fingerprint
from ..statistics.store import Statistics
from ..train.loop import seed_everything
from ..train.recalibrate import check_batches, recalibrate_batchnorm
from .cifar_config import PruneConfig
from .cifar_steps import choose_masks, measure_latency
from .cli import USER_ERRORS
from .folders import claim
from .imagenet_stage2 import resolve_device, save_masks_checkpoint
from .plots import plot_kept_filters
from .report import Costs, cost_summary, cost_table, kept_table, measure, removed_fraction, result_line, write_table

STATISTICS_NAME, MASKS_NAME, SLIM_NAME = "statistics.pth", "masks.pth", "slim.pth"
RESULTS_NAME, LAYERS_NAME, COSTS_NAME = "results.csv", "layers.csv", "costs.csv"
# An output folder holding any of these holds a stage-1 run (a statistics file alone is there to be reused)
STAGE1_FILES = (MASKS_NAME, SLIM_NAME, RESULTS_NAME, LAYERS_NAME, COSTS_NAME, "sparsity_*", "flops_reduction_*",
                "latency_reduction_*")
TARGET_KINDS = ("sparsity", "flops_reduction", "latency_reduction")
MIN_INPUT_SIZE = 32


@dataclass(frozen=True)
class Stage1Config(CriterionOptions):
    """Every setting of a stage-1 run (the CDP README's flags of statistic_imagenet.py, plus a few)."""

    model: str = "resnet50"
    dataroot: Optional[str] = None
    pretrained_dir: Optional[str] = None
    allow_random_init: bool = False
    sparsity: Tuple[float, ...] = ()
    flops_reduction: Tuple[float, ...] = ()
    flops_convention: str = "conv-linear"
    latency_reduction: Tuple[float, ...] = ()
    latency_device: Optional[str] = None
    latency_batch: int = 1
    latency_order: str = "auto"
    latency_amp: bool = False
    latency_channels_last: bool = False
    stop_batch: int = 200
    batch_size: int = 128
    workers: int = 4
    input_size: int = 224
    save_statistic_file: str = STATISTICS_NAME
    save_statistic_path: Optional[str] = None
    save_model_path: Optional[str] = None
    recompute_statistics: bool = False
    bn_recalibrate: Optional[int] = None
    seed: int = 0
    gpus: Optional[str] = None
    device: Optional[str] = None
    dist_timeout: float = DEFAULT_TIMEOUT_S


@dataclass(frozen=True)
class Target:
    """One pruning target of a run: a fraction of filters ("sparsity"), of MACs ("flops_reduction") or of the
    measured latency ("latency_reduction")."""

    kind: str
    value: float

    @property
    def name(self) -> str:
        """The target's subdirectory name in a sweep."""
        return f"{self.kind}_{self.value:g}"


@dataclass
class Point:
    """The outcome for one target: masks, the slimmed network, its costs and what the selection reported."""

    target: Target
    masks: Masks
    model: nn.Module
    costs: pd.DataFrame
    selection: Dict[str, Any]


def parse_fractions(text: Optional[str], flag: str) -> Tuple[float, ...]:
    """Comma-separated fractions, each strictly between 0 and 1 and none repeated ("" or None: none)."""
    if not text:
        return ()
    try:
        values = tuple(float(part) for part in text.split(","))
    except ValueError:
        raise ValueError(f"{flag} {text!r}: expected comma-separated numbers such as 0.3,0.5") from None
    for value in values:
        check_fraction(value, flag)
    if len(set(values)) != len(values):
        raise ValueError(f"{flag} {text!r} lists a value twice")
    return values


def targets_of(config: Stage1Config) -> List[Target]:
    """The run's targets, in the order given."""
    given = [kind for kind in TARGET_KINDS if getattr(config, kind)]
    if config.latency_reduction and len(given) > 1:
        raise ValueError(f"give --latency_reduction or --{given[0]}, not both: they are two targets")
    if len(given) != 1:
        raise ValueError("give exactly one of --sparsity and --flops_reduction (or --latency_reduction; each may be "
                         "a list: 0.3,0.5)")
    kind = given[0]
    values = getattr(config, kind)
    for value in values:
        check_fraction(value, f"--{kind}")
    return [Target(kind, float(value)) for value in values]


def _check_int(config: Stage1Config, name: str, minimum: int) -> None:
    value = getattr(config, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"--{name} must be an integer >= {minimum}, got {value!r}")


def check(config: Stage1Config) -> List[Target]:
    """Refuse bad settings (choices, ranges, flag combinations); returns the targets."""
    check_model_name(config.model, "imagenet")
    statistics_kinds(config.method, config.cdp_mode)
    targets = targets_of(config)
    if config.flops_convention not in CONVENTIONS:
        raise ValueError(f"--flops_convention must be one of {CONVENTIONS}, got {config.flops_convention!r}")
    if config.coe is not None and not config.coe >= 0:
        raise ValueError(f"--coe must be >= 0 (0: no layer rescaling), got {config.coe}")
    if config.scope not in SCOPES:
        raise ValueError(f"--scope must be one of {SCOPES}, got {config.scope!r}")
    if config.round_to is not None and config.round_to < 1:
        raise ValueError(f"--round_to must be a positive integer, got {config.round_to}")
    for name, minimum in (("stop_batch", 1), ("batch_size", 1), ("workers", 0), ("input_size", MIN_INPUT_SIZE),
                          ("latency_batch", 1)):
        _check_int(config, name, minimum)
    if not config.dataroot:
        raise ValueError("--dataroot is required (a folder with train/ and val/ class folders)")
    if not config.save_statistic_file:
        raise ValueError("--save_statistic_file must name a file")
    if not config.pretrained_dir and not config.allow_random_init:
        raise ValueError("give --pretrained_dir (trained weights): pruning statistics of an untrained network are "
                         "meaningless; --allow_random_init overrides this for tests")
    return targets


def output_dir(config: Stage1Config) -> Path:
    """Where the run's files go (default ckpt/imagenet_<model>_<method>)."""
    return Path(config.save_model_path or f"ckpt/imagenet_{config.model}_{config.method}")


def statistics_path(config: Stage1Config) -> Path:
    """The statistics file: --save_statistic_file inside --save_statistic_path (default: the output folder)."""
    return Path(config.save_statistic_path or output_dir(config)) / config.save_statistic_file


def point_dir(config: Stage1Config, target: Target, sweep: bool) -> Path:
    """A target's folder: the output folder itself, or its subfolder in a sweep."""
    return output_dir(config) / target.name if sweep else output_dir(config)


def load_model(config: Stage1Config, num_classes: int) -> nn.Module:
    """The dense network in eval mode: --pretrained_dir loaded strictly, or seeded random weights."""
    seed_everything(config.seed)
    model = build_model(config.model, "imagenet", num_classes)
    if config.pretrained_dir:
        load_pretrained(model, config.pretrained_dir, what="--pretrained_dir")
    return model.eval()


def sampling_meta(config: Stage1Config, model: nn.Module, num_classes: int) -> Dict[str, Any]:
    """What the statistics record: the model, its classes and their fingerprint (weights hash, sample settings)."""
    return {"model": config.model, "num_classes": num_classes,
            "fingerprint": fingerprint(model, model=config.model, dataroot=config.dataroot, seed=config.seed,
                                       stop_batch=config.stop_batch, batch_size=config.batch_size,
                                       input_size=config.input_size, scope=config.scope,
                                       feature_site=config.site)}


def reuse_statistics(config: Stage1Config, model: nn.Module, meta: Dict[str, Any], path: Path
                     ) -> Optional[Statistics]:
    """The statistics in an existing file if they match model, fingerprint and method; else None."""
    if config.recompute_statistics or not path.exists():
        return None
    hint = "; pass --recompute_statistics to gather new ones (or another --save_statistic_file)"
    stats = Statistics.load(str(path), model, fingerprint=meta["fingerprint"], hint=hint)
    missing = [k for k in statistics_kinds(config.method, config.cdp_mode) if not stats.has(k)]
    if missing:
        raise ValueError(f"statistics file {str(path)!r} holds {stats.kinds()}, not the {missing} that "
                         f"--method {config.method} needs" + hint)
    return stats


def statistics_loader(config: Stage1Config, dataset: Dataset, info: DistInfo) -> DataLoader:
    """This rank's whole classes of the seeded class-balanced sample of stop_batch x batch_size images, class by
    class (so GFI-AP keeps one class's maps at a time)."""
    sample = sample_loader(dataset, config.batch_size, config.stop_batch, config.seed, class_balanced=True).dataset
    return make_loader(sample, config.batch_size, shuffle=False, workers=config.workers, seed=config.seed,
                       sampler=ClassShardSampler(dataset_targets(sample), info.world_size, info.rank))


def dummy_input(config: Stage1Config) -> torch.Tensor:
    """One blank image at the run's input size."""
    return torch.zeros(1, 3, config.input_size, config.input_size)


def gather_statistics(config: Stage1Config, model: nn.Module, dataset: Dataset, graph: ModelGraph,
                      layers: Sequence[str], meta: Dict[str, Any], info: DistInfo) -> Statistics:
    """One statistics pass at the run's feature site, class by class, saved by rank 0."""
    loader = statistics_loader(config, dataset, info)
    if info.is_main:
        print(f"statistics: sampling {len(loader.dataset)} images (class-balanced, seed "
              f"{config.seed}) on {info.world_size} process(es), {info.device}", flush=True)
    stats = collect_statistics(model.to(info.device), loader, layers, statistics_kinds(config.method, config.cdp_mode),
                               num_classes=meta["num_classes"], device=info.device, dummy_input=dummy_input(config).to(info.device),
                               progress=info.is_main, meta=meta,
                               read_at=read_points(graph, layers, config.site))
    model.cpu()
    if info.is_main:
        stats.save(str(statistics_path(config)))
        print(f"statistics: wrote {statistics_path(config)}", flush=True)
    return stats


def masks_for(config: Stage1Config, target: Target, model: nn.Module, stats: Statistics, graph: ModelGraph,
              units: Dict[str, Unit], device: torch.device) -> Tuple[Masks, Dict[str, Any]]:
    """NNI masks for one target, chosen by the CIFAR pipeline's scoring and global selection (a latency target
    measured on ``--latency_device``, by default ``device``), and what the selection reported."""
    criterion = {f.name: getattr(config, f.name) for f in fields(CriterionOptions)}
    prune_config = PruneConfig(**criterion, flops_convention=config.flops_convention, **{target.kind: target.value},
                               latency_device=config.latency_device, latency_batch=config.latency_batch,
                               latency_order=config.latency_order, latency_amp=config.latency_amp, latency_channels_last=config.latency_channels_last)
    return choose_masks(prune_config, model, stats, graph, units, dummy_input(config), device)


def slim_point(target: Target, model: nn.Module, masks: Masks, dense_costs: Costs, input_size: int,
               recalibration: Optional[Tuple[DataLoader, int]] = None, selection: Optional[Dict[str, Any]] = None
               ) -> Point:
    """Slim a copy of the dense network with ``masks`` (at <= 64x64: only the shape matters) and count its costs.

    ``recalibration`` = (loader, batches) re-estimates the slim network's BatchNorm statistics; ``selection`` is
    what the selection reported (``choose_masks``).
    """
    size = min(SLIM_DUMMY_SIZE, input_size)
    slimmed = slim(copy.deepcopy(model).eval(), masks, torch.randn(1, 3, size, size))
    if recalibration is not None and recalibration[1]:
        recalibrate_batchnorm(slimmed, *recalibration)
    return Point(target, masks, slimmed, cost_table(dense_costs, measure(slimmed, (3, input_size, input_size))),
                 dict(selection or {}))


def write_point(config: Stage1Config, point: Point, dense: nn.Module, num_classes: int, directory: Path,
                device: torch.device) -> Dict[str, Any]:
    """Write one target's checkpoints and tables; returns its results row, with the dense and slim latency on
    ``--latency_device`` (default ``device``) at batch 1 and the run's batch size."""
    args = {**asdict(config), "target": point.target.kind, "target_value": point.target.value}
    save_masks_checkpoint(directory / MASKS_NAME, config.model, num_classes, point.masks, dense.state_dict(), args)
    save_slim_checkpoint(directory / SLIM_NAME, config.model, point.model, point.masks, num_classes, args)
    keep = keep_vectors(point.masks)
    write_table(kept_table(keep), directory / LAYERS_NAME, f"{point.target.name}: filters kept per pruned layer")
    plot_kept_filters(kept_table(keep), directory / "layers.png",
                      f"{config.method} on {config.model}, {point.target.name}")
    write_table(point.costs, directory / COSTS_NAME, f"{point.target.name}: MACs and parameters per image")
    return {"target": point.target.kind, "target_value": point.target.value, "method": config.method,
            "cdp_mode": config.cdp_mode if config.method == "cdp" else None, "dir": str(directory),
            "achieved_sparsity": removed_fraction(keep), **cost_summary(point.costs), **point.selection,
            **measure_latency(config, dense, point.model, (3, config.input_size, config.input_size), device)}


def prepare_dirs(config: Stage1Config, targets: Sequence[Target]) -> None:
    """Prove every output folder (and the statistics file's) writable before any long work."""
    for target in targets:
        ensure_writable_dir(point_dir(config, target, len(targets) > 1))
    ensure_writable_dir(statistics_path(config).parent)


def write_results(config: Stage1Config, points: Sequence[Point], dense: nn.Module, num_classes: int,
                  device: torch.device) -> pd.DataFrame:
    """Write every target's files and results.csv (one row per target; latency measured on ``device`` unless
    ``--latency_device`` says otherwise)."""
    rows = [write_point(config, p, dense, num_classes, point_dir(config, p.target, len(points) > 1), device)
            for p in points]
    results = pd.DataFrame(rows)
    write_table(results, output_dir(config) / RESULTS_NAME, "Results, one row per target")
    return results


@dataclass
class Prepared:
    """What every rank has once its inputs are checked: data, dense network, graph, units and any reused statistics."""

    train_plain: Dataset
    num_classes: int
    recal_batches: int
    model: nn.Module
    meta: Dict[str, Any]
    graph: ModelGraph
    units: Dict[str, Unit]
    stats: Optional[Statistics]


def prepare(config: Stage1Config, targets: Sequence[Target], info: DistInfo) -> Prepared:
    """Check this rank's inputs (data, folders, weights, a statistics file to reuse) before any long work."""
    _, train_plain, _ = imagenet_datasets(config.dataroot, config.input_size)
    num_classes = len(train_plain.classes)
    recal_batches = check_batches(config.bn_recalibrate, -(-len(train_plain) // config.batch_size))
    if info.is_main:
        prepare_dirs(config, targets)
    model = load_model(config, num_classes)
    meta = sampling_meta(config, model, num_classes)
    graph = trace(model, dummy_input(config))
    units = prunable_units(graph, config.scope)
    stats = reuse_statistics(config, model, meta, statistics_path(config))
    return Prepared(train_plain, num_classes, recal_batches, model, meta, graph, units, stats)


def run(config: Stage1Config) -> Optional[pd.DataFrame]:
    """The whole stage (see the module docstring); returns the results table on rank 0, None elsewhere.

    Under torchrun every rank checks its inputs and agrees before the
    statistics pass; after the masks are chosen rank 0 alone slims and writes.
    """
    config = replace(config, **asdict(config.variant()))
    targets = check(config)
    info = resolve_device(config)
    on_every_rank(lambda: latency_device(config.latency_device, info.device), USER_ERRORS)
    config = claim_output(config, info)
    p = on_every_rank(lambda: prepare(config, targets, info), USER_ERRORS)
    same_on_every_rank(p.meta["fingerprint"]["weights_sha256"], "the weights' hash (give every rank the same file)")
    same_on_every_rank(p.stats is not None, f"whether {statistics_path(config)} can be reused "
                                            "(every rank must see the same statistics file)")
    if p.stats is not None and info.is_main:
        print(f"statistics: reusing {statistics_path(config)} ({p.stats.num_images} images)", flush=True)
    stats = p.stats or gather_statistics(config, p.model, p.train_plain, p.graph, unit_convs(p.units), p.meta, info)
    # a latency target is measured by rank 0 alone (timings differ between ranks); the others wait to agree
    chosen = on_every_rank(lambda: {t: masks_for(config, t, p.model, stats, p.graph, p.units, info.device)
                                    for t in targets if info.is_main or t.kind != "latency_reduction"}, USER_ERRORS)
    if not info.is_main:
        return None
    dense_costs = measure(p.model, (3, config.input_size, config.input_size))
    recal = (make_loader(p.train_plain, config.batch_size, shuffle=True, workers=config.workers, seed=config.seed),
             p.recal_batches)
    points = [slim_point(t, p.model, m, dense_costs, config.input_size, recal, selection)
              for t, (m, selection) in chosen.items()]
    results = write_results(config, points, p.model, p.num_classes, info.device)
    print(result_line(output_dir(config), results.to_dict("records"),
                      f"result at --{targets[0].kind} {','.join(f'{t.value:g}' for t in targets)}"), flush=True)
    print(f"next, stage 2 (retraining; top-1 is measured there): "
          f"{stage2_command(config, point_dir(config, targets[0], len(targets) > 1))}"
          + (" (or another point's masks.pth)" if len(targets) > 1 else ""), flush=True)
    return results


def claim_output(config: Stage1Config, info: DistInfo) -> Stage1Config:
    """``config`` with the output folder rank 0 chose (``runs.folders.claim``): ``--save_model_path``, refused when
    it holds another stage-1 run, or the default folder (or the next free name after it)."""
    def choose() -> Optional[str]:
        if not info.is_main:
            return None
        return str(claim(output_dir(config), STAGE1_FILES, default=config.save_model_path is None,
                         flag="--save_model_path", to_continue="stage 1 does not continue runs; its statistics "
                         f"are reused with --save_statistic_path {output_dir(config)}"))

    return replace(config, save_model_path=from_main_rank(on_every_rank(choose, USER_ERRORS)))


def stage2_command(config: Stage1Config, directory: Path) -> str:
    """The command that retrains the masks in ``directory`` with stage 2, its results in ``directory/retrain``."""
    words = ["python", "imagenet/imagenet.py", "--dataroot", str(config.dataroot), "--resume",
             str(directory / MASKS_NAME), "--make-mask", "--input-size", str(config.input_size),
             "--results_dir", str(directory / "retrain")]
    return " ".join(shlex.quote(word) for word in words)

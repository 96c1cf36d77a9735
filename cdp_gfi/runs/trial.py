"""An NNI trial: CDP or GFI-AP with parameters from the tuner, test accuracy reported each epoch.

    python -m cdp_gfi.runs.trial --dataset digits --statistics_dir ckpt/statistics --baseline_dir ckpt/base

Inside an experiment the tuner's parameters (``nni.get_next_parameter()``:
method, sparsity or flops_reduction, coe, cdp_mode, lr, epochs, ...) override
the command line's; outside one the command line alone runs the same trial.
Nested choices such as ``{"method": {"_name": "cdp", "coe": 1.0}}`` are
flattened. Every trial of one model, dataset, seed, sample size and method
shares one statistics file under ``--statistics_dir`` (written atomically:
concurrent trials at worst compute it twice) and the baseline cached under
``--baseline_dir``. Test top-1 goes to ``nni.report_intermediate_result``
after each epoch; the final result is a dict whose ``default`` is the last
epoch's test top-1, with MACs and parameters alongside. Bad parameters fail
the trial with one ``error:`` line on stderr and exit status 2.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence

import nni

from .cli import OneLineParser, exit_status
from .cifar_config import DATASETS, PruneConfig, check, resolve
from .cifar import claim_folder, run

# What a search space may set, with its type; the command line gives the defaults.
TUNABLE: Dict[str, type] = {
    "method": str, "cdp_mode": str, "coe": float, "sparsity": float, "flops_reduction": float,
    "flops_convention": str, "lr": float, "momentum": float, "wd": float, "epochs": int, "schedule": str,
    "layerwise_retrain": int, "stop_batch": int, "batch_size": int, "baseline_epochs": int, "seed": int,
    "site": str, "normalize": str, "cost_power": float, "weight_power": float, "rule": str, "max_layer_sparsity": float, "bn_recalibrate": int,
}
TARGETS = ("sparsity", "flops_reduction")
KIND_NAMES = {int: "an integer", float: "a number", str: "a string"}


def build_parser() -> argparse.ArgumentParser:
    """Where data, baseline and shared statistics live, plus command-line defaults of every tunable parameter."""
    p = OneLineParser(description="One CDP/GFI-AP pruning trial; parameters from NNI's tuner override "
                                  "these options.")
    p.add_argument("--dataset", choices=DATASETS, default="digits", help="data set (default digits)")
    p.add_argument("--model", help="architecture (default resnet20)")
    p.add_argument("--dataroot", help="CIFAR folder; unused for digits")
    p.add_argument("--pretrained_dir", help="pretrained checkpoint (default: train a baseline, cached)")
    p.add_argument("--baseline_dir", default="ckpt/base", help="shared cache of trained baselines")
    p.add_argument("--statistics_dir", default="ckpt/statistics", help="shared statistics files, one per method")
    p.add_argument("--save_dir", help="run folder (default: the trial's NNI output folder, else runs/...)")
    p.add_argument("--device", help="cpu, cuda or cuda:N")
    p.add_argument("-j", "--workers", type=int, help="data loader worker processes")
    for name, kind in TUNABLE.items():
        p.add_argument(f"--{name}", type=kind, help=f"default {name} ({kind.__name__})")
    return p


def flatten(params: Mapping[str, Any]) -> Dict[str, Any]:
    """Nested-choice parameters ``{"method": {"_name": "cdp", "coe": 1}}`` as ``{"method": "cdp", "coe": 1}``."""
    out: Dict[str, Any] = {}
    for key, value in params.items():
        if isinstance(value, Mapping) and "_name" in value:
            out[key] = value["_name"]
            out.update(flatten({k: v for k, v in value.items() if k != "_name"}))
        else:
            out[key] = value
    return out


def coerce(name: str, value: Any) -> Any:
    """A search-space value as the type ``name`` takes (3.0 -> 3 for integers); raises on anything else."""
    kind = TUNABLE.get(name)
    if kind is None:
        raise ValueError(f"unknown trial parameter {name!r}; tunable ones: {', '.join(TUNABLE)}")
    if value is None:
        return None
    if kind is int and isinstance(value, float) and value.is_integer():
        value = int(value)
    numeric = kind is float and isinstance(value, int)
    if isinstance(value, bool) or not (isinstance(value, kind) or numeric):
        raise ValueError(f"trial parameter {name} must be {KIND_NAMES[kind]}, got {value!r}")
    return float(value) if kind is float else value


def statistics_file(config: PruneConfig, directory: str) -> Path:
    """The statistics file every trial of this model, data, seed, sample and method shares."""
    mode = f"_{config.cdp_mode}" if config.method == "cdp" else ""
    return Path(directory) / (f"stats_{config.dataset}_{config.model}_seed{config.seed}_b{config.stop_batch}"
                              f"_{config.method}{mode}_{config.site}.pt")


def trial_config(args: argparse.Namespace, params: Mapping[str, Any]) -> PruneConfig:
    """The run's settings: command line, overridden by ``params``; checked, with a message naming ``params``."""
    tuned = {k: coerce(k, v) for k, v in flatten(params).items()}
    fixed = {k: v for k, v in vars(args).items() if v is not None and k != "statistics_dir"}
    if any(t in tuned for t in TARGETS):
        fixed = {k: v for k, v in fixed.items() if k not in TARGETS}
    output = os.environ.get("NNI_OUTPUT_DIR")
    if "save_dir" not in fixed and output:
        fixed["save_dir"] = str(Path(output) / "prune")
    try:
        config = resolve(claim_folder(PruneConfig(**{**fixed, **tuned})))
        check(config)
    except ValueError as err:
        raise ValueError(f"trial parameters {dict(params)}: {err}" if params else str(err)) from err
    return replace(config, statistics_file=str(statistics_file(config, args.statistics_dir)))


def report_epoch(epoch: int, row: Mapping[str, float]) -> None:
    """Send one fine-tuning epoch's test top-1 (percent) to NNI."""
    nni.report_intermediate_result(float(row["test_top1"]))


def final_result(summary: Mapping[str, Any]) -> Dict[str, float]:
    """NNI's final metric: ``default`` is the last epoch's test top-1; MACs, params and reductions ride along."""
    keys = ("best_top1", "baseline_top1", "macs_after", "params_after", "macs_reduction_pct",
            "params_reduction_pct", "filters_removed_pct")
    return {"default": float(summary["pruned_top1"]), **{k: float(summary[k]) for k in keys}}


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run one trial; 0 on success, 2 with one ``error:`` line on stderr for bad parameters or input."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)

    def trial() -> None:
        config = trial_config(args, nni.get_next_parameter() or {})
        print(f"trial {nni.get_trial_id()}: {config}", flush=True)
        shared = Path(config.statistics_file)
        print(f"statistics: {'reusing' if shared.exists() else 'gathering into'} {shared}", flush=True)
        summary = run(config, on_epoch_end=report_epoch)
        nni.report_final_result(final_result(summary))

    return exit_status(trial)


if __name__ == "__main__":
    sys.exit(main())

"""Sweeps: several targets from one statistics pass, one run folder per point, sweep.csv/png."""
from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Dict, Sequence

import pandas as pd
import torch

from ..files.checkpoint import ensure_writable_dir
from ..files.mask_files import kept_vectors
from ..graph.scope import prunable_units, unit_convs
from ..graph.trace import trace
from ..masks.select import check_fraction
from ..scores.importance import scores_from_statistics
from ..train.loop import seed_everything
from .cifar import Session, claim_folder, open_session, run_point
from .cifar_config import PruneConfig, resolve
from .cifar_steps import _dummy, gather_statistics, record_arguments
from .imagenet_stage2 import load_pruned_checkpoint
from .plots import TARGET_LABELS as TARGETS, plot_pruning_effect
from .report import result_line, write_table


def sweep(config: PruneConfig, targets: Sequence[float]) -> pd.DataFrame:
    """Several targets (of ``--sparsity``, ``--flops_reduction`` or ``--latency_reduction``, whichever is set) from
    one statistics pass (a latency target measures its table once: it is cached).

    Each point runs like a single run in ``save_dir/point_<target>/``; then
    ``sweep.csv`` (one summary row per point, plus the selection's score
    threshold and the point's seconds) and ``sweep.png`` (the pruning effect
    against the requested targets) go to ``save_dir``, and one result line is
    printed. The folder is claimed as a single run's is (``claim_folder``).
    With ``resume``, finished points are kept and the others continue.
    """
    key = next(k for k in TARGETS if getattr(config, k) is not None)
    targets = [check_fraction(t, f"--{key}") for t in targets]
    config = resolve(claim_folder(replace(config, **{key: targets[0]})))
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
                        f"{config.method} on {config.model} / {config.dataset}", target=key)
    print(result_line(config.save_dir, rows, f"result at --{key} {','.join(f'{t:g}' for t in targets)}"), flush=True)
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
    _, ckpt = load_pruned_checkpoint(save_dir / "pruned.pth")
    ranked_as_scored = config.normalize == "none" and not config.cost_power and not config.weight_power
    threshold = selection_threshold(scores, kept_vectors(ckpt["masks"])) if ranked_as_scored else float("nan")
    return {**summary, "threshold": threshold, "point_time_s": summary["wall_time_s"]}


def selection_threshold(scores: Dict[str, torch.Tensor], keep: Dict[str, torch.Tensor]) -> float:
    """The score threshold a selection used: the highest score among removed filters (GFI-AP's T). Meaningful
    where filters are ranked by these scores as they are (no normalisation, no MACs cost, no weight scaling); NaN is written else."""
    removed = [scores[name][~k] for name, k in keep.items() if (~k).any()]
    return float(torch.cat(removed).max()) if removed else float("nan")

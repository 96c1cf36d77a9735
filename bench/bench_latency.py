"""Latency targets: the measured reduction a latency target reaches, beside MACs-targeted networks of equal MACs.

Per model (torchvision, random weights: latency depends on the shape only)
and batch size: the latency table is built (timed) and reused from its cache
(timed); ``latency_reduction=--target`` is selected from random scores
(``select_for_latency``; random, not CDP statistics, as in bench_speed.py);
then at the MACs that network removed, the same scores' MACs-targeted
selection (``select(flops_reduction=)``) and Torch-Pruning's group magnitude
(bisected to those MACs). The dense network and the three slim ones are timed
side by side in one process, alternating, ``--runs`` times; per run each
network's median (``torch.utils.benchmark``), and the reduction of that run
against the dense one timed beside it; the median, min and max over runs are
reported. Rows to ``<out>/bench_latency.csv``, a plot to
``<out>/bench_latency.png``, one line at the end.

    python bench/bench_latency.py                                  # ResNet-50, MobileNetV2, 224x224, batch 1 and 32
    python bench/bench_latency.py --models resnet18 --input 64 --batches 1 --runs 1   # a smoke run
"""
from __future__ import annotations

import argparse
import os
import statistics as st
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import pandas as pd
import torch
from matplotlib.figure import Figure
from torch import nn
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import competitors  # noqa: E402
from cdp_gfi import build_model, count_flops, select, to_nni_masks  # noqa: E402
from cdp_gfi.graph.scope import prunable_units, unit_convs  # noqa: E402
from cdp_gfi.graph.trace import trace  # noqa: E402
from cdp_gfi.latency.select import ORDERS, select_for_latency  # noqa: E402
from cdp_gfi.latency.table import latency_table  # noqa: E402
from cdp_gfi.latency.timing import BenchmarkTimer, device_name, resolve_device  # noqa: E402

OUT = Path(__file__).resolve().parents[1] / "readme"
SLIM = 64  # NNI slims at 64x64 (torchvision's nets pool adaptively): at 224x224 it took 18 GB on ResNet-50
NETWORKS = ("latency-targeted", "MACs-targeted", "Torch-Pruning")


def load() -> str:
    """The 1-, 5- and 15-minute load averages: timings on a busy machine say so."""
    return "load average " + ", ".join(f"{v:.2f}" for v in os.getloadavg())


def slim_networks(name: str, size: int, batch: int, target: float, device: torch.device, timer: BenchmarkTimer,
                  cache_dir: Path, tolerance: float, order: str = "auto") -> Dict[str, object]:
    """The dense network, the three slim ones and how the latency-targeted one was found (table times, tries)."""
    torch.manual_seed(0)
    dense = build_model(name, "imagenet").eval()
    dummy = torch.zeros(1, 3, size, size)
    graph = trace(dense, dummy)  # at the timed size: the table times each unit's modules at their real shapes
    units = prunable_units(graph, "internal")
    scores = {c: torch.rand(graph.modules[c].out_channels) for c in unit_convs(units)}
    example = torch.randn(batch, 3, size, size, device=device)
    started = time.perf_counter()
    table = latency_table(dense, graph, units, example, timer, device, cache_dir)
    built = time.perf_counter() - started
    started = time.perf_counter()
    again = latency_table(dense, graph, units, example, timer, device, cache_dir)
    reused = time.perf_counter() - started
    result = select_for_latency(scores, reduction=target, model=dense, graph=graph, units=units, dummy_input=dummy,
                                device=str(device), batch=batch, timer=timer, cache_dir=cache_dir,
                                tolerance=tolerance, slim_input=torch.zeros(1, 3, SLIM, SLIM), order=order)
    shape = (3, size, size)
    macs = count_flops(dense, shape)[0]
    ours = competitors.slimmed(dense, to_nni_masks(dense, result.keep), (3, SLIM, SLIM))
    removed = 1.0 - count_flops(ours, shape)[0] / macs
    keep, _ = select("cdp", scores, flops_reduction=removed, graph=graph, units=units,
                     round_to=result.round_to if result.round_to > 1 else None)  # the latency net's widths
    by_macs = competitors.slimmed(dense, to_nni_masks(dense, keep), (3, SLIM, SLIM))
    theirs = competitors.tp_at_macs(dense, unit_convs(units), removed, shape)[0]
    return {"nets": {"dense": dense, NETWORKS[0]: ours, NETWORKS[1]: by_macs, NETWORKS[2]: theirs.eval()},
            "table_build_s": float("nan") if table.reused else built,  # already in --cache_dir: not built here
            "table_reuse_s": reused if again.reused else float("nan"), "tries": len(result.tries),
            "selection_measured_pct": 100.0 * result.measured, "round_to": result.round_to, "order": result.order}


def side_by_side(nets: Dict[str, nn.Module], x: torch.Tensor, timer: BenchmarkTimer, runs: int
                 ) -> Dict[str, List[float]]:
    """Seconds per forward of each network in each of ``runs`` rounds, the networks alternating within a round."""
    moved = {label: net.to(x.device).eval() for label, net in nets.items()}
    seconds: Dict[str, List[float]] = {label: [] for label in nets}
    for _ in range(runs):
        for label, net in moved.items():
            seconds[label].append(timer(net, x))
    return seconds


def rows_for(name: str, size: int, batch: int, found: Dict[str, object], seconds: Dict[str, List[float]],
             target: float, device: torch.device, threads: int) -> List[Dict[str, object]]:
    """One row per network: MACs, latency (median over runs) and its reduction against the dense one (median,
    min, max over runs, each run against the dense network timed beside it)."""
    shape = (3, size, size)
    dense_macs = count_flops(found["nets"]["dense"], shape)[0]
    rows = []
    for label, net in found["nets"].items():
        macs = count_flops(net, shape)[0]
        cut = [100.0 * (1.0 - s / d) for s, d in zip(seconds[label], seconds["dense"])]
        rows.append(dict(model=name, input=size, batch=batch, device=device_name(device), threads=threads,
                         network=label, target_pct=100.0 * target, macs_m=macs / 1e6,
                         macs_reduction_pct=100.0 * (1.0 - macs / dense_macs),
                         latency_ms=1e3 * st.median(seconds[label]), latency_reduction_pct=st.median(cut),
                         latency_reduction_min_pct=min(cut), latency_reduction_max_pct=max(cut),
                         **{k: v for k, v in found.items() if k != "nets"}))
    return rows


def plot(frame: pd.DataFrame, path: Path) -> None:
    """Measured latency reduction (median, min-max bar) beside MACs reduction, per network, model and batch."""
    cases = list(frame.groupby(["model", "batch"], sort=False))
    figure = Figure(figsize=(4.5 * len(cases), 3.8), layout="constrained")
    for ax, ((model, batch), part) in zip(figure.subplots(1, len(cases), squeeze=False).flat, cases):
        part = part[part["network"] != "dense"]
        x = range(len(part))
        err = [part["latency_reduction_pct"] - part["latency_reduction_min_pct"],
               part["latency_reduction_max_pct"] - part["latency_reduction_pct"]]
        ax.bar([i - 0.2 for i in x], part["latency_reduction_pct"], 0.4, yerr=err, label="latency removed (%)")
        ax.bar([i + 0.2 for i in x], part["macs_reduction_pct"], 0.4, label="MACs removed (%)")
        ax.axhline(part["target_pct"].iloc[0], color="grey", linestyle="--", linewidth=1)
        ax.set_xticks(list(x), part["network"], rotation=15)
        ax.set_title(f"{model}, batch {batch}")
    figure.axes[0].legend(loc="lower left")
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="resnet50,mobilenet_v2",
                        help="comma-separated torchvision names (default resnet50,mobilenet_v2)")
    parser.add_argument("--input", type=int, default=224, help="input height = width (default 224)")
    parser.add_argument("--batches", default="1,32", help="comma-separated batch sizes (default 1,32)")
    parser.add_argument("--target", type=float, default=0.4, help="latency_reduction asked (default 0.4)")
    parser.add_argument("--latency_order", choices=ORDERS, default="auto",
                        help="the latency target's order (select_for_latency; default auto)")
    parser.add_argument("--runs", type=int, default=5, help="side-by-side timing rounds (default 5)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    parser.add_argument("--min_run_time", type=float, default=1.0,
                        help="seconds of timed calls per measurement, in the table, the selection and the "
                             "side-by-side rounds (default 1.0)")
    parser.add_argument("--tolerance", type=float, default=0.02,
                        help="how close the selection's measured reduction must come to --target (default 0.02)")
    parser.add_argument("--cache_dir", type=Path,
                        help="latency tables' cache (default: a fresh temporary folder, so the build is timed)")
    parser.add_argument("--out", type=Path, default=OUT, help="folder of bench_latency.csv/png (default readme/)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device, torch.device("cpu"))
    timer = BenchmarkTimer(args.threads, args.min_run_time)
    cache = args.cache_dir or Path(tempfile.mkdtemp(prefix="bench_latency_"))
    print(f"torch {torch.__version__}, {device_name(device)}, {args.threads} thread(s); {load()}", flush=True)
    started, rows = time.perf_counter(), []
    jobs = [(m, int(b)) for m in args.models.split(",") for b in args.batches.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    for name, batch in tqdm(jobs, desc="latency"):
        try:
            found = slim_networks(name, args.input, batch, args.target, device, timer, cache, args.tolerance,
                                  args.latency_order)
        except ValueError as err:  # a target the correction could not settle on this machine: a row saying so
            rows.append(dict(model=name, input=args.input, batch=batch, note=str(err)[:200]))
            continue
        x = torch.randn(batch, 3, args.input, args.input, device=device)
        seconds = side_by_side(found["nets"], x, timer, args.runs)
        rows += rows_for(name, args.input, batch, found, seconds, args.target, device, args.threads)
        pd.DataFrame(rows).to_csv(args.out / "bench_latency.csv", index=False)
    frame = pd.DataFrame(rows)
    frame.to_csv(args.out / "bench_latency.csv", index=False)
    timed = frame[frame["network"].notna()] if "network" in frame else frame.iloc[:0]
    if len(timed):
        plot(timed, args.out / "bench_latency.png")
    with pd.option_context("display.width", 250, "display.max_columns", 30):
        print(frame.to_string(index=False, float_format=lambda v: f"{v:.2f}"))
    ours = timed[timed["network"] == NETWORKS[0]] if len(timed) else timed
    reached = ", ".join(f"{r.model} b{r.batch} {r.latency_reduction_pct:.1f}%" for r in ours.itertuples())
    print(f"latency target {args.target:.0%}: measured {reached or 'nothing'} in {time.perf_counter() - started:.0f} s, "
          f"{args.runs} run(s), {args.threads} thread(s) on {device_name(device)}; {load()}; "
          f"files in {args.out}")


if __name__ == "__main__":
    main()

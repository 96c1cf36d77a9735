"""Accuracy at equal measured latency: the latency-targeted network against the MACs-targeted one, held-out CIFAR-10.

Per network (adapted to the JPEG CIFAR-10 as in ``bench_quality.py``), seed
and criterion (default CDP and GFI-AP), the criterion's scores select (1) for
``--target`` of measured latency removed (``select_for_latency`` on the CPU at
``--latency_batch``), and (2) for a MACs target bisected until that network,
timed in alternation with (1), is as fast within ``--tolerance`` (of the dense
latency): equal latency, so only where the two spend it differs. Both are then timed beside the dense
network ``--runs`` times at batch 1 and ``--latency_batch`` (the median, min
and max reduction), and measured on the 5,000 held-out test images after
BatchNorm re-estimation (a) and after ``--epochs`` of fine-tuning (b), with
``bench_quality.py``'s recipe. Rows go to ``<out>/bench_latency_quality.csv``
as they finish (``--resume`` keeps them), one line at the end.

    python bench/bench_latency_quality.py --dataroot /data/cifar10 --nets resnet20=PATH
    python bench/bench_latency_quality.py --epochs 0 --seeds 1   # (a) only, one seed
"""
from __future__ import annotations

import argparse
import os
import statistics as st
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import competitors  # noqa: E402
from adaptation import adapted  # noqa: E402
from bench_quality import (DEFAULT_DATAROOT, SIZE, Bench, check_paths, ours, parse_nets)  # noqa: E402
from cdp_gfi import count_flops, select, to_nni_masks  # noqa: E402
from cdp_gfi.data.datasets import cifar_datasets  # noqa: E402
from cdp_gfi.data.samplers import make_loader  # noqa: E402
from cdp_gfi.graph.scope import prunable_units  # noqa: E402
from bench_latency import side_by_side  # noqa: E402
from cdp_gfi.latency.select import ORDERS, Try, next_ask, select_for_latency, time_pair  # noqa: E402
from cdp_gfi.latency.timing import BenchmarkTimer  # noqa: E402
from cdp_gfi.masks.select import Keep  # noqa: E402
from cdp_gfi.scores.importance import scores_from_statistics  # noqa: E402

KINDS = ("latency-targeted", "MACs-targeted")
MATCH = "side by side"  # how the MACs target's latency was matched (rows before it: "against dense")


def slim_of(bench: Bench, keep: Keep) -> nn.Module:
    """The adapted network slimmed to ``keep``."""
    return competitors.slimmed(bench.base, to_nni_masks(bench.base, keep), SIZE)


def equal_latency_pair(bench: Bench, method: str, target: float, batch: int, timer: BenchmarkTimer,
                       tolerance: float, cache_dir: Path, order: str = "auto") -> Dict[str, object]:
    """(1) ``method``'s selection for ``target`` of measured latency; (2) its MACs-targeted selection as fast as (1)
    side by side (``matched_try``; regula falsi on the MACs target, at most 6 tries); both keeps and how they were
    found."""
    kind, variant = ours(method)
    units = prunable_units(bench.graph, "internal")
    scores, tie = scores_from_statistics(bench.statistics(variant.site), kind, variant.cdp_mode, None, bench.scope)
    for attempt in range(3):  # on a shared machine the correction may not settle: the error after the third try
        try:
            found = select_for_latency(scores, tie, reduction=target, model=bench.base, graph=bench.graph,
                                       units=units, dummy_input=torch.zeros(1, *SIZE), device="cpu", batch=batch,
                                       timer=timer, cache_dir=cache_dir, max_layer_sparsity=variant.max_layer_sparsity,
                                       normalization=variant.normalize, rule=variant.rule, order=order,
                                       cost_power=variant.cost_power, weight_power=variant.weight_power)
            break
        except ValueError as err:
            if "did not settle" not in str(err) or attempt == 2:
                raise
            tqdm.write(f"{bench.name} {method}: {err}; selecting again")
    wanted = found.measured
    example = torch.randn(batch, *SIZE)
    latency_slim = slim_of(bench, found.keep)
    macs_of_latency = 1.0 - count_flops(latency_slim, SIZE)[0] / bench.dense_macs
    tries: List[Try] = []
    ask = macs_of_latency

    def by_macs(ask: float) -> Keep:  # GFI-AP's rule moves MACs in steps: the nearest reachable target near ``ask``
        for nudge in (0.0, -0.01, 0.01, -0.02, 0.02):
            try:
                return select(kind, scores, tie, flops_reduction=ask + nudge, graph=bench.graph, units=units,
                              normalization=variant.normalize, cost_power=variant.cost_power, rule=variant.rule,
                              max_layer_sparsity=variant.max_layer_sparsity, weight_power=variant.weight_power)[0]
            except ValueError:
                continue
        raise ValueError(f"{method}: no MACs target within 2 points of {ask:.2%} is reachable")

    for _ in range(6):
        keep = by_macs(ask)
        tries.append(matched_try(ask, keep, found.keep, latency_slim, slim_of(bench, keep), wanted, example, timer))
        if abs(tries[-1].measured - wanted) <= tolerance:
            break
        ask = min(max(next_ask(tries, wanted), 0.01), 0.95)  # the selection's own correction, over MACs targets
    best = min(tries, key=lambda t: abs(t.measured - wanted))
    return {"keeps": {KINDS[0]: found.keep, KINDS[1]: best.keep}, "selection_pct": 100 * wanted,
            "macs_match_pct": 100 * best.measured, "macs_tries": len(tries), "latency_tries": len(found.tries),
            "order": found.order, "match": MATCH}


def same_keep(a: Keep, b: Keep) -> bool:
    """Whether two selections keep the same filters of every conv (then they are one network)."""
    return a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)


def matched_try(ask: float, keep: Keep, latency_keep: Keep, latency_slim: nn.Module, slim: nn.Module, wanted: float,
                example: torch.Tensor, timer: BenchmarkTimer) -> Try:
    """One MACs target's try, its latency reduction measured through the latency-targeted network's: the two slim
    networks timed in alternation (``time_pair``), so equal latency is one side-by-side ratio, not two reductions
    against the dense network timed minutes apart (each off by the load's drift). The same selection is the same
    network: its reduction is ``wanted`` without timing."""
    if same_keep(keep, latency_keep):
        return Try(ask, wanted, keep, float("nan"), float("nan"))
    latency_s, slim_s = time_pair(latency_slim, slim, example, timer)
    return Try(ask, 1.0 - (1.0 - wanted) * slim_s / latency_s, keep, latency_s, slim_s)


def reductions(nets: Dict[str, nn.Module], batch: int, timer: BenchmarkTimer, runs: int) -> Dict[str, List[float]]:
    """Percent latency saved against the dense network timed beside it, per round (``bench_latency.side_by_side``)."""
    seconds = side_by_side(nets, torch.randn(batch, *SIZE), timer, runs)
    return {label: [100 * (1 - s / d) for s, d in zip(seconds[label], seconds["dense"])]
            for label in nets if label != "dense"}


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataroot", type=Path, default=DEFAULT_DATAROOT,
                   help="CIFAR-10 root holding cifar-10-batches-py/ (default ../shared/data/cifar10-jpeg, after its "
                        "to_pickle.py wrote the layout there)")
    p.add_argument("--nets", help="name=checkpoint pairs (default: the shared resnet20 and resnet32)")
    p.add_argument("--adapt_epochs", type=int, default=2, help="dense fine-tuning before pruning, cached (default 2)")
    p.add_argument("--cache", type=Path, default=Path("ckpt/adapted"), help="folder of adapted networks")
    p.add_argument("--methods", default="cdp,gfi-ap", help="our rows, as bench_quality.py spells them")
    p.add_argument("--target", type=float, default=0.25,
                   help="latency reduction asked (default 0.25: block-internal convs under the default per-layer "
                        "cap reach about 27%% on ResNet-20 at batch 128 on one CPU thread)")
    p.add_argument("--latency_order", choices=ORDERS, default="auto",
                   help="how the latency target spends its budget (select_for_latency; default auto)")
    p.add_argument("--latency_batch", type=int, default=128, help="batch the selection times (default 128)")
    p.add_argument("--tolerance", type=float, default=0.02, help="latency match, fraction (default 0.02)")
    p.add_argument("--runs", type=int, default=5, help="side-by-side timing rounds (default 5)")
    p.add_argument("--seeds", type=int, default=1, help="seeds 0..N-1 (default 1)")
    p.add_argument("--epochs", type=int, default=1, help="fine-tuning epochs for (b); 0: (a) only (default 1)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--resume", action="store_true", help="keep rows already in the CSV")
    p.add_argument("--out", type=Path, default=Path("readme"), help="folder of the CSV (default readme)")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    try:
        if not 0.0 < args.target < 1.0 or args.epochs < 0 or args.adapt_epochs < 0 or args.runs < 1:
            raise ValueError("--target must be in (0, 1); --epochs and --adapt_epochs >= 0; --runs >= 1")
        nets = parse_nets(args.nets)
        check_paths(args.dataroot, nets)
        methods = args.methods.split(",")
        for method in methods:
            if ours(method) is None:
                raise ValueError(f"unknown row {method!r}: cdp, gfi-ap or one of them with options")
        splits = cifar_datasets(args.dataroot, check_integrity=False)
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    timer = BenchmarkTimer(threads=args.threads, min_run_time=0.5)
    args.out.mkdir(parents=True, exist_ok=True)
    csv = args.out / "bench_latency_quality.csv"
    rows = pd.read_csv(csv) if args.resume and csv.exists() else pd.DataFrame()
    if len(rows) and "latency_order" not in rows:  # rows of the greedy before there was a choice
        rows["latency_order"] = "greedy"
    if len(rows):
        rows["match"] = rows["match"].fillna("against dense") if "match" in rows else "against dense"
    done = (set(zip(rows["net"], rows["seed"], rows["method"], rows["latency_order"], rows["match"]))
            if len(rows) else set())
    test = make_loader(splits[2], 256, shuffle=False)
    todo = [(n, s, m) for n in nets for s in range(args.seeds) for m in methods
            if (n, s, m, args.latency_order, MATCH) not in done]
    for net, seed, method in tqdm(todo, desc="bench_latency_quality"):
        base, _ = adapted(net, nets[net], splits, test, args.adapt_epochs, args.dataroot, args.cache)
        bench = Bench(net, base, splits, seed, args.epochs, (4.0, 0.5))
        started = time.perf_counter()
        pair = equal_latency_pair(bench, method, args.target, args.latency_batch, timer, args.tolerance,
                                  args.out / "latency_cache", args.latency_order)
        slims = {kind: slim_of(bench, keep) for kind, keep in pair["keeps"].items()}
        timed = {b: reductions({"dense": bench.base, **slims}, b, timer, args.runs)
                 for b in sorted({1, args.latency_batch})}
        new = []
        top1 = {KINDS[0]: bench.measure(slims[KINDS[0]])[:2]}  # one network is measured once (same seed, same top-1)
        top1[KINDS[1]] = (top1[KINDS[0]] if same_keep(*pair["keeps"].values())
                          else bench.measure(slims[KINDS[1]])[:2])
        for kind, model in slims.items():
            macs = count_flops(model, SIZE)[0]
            a, b = top1[kind]
            new.append(dict(net=net, seed=seed, method=method, latency_order=args.latency_order, network=kind,
                            target_pct=100 * args.target,
                            macs_removed_pct=100 * (1 - macs / bench.dense_macs),
                            **{f"latency_b{bs}_pct": st.median(cut[kind]) for bs, cut in timed.items()},
                            **{f"latency_b{bs}_min_pct": min(cut[kind]) for bs, cut in timed.items()},
                            **{f"latency_b{bs}_max_pct": max(cut[kind]) for bs, cut in timed.items()},
                            top1_a=a, top1_b=b, epochs=args.epochs, dense_top1=bench.base_top1,
                            **{k: v for k, v in pair.items() if k != "keeps"}, threads=args.threads,
                            run_s=time.perf_counter() - started, load_1min=os.getloadavg()[0]))
        rows = pd.concat([rows, pd.DataFrame(new)], ignore_index=True)
        rows.to_csv(csv, index=False)
        for row in new:
            tqdm.write(" ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
    if not len(rows):
        print("nothing to do")
        return 0
    matched = rows[rows["match"] == MATCH]
    wide = matched.pivot_table(index=["latency_order", "net", "method"], columns="network",
                               values="top1_b" if args.epochs else "top1_a", aggfunc="mean")
    gaps = ", ".join(f"{o} {n} {m} {v:+.2f}" for (o, n, m), v in (wide[KINDS[0]] - wide[KINDS[1]]).items()
                     ) if set(KINDS) <= set(wide.columns) else "no pair matched side by side yet"
    print(f"{len(rows)} rows in {csv}; latency-targeted minus MACs-targeted top-1 at equal latency "
          f"({'(b)' if args.epochs else '(a)'}, mean over seeds): {gaps}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

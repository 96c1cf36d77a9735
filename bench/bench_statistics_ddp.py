"""Class-ordered GFI-AP statistics on N torchrun processes vs one process, side by side in one run.

Each rank reads whole classes of the same seeded sample (ResNet-50, 1000 classes, batches of 16 at 224x224 by
default): it measures its extra peak memory (resident set) over a plain no-grad forward of its own batches,
and the time ratio; the parent then gathers the same statistics in one process and compares the scores.
Target (issue 12): equal scores (relative 1e-5) and each rank's extra memory <= 1 GB.

    python bench/bench_statistics_ddp.py                  # 2 processes (gloo, CPU)
    python bench/bench_statistics_ddp.py --nproc 2 --batches 8
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch
from torch.utils.data import DataLoader, TensorDataset

from bench_statistics import _batches, _plain, peak_rss
from cdp_gfi import build_model
from cdp_gfi.data.samplers import ClassShardSampler
from cdp_gfi.distributed import cleanup, init_distributed
from cdp_gfi.graph.trace import trace
from cdp_gfi.graph.scope import default_scope
from cdp_gfi.scores.importance import gfi_scores
from cdp_gfi.statistics.collect import collect_statistics

CLASSES = 1000


def _setup(args: argparse.Namespace):
    """The seeded model, its ranked layers and the whole class-ordered sample as one dataset."""
    torch.manual_seed(0)
    model = build_model("resnet50", "imagenet", CLASSES).eval()
    layers = default_scope(trace(model, torch.zeros(1, 3, args.size, args.size)))
    batches = _batches(args.batches, args.batch, args.size, CLASSES, args.per_class, ordered=True)
    images = torch.cat([x for x, _ in batches])
    labels = torch.cat([y for _, y in batches])
    return model, layers, TensorDataset(images, labels), labels.tolist()


def _gfi(model, layers, loader) -> dict:
    stats = collect_statistics(model, loader, layers, ["gfi"], num_classes=CLASSES, progress=False,
                               class_ordered=True)
    return gfi_scores(stats)


def worker(args: argparse.Namespace) -> None:
    """One rank: its whole classes, plain forward vs statistics (time, extra peak memory); rank 0 saves scores."""
    info = init_distributed("cpu")
    model, layers, data, labels = _setup(args)
    loader = DataLoader(data, batch_size=args.batch, sampler=ClassShardSampler(labels, info.world_size, info.rank))
    mine = list(loader)
    _plain(model, mine[:1])  # warm-up
    with peak_rss() as plain_mem:
        t = time.perf_counter()
        _plain(model, mine)
        plain_s = time.perf_counter() - t
    with peak_rss() as stats_mem:
        t = time.perf_counter()
        scores = _gfi(model, layers, mine)
        stats_s = time.perf_counter() - t
    row = dict(rank=info.rank, images=sum(len(y) for _, y in mine), plain_s=round(plain_s, 3),
               statistics_s=round(stats_s, 3), ratio=round(stats_s / plain_s, 3),
               plain_peak_mb=round(plain_mem["extra"] / 2 ** 20),
               statistics_peak_mb=round(stats_mem["extra"] / 2 ** 20),
               extra_peak_mb=round((stats_mem["extra"] - plain_mem["extra"]) / 2 ** 20))
    out = Path(args.worker_dir)
    (out / f"rank{info.rank}.json").write_text(json.dumps(row))
    if info.is_main:
        torch.save(scores, out / "scores.pt")
    cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nproc", type=int, default=2, help="torchrun processes (default 2)")
    parser.add_argument("--batches", type=int, default=4, help="batches in the sample (default 4)")
    parser.add_argument("--batch", type=int, default=16, help="images per batch (default 16)")
    parser.add_argument("--size", type=int, default=224, help="input height = width (default 224)")
    parser.add_argument("--per_class", type=int, default=4, help="images per class (default 4)")
    parser.add_argument("--worker-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker_dir:
        worker(args)
        return
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "OMP_NUM_THREADS": str(max(1, torch.get_num_threads() // args.nproc))}
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                        str(args.nproc), __file__, *sys.argv[1:], "--worker-dir", tmp],
                       check=True, env=env)
        rows = [json.loads((Path(tmp) / f"rank{r}.json").read_text()) for r in range(args.nproc)]
        distributed = torch.load(Path(tmp) / "scores.pt", weights_only=True)
    model, layers, data, labels = _setup(args)
    single = _gfi(model, layers, DataLoader(data, batch_size=args.batch, sampler=ClassShardSampler(labels)))
    worst = max(float(((distributed[n] - single[n]).abs().max() / single[n].abs().max().clamp_min(1e-30)))
                for n in single)
    print(pd.DataFrame(rows).to_string(index=False))
    print(f"max relative difference of GFI-AP scores, {args.nproc} processes vs 1: {worst:.2e} "
          f"({len(single)} layers); worst rank extra peak {max(r['extra_peak_mb'] for r in rows)} MB")


if __name__ == "__main__":
    main()

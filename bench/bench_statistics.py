"""Statistics pass vs a plain no-grad forward over the same batches, side by side: time ratio and extra peak memory.

Targets: ratio <= 1.15 (issue 2) for CIFAR ResNet-56 (batches of 256) and ResNet-50 (224x224, batches of 16);
GFI-AP over class-ordered batches on ResNet-50 with 1000 classes: ratio <= 1.10 and extra peak memory <= 1 GB
(issue 12). The unordered GFI-AP path on 1000 classes keeps 11 GB of per-class map sums (12.5 GB peak measured)
and is not run here; on ResNet-56 (10 classes) both GFI-AP paths run.
Runs alternate (plain, stats, plain, stats, ...) so machine noise hits both; the median time is reported.
Peak memory is the process's resident set (sampled every 2 ms) above what it was when the run began.
"""
from __future__ import annotations

import argparse
import statistics as st
import threading
import time
from contextlib import contextmanager

import pandas as pd
import torch

from cdp_gfi import build_model
from cdp_gfi.graph.trace import trace
from cdp_gfi.graph.scope import default_scope
from cdp_gfi.statistics.collect import collect_statistics

CASES = {"resnet56": ("cifar10", 256, 32), "resnet50": ("imagenet", 16, 224)}
# (label, statistics kinds, class-ordered batches)
RUNS = (("cdp_class", ["cdp_class"], False), ("cdp_sample", ["cdp_sample"], False),
        ("gfi", ["gfi"], False), ("gfi class-ordered", ["gfi"], True))
UNORDERED_GFI_MAX_CLASSES = 100  # above this the per-class map sums need gigabytes


def _rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * 4096


@contextmanager
def peak_rss():
    """Yields a dict whose "extra" ends as the peak resident set above the starting one, in bytes."""
    out = {"start": _rss_bytes(), "peak": _rss_bytes()}
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            out["peak"] = max(out["peak"], _rss_bytes())
            time.sleep(0.002)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield out
    finally:
        stop.set()
        thread.join()
        out["extra"] = out["peak"] - out["start"]


def _plain(model, batches):
    with torch.no_grad():
        for x, _ in batches:
            model(x)


def _batches(count: int, batch: int, size: int, k: int, per_class: int, ordered: bool):
    """`count` random batches; labels in class order (`per_class` images per class, classes spread over k) or not."""
    n = count * batch
    classes = torch.linspace(0, k - 1, steps=-(-n // per_class)).long()
    labels = classes.repeat_interleave(per_class)[:n]
    if not ordered:
        labels = labels[torch.randperm(n)]
    return [(torch.randn(batch, 3, size, size), labels[i * batch:(i + 1) * batch]) for i in range(count)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--per_class", type=int, default=4, help="images per class in the sample (default 4)")
    parser.add_argument("--models", default=",".join(CASES), help="comma-separated subset of " + ",".join(CASES))
    parser.add_argument("--runs", default=",".join(r[0] for r in RUNS),
                        help="comma-separated subset of: " + ", ".join(r[0] for r in RUNS))
    args = parser.parse_args()
    torch.manual_seed(0)
    wanted = args.runs.split(",")
    rows = []
    for name in args.models.split(","):
        dataset, batch, size = CASES[name]
        model = build_model(name, dataset).eval()
        k = 10 if dataset == "cifar10" else 1000
        layers = default_scope(trace(model, torch.zeros(1, 3, size, size)))
        for label, kinds, ordered in RUNS:
            if label not in wanted or (label == "gfi" and k > UNORDERED_GFI_MAX_CLASSES):
                continue
            batches = _batches(args.batches, batch, size, k, args.per_class, ordered)
            _plain(model, batches[:1])  # warm-up
            plain, stats, plain_mem, stats_mem = [], [], [], []
            for _ in range(args.repeats):
                with peak_rss() as mem:
                    t = time.perf_counter()
                    _plain(model, batches)
                    plain.append(time.perf_counter() - t)
                plain_mem.append(mem["extra"])
                with peak_rss() as mem:
                    t = time.perf_counter()
                    collect_statistics(model, batches, layers, kinds, num_classes=k, progress=False,
                                       class_ordered=ordered)
                    stats.append(time.perf_counter() - t)
                stats_mem.append(mem["extra"])
            p, s = st.median(plain), st.median(stats)
            rows.append(dict(model=name, classes=k, batch=batch, run=label, plain_s=round(p, 3),
                             statistics_s=round(s, 3), ratio=round(s / p, 3),
                             plain_peak_mb=round(max(plain_mem) / 2 ** 20),
                             statistics_peak_mb=round(max(stats_mem) / 2 ** 20),
                             extra_peak_mb=round((max(stats_mem) - max(plain_mem)) / 2 ** 20)))
            print(rows[-1], flush=True)
    print(pd.DataFrame(rows).to_string(index=False))


if __name__ == "__main__":
    main()

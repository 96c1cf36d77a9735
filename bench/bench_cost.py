"""Tool cost: time and peak memory of statistics, scoring, masks and slimming, against NNI's defaults and Torch-Pruning.

ResNet-56 (CIFAR, 32x32, 4 batches of 64) and ResNet-50 (ImageNet, 224x224,
2 batches of 8), random weights and images, half of the block-internal
filters removed. Tools, run in turn within each repeat (interleaved, medians
reported):

- cdp_gfi CDP / GFI-AP: statistics pass, scores, global selection, slim;
- NNI defaults: L1NormPruner masks on the same convs, ModelSpeedup with its
  defaults (dummy input at full resolution, batch 8; given an fx trace, since
  its own tracer fails on torch >= 2.2);
- Torch-Pruning: dependency graph + group-magnitude importance (pruner
  construction), then the pruning step (in place, no separate slimming).

Peak memory: the highest resident set size seen during a step (sampled every
2 ms) minus the size when it started. Memory the process already holds (freed
by an earlier step but kept by the allocator) is not counted again, so small
values are lower bounds; the large ones (GFI-AP's per-class map sums on
ResNet-50 with 1000 classes, ModelSpeedup at 224x224) are real.

    python bench/bench_cost.py [--repeats 3] [--models resnet56,resnet50]
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import io
import logging
import statistics as st
import threading
import time
from typing import Callable, Dict, List, Tuple

import pandas as pd
import psutil
import torch
import torch.fx as fx
from torch import nn


from cdp_gfi import build_model, select, slim, to_nni_masks  # noqa: E402
from cdp_gfi.graph.trace import trace  # noqa: E402
from cdp_gfi.masks.select import with_batchnorm_masks  # noqa: E402
from cdp_gfi.graph.scope import default_scope  # noqa: E402
from cdp_gfi.scores.importance import scores_from_statistics  # noqa: E402
from cdp_gfi.statistics.collect import collect_statistics  # noqa: E402

CASES = {"resnet56": ("cifar10", 64, 4, 32, 10), "resnet50": ("imagenet", 8, 2, 224, 1000)}
SPARSITY = 0.5


def measured(step: Callable[[], object]) -> Tuple[object, float, float]:
    """(result, seconds, peak MB above the starting RSS) of one call."""
    proc, peak, done = psutil.Process(), [0], threading.Event()
    start = proc.memory_info().rss

    def watch():
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.002)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    t = time.perf_counter()
    result = step()
    seconds = time.perf_counter() - t
    done.set()
    watcher.join()
    return result, seconds, max(0, max(peak[0], proc.memory_info().rss) - start) / 2**20


def ours(method: str, model: nn.Module, batches, layers, k: int, small: torch.Tensor) -> Dict[str, Tuple[float, float]]:
    """Stages of cdp_gfi: statistics, scores, masks, slim."""
    kinds = ("cdp_class",) if method == "cdp" else ("gfi",)
    out = {}
    stats, *out["statistics"] = measured(lambda: collect_statistics(model, batches, layers, kinds, num_classes=k,
                                                                    progress=False))
    (scores, tiebreak), *out["scores"] = measured(lambda: scores_from_statistics(stats, method, layers=layers))
    graph = trace(model, small)
    masks, *out["masks"] = measured(lambda: to_nni_masks(model, select(method, scores, tiebreak, sparsity=SPARSITY,
                                                                       graph=graph)[0]))
    work = copy.deepcopy(model)
    _, *out["slim"] = measured(lambda: slim(work, masks, small))
    return out


def nni_defaults(model: nn.Module, layers, full: torch.Tensor) -> Dict[str, Tuple[float, float]]:
    """NNI's L1NormPruner masks, then ModelSpeedup with its defaults."""
    from nni.compression.pruning import L1NormPruner
    from nni.compression.speedup import ModelSpeedup

    work, out = copy.deepcopy(model), {}

    def masks():
        pruner = L1NormPruner(work, [{"op_names": list(layers), "op_types": ["Conv2d"], "sparse_ratio": SPARSITY}])
        _, m = pruner.compress()
        pruner.unwrap_model()
        return m

    m, *out["masks"] = measured(masks)
    graph = trace(work, full[:1])
    gm = fx.symbolic_trace(work)
    gm.eval()
    logging.disable(logging.CRITICAL)  # it logs an ERROR for every Identity it cannot (and need not) replace
    with contextlib.redirect_stdout(io.StringIO()):
        _, *out["slim"] = measured(lambda: ModelSpeedup(work, full[:1], with_batchnorm_masks(graph, m),
                                                        graph_module=gm).speedup_model())
    logging.disable(logging.NOTSET)
    return out


def torch_pruning(model: nn.Module, layers, full: torch.Tensor) -> Dict[str, Tuple[float, float]]:
    """Torch-Pruning: pruner construction (dependency graph) and the pruning step."""
    import torch_pruning as tp

    work, keep, out = copy.deepcopy(model), set(layers), {}
    ignored = [m for n, m in work.named_modules() if isinstance(m, nn.Linear) or
               (isinstance(m, nn.Conv2d) and n not in keep)]
    pruner, *out["graph+importance"] = measured(lambda: tp.pruner.MagnitudePruner(
        work, full[:1], importance=tp.importance.GroupMagnitudeImportance(p=1), pruning_ratio=SPARSITY,
        ignored_layers=ignored))
    _, *out["prune"] = measured(pruner.step)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--models", default=",".join(CASES))
    args = parser.parse_args()
    torch.manual_seed(0)
    rows: List[Dict[str, object]] = []
    for name in args.models.split(","):
        dataset, batch, n, size, k = CASES[name]
        model = build_model(name, dataset).eval()
        batches = [(torch.randn(batch, 3, size, size), torch.randint(0, k, (batch,))) for _ in range(n)]
        small = torch.zeros(1, 3, min(size, 64), min(size, 64))
        layers = default_scope(trace(model, small))
        tools = {"cdp_gfi CDP": lambda: ours("cdp", model, batches, layers, k, small),
                 "cdp_gfi GFI-AP": lambda: ours("gfi", model, batches, layers, k, small),
                 "NNI defaults (L1Norm + ModelSpeedup)": lambda: nni_defaults(model, layers, batches[0][0]),
                 "Torch-Pruning (group magnitude)": lambda: torch_pruning(model, layers, batches[0][0])}
        runs: Dict[Tuple[str, str], List[Tuple[float, float]]] = {}
        for _ in range(args.repeats):
            for tool, go in tools.items():
                for stage, value in go().items():
                    runs.setdefault((tool, stage), []).append(value)
        for (tool, stage), values in runs.items():
            rows.append(dict(model=name, tool=tool, stage=stage, seconds=st.median(v[0] for v in values),
                             peak_mb=st.median(v[1] for v in values)))
        print(f"{name} done", flush=True)
    frame = pd.DataFrame(rows)
    print(frame.to_string(index=False, float_format=lambda v: f"{v:.2f}"))
    totals = frame.groupby(["model", "tool"], sort=False).agg(seconds=("seconds", "sum"), peak_mb=("peak_mb", "max"))
    for model, group in totals.groupby(level=0, sort=False):
        nni = group.loc[(model, "NNI defaults (L1Norm + ModelSpeedup)"), "seconds"]
        tp_s = group.loc[(model, "Torch-Pruning (group magnitude)"), "seconds"]
        group = group.assign(vs_nni=group["seconds"] / nni, vs_torch_pruning=group["seconds"] / tp_s)
        print(f"\n{model}: total seconds per tool, ratios to NNI's defaults and to Torch-Pruning")
        print(group.reset_index(level=0, drop=True).to_string(float_format=lambda v: f"{v:.2f}"))


if __name__ == "__main__":
    main()

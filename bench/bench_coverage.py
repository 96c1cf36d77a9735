"""Coverage: which torchvision and timm CNNs cdp_gfi can prune and slim, with Torch-Pruning's beside it.

For each model (random weights, BatchNorm statistics randomised so a pruned
channel's BN shift would show): trace, take the scope's units, remove 30% of
conv+linear MACs with random scores, slim with NNI's ModelSpeedup, and
compare. Columns: convs pruned / convs total, MACs before and after (counted
through the masks and on the slim network), the CPU latency saved at batch 1
(float32, the bench's threads; noisy on a loaded machine), max |slim - masked| / max
|masked| at the bench's input size (both run in float64: a deep random
network amplifies float32 rounding, up to 36% on EfficientNetV2-RW-T's
output, 1e-8 in float64), seconds, and the ops that pinned
channels. Torch-Pruning (magnitude pruning, steps until 30% of MACs are
gone, or as far as it gets) runs unless ``--no-competitor``. Prints the
table and writes readme/coverage.csv.

Slimming feeds NNI a 64x64 dummy (75x75 for inception_v3, whose unpadded
convs need it): only its shape matters, and these nets pool adaptively. One
intra-op thread by default: on a 2-core machine shared with another job, two
threads wait on each other whenever one loses its core (a row ran up to 27x
slower).

``--api`` adds rows for the shipped criteria through the README's API
(``CDPPruner`` / ``GFIPruner`` defaults on random images, ``flops_reduction``
0.3, then ``slim``): whether the default selection reaches the target.
timm models are named ``timm:NAME`` (timm is a bench extra, not a dependency).

    python bench/bench_coverage.py                      # both libraries, both scopes, 96x96
    python bench/bench_coverage.py --library timm --out readme/coverage_timm.csv
    python bench/bench_coverage.py --models mobilenet_v2,timm:mixnet_s --no-competitor --api
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import multiprocessing
import signal
import time
import traceback
import warnings
from pathlib import Path
from typing import Dict, Tuple

import pandas as pd
import torch
from torch import nn
from tqdm import tqdm

from cdp_gfi.flops import count_flops, keep_vectors, macs_of
from cdp_gfi.graph.trace import trace
from cdp_gfi.latency.report import compare_latency
from cdp_gfi.masks.select import apply_masks, select, to_nni_masks
from cdp_gfi.models import build_model
from cdp_gfi.graph.scope import SCOPES, prunable_units, unit_convs
from cdp_gfi.slimming.speedup import slim
from cdp_gfi.slimming.slim_files import SLIM_DUMMY_SIZE

OUT = Path(__file__).resolve().parents[1] / "readme" / "coverage.csv"
MODELS = ("resnet18,resnet50,resnext50_32x4d,wide_resnet50_2,vgg11,mobilenet_v2,mobilenet_v3_small,"
          "mobilenet_v3_large,efficientnet_b0,efficientnet_b1,efficientnet_b2,efficientnet_b3,efficientnet_v2_s,"
          "regnet_x_400mf,regnet_y_400mf,mnasnet0_5,mnasnet1_0,shufflenet_v2_x0_5,shufflenet_v2_x1_0,"
          "densenet121,googlenet,inception_v3,convnext_tiny")
TIMM_MODELS = ",".join(f"timm:{n}" for n in (
    "resnet18 resnet26d resnet50d seresnext26d_32x4d ecaresnet26t skresnet18 resnest14d res2net50_14w_8s "
    "resnetv2_50x1_bit resnet34d efficientnet_b0 tf_efficientnet_b0 efficientnet_lite0 efficientnetv2_rw_t "
    "tf_efficientnetv2_b0 tinynet_e mobilenetv2_050 mobilenetv3_large_100 mobilenetv3_small_050 mixnet_s "
    "mnasnet_100 semnasnet_050 spnasnet_100 fbnetc_100 hardcorenas_a lcnet_050 ghostnet_100 rexnet_100 "
    "regnetx_002 regnety_004 densenet121 dla34 dpn68 cspresnet50 hrnet_w18_small vgg11_bn repvgg_a0 "
    "convnext_atto ese_vovnet19b_dw selecsls42b").split())
LIBRARIES = {"torchvision": MODELS, "timm": TIMM_MODELS}
MIN_SIZE = {"inception_v3": 75}  # its unpadded convs and pools need at least 75x75; the others take 64x64


def _model(name: str) -> nn.Module:
    torch.manual_seed(0)
    model = build_model(name, "imagenet")
    for mod in model.modules():
        if isinstance(mod, nn.BatchNorm2d):  # subclasses too (timm's BatchNormAct2d)
            mod.running_mean.uniform_(-0.1, 0.1)
            mod.running_var.uniform_(0.5, 1.5)
            mod.weight.data.uniform_(0.5, 1.5)
            mod.bias.data.uniform_(-0.1, 0.1)
    for name, param in model.named_parameters():
        if name.rpartition(".")[2] == "gamma":  # layer scales (ConvNeXt's start at 1e-6): trained ones are not tiny
            param.data.uniform_(0.5, 1.5)
    return model.eval()


def ours(name: str, scope: str, size: int, target: float) -> Dict:
    """Prune ``name`` with ``scope`` to ``target`` of MACs removed, slim it, compare with the masked network."""
    started = time.perf_counter()
    model, x = _model(name), torch.randn(2, 3, size, size)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        graph = trace(model, x)
        units = prunable_units(graph, scope)
    pinned = sorted({str(w.message).split(" (first")[0].replace("cdp_gfi does not know how channels pass "
                                                                  "through ", "") for w in caught
                     if "cdp_gfi does not know" in str(w.message)})
    row = dict(model=name, tool=f"cdp_gfi {scope}", convs_total=len(graph.conv_nodes()),
               convs_ranked=len(unit_convs(units)), pinned_by=" ".join(pinned))
    macs0 = count_flops(model, (3, size, size))[0]
    row["macs_before_M"] = round(macs0 / 1e6, 2)
    if not units:
        return {**row, "convs_pruned": 0, "note": "no prunable conv", "seconds": round(time.perf_counter() - started, 1)}
    scores = {n: torch.rand(graph.modules[n].out_channels) for n in unit_convs(units)}
    try:
        keep, _ = select("cdp", scores, graph=graph, flops_reduction=target, units=units)
    except ValueError as err:
        return {**row, "convs_pruned": 0, "note": str(err)[:120], "seconds": round(time.perf_counter() - started, 1)}
    masks = to_nni_masks(model, keep)
    masked_model = apply_masks(copy.deepcopy(model), masks, graph)
    counted = macs_of(graph, keep_vectors(masks))  # what count_flops(masks=...) returns, without a second trace
    slim_size = min(size, max(SLIM_DUMMY_SIZE, MIN_SIZE.get(name, 0)))
    dense = copy.deepcopy(model)
    slim(model, masks, torch.randn(1, 3, slim_size, slim_size), graph=graph)  # the graph: channels only
    latency = latency_cut(dense, model, size)
    with torch.no_grad():  # compared in float64: random deep nets amplify float32 rounding to percents
        out = model.double()(x.double())
        masked = masked_model.double()(x.double())
    model.float()
    macs1 = count_flops(model, (3, size, size))[0]
    return {**row, "convs_pruned": sum(1 for k in keep.values() if not k.all()),
            "macs_after_M": round(macs1 / 1e6, 2), "reduction_%": round(100 * (1 - macs1 / macs0), 1),
            "masks_count_equals_slim": counted == macs1,
            "max_rel_diff": float((out - masked).abs().max() / masked.abs().max()),
            "latency_reduction_%": latency, "seconds": round(time.perf_counter() - started, 1)}


def api(name: str, method: str, size: int, target: float) -> Dict:
    """The shipped criterion through the README's API on random images: does its selection reach ``target``?"""
    from torch.utils.data import DataLoader, TensorDataset

    from cdp_gfi import CDPPruner, GFIPruner

    started = time.perf_counter()
    model, x = _model(name), torch.randn(32, 3, size, size)
    loader = DataLoader(TensorDataset(x, torch.arange(32) % 10), batch_size=16)
    row = dict(model=name, tool=f"{method} default (API)")
    try:
        pruner = (CDPPruner if method == "cdp" else GFIPruner)(
            model, [{"op_types": ["Conv2d"], "sparse_ratio": 0.5}], loader, flops_reduction=target, progress=False)
        _, masks = pruner.compress()
        pruner.unwrap_model()
    except ValueError as err:
        return {**row, "note": str(err)[:160], "seconds": round(time.perf_counter() - started, 1)}
    macs0 = count_flops(model, (3, size, size))[0]
    macs1 = count_flops(model, (3, size, size), masks=masks)[0]
    return {**row, "convs_total": len(pruner.graph.conv_nodes()), "convs_ranked": len(pruner.layers),
            "convs_pruned": sum(1 for k in keep_vectors(masks).values() if not k.all()),
            "macs_before_M": round(macs0 / 1e6, 2), "macs_after_M": round(macs1 / 1e6, 2),
            "reduction_%": round(100 * (1 - macs1 / macs0), 1), "seconds": round(time.perf_counter() - started, 1)}


def torch_pruning(name: str, size: int, target: float) -> Dict:
    """Torch-Pruning's magnitude pruner, stepped until ``target`` of MACs is gone (or no step helps)."""
    import torch_pruning as tp

    started = time.perf_counter()
    model, x = _model(name), torch.randn(1, 3, size, size)
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    widths = {n: m.out_channels for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    row = dict(model=name, tool="torch-pruning", convs_total=len(convs))
    try:
        macs0, _ = tp.utils.count_ops_and_params(model, x)
        head = [m for m in model.modules() if isinstance(m, nn.Linear)][-1:]
        steps = 20
        pruner = tp.pruner.MagnitudePruner(model, x, importance=tp.importance.MagnitudeImportance(p=1),
                                           iterative_steps=steps, pruning_ratio=0.9, ignored_layers=head)
        macs1 = macs0
        for _ in range(steps):
            pruner.step()
            macs1, _ = tp.utils.count_ops_and_params(model, x)
            if macs1 <= (1 - target) * macs0:
                break
        now = {n: m.out_channels for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
        row["latency_reduction_%"] = latency_cut(_model(name), model, size)
        with torch.no_grad():
            model(x)
        row.update(convs_pruned=sum(1 for n in convs if now.get(n, 0) < widths[n]),
                   macs_before_M=round(macs0 / 1e6, 2), macs_after_M=round(macs1 / 1e6, 2),
                   **{"reduction_%": round(100 * (1 - macs1 / macs0), 1)})
    except RowTimeout:
        raise
    except Exception as err:  # a competitor's failure is a result, not a crash
        where = traceback.extract_tb(err.__traceback__)[-1].name
        row.update(convs_pruned=0, note=f"{type(err).__name__} in {where}: {str(err)[:100]}")
    row["seconds"] = round(time.perf_counter() - started, 1)
    return row


def latency_cut(dense: nn.Module, slim_model: nn.Module, size: int) -> float:
    """Percent of the dense network's CPU latency at batch 1 the slim one saves, as run summaries report it."""
    cut = compare_latency(dense, slim_model, (3, size, size), "cpu", (1,), min_run_time=0.1)
    return round(cut["latency_reduction_pct_b1"], 1)


class RowTimeout(Exception):
    """A row ran past ``--timeout``."""


def _alarm(signum, frame):
    raise RowTimeout


def run_job(job: Tuple[str, str, int, float, int, int]) -> Dict:
    """One row: ``scope`` is a scope of ours, ``api-cdp`` / ``api-gfi`` or ``torch-pruning``; failures and
    rows that run past ``timeout`` seconds (Torch-Pruning hung on some models) are rows."""
    name, scope, size, target, threads, timeout = job
    torch.set_num_threads(threads)
    warnings.filterwarnings("ignore", message=".*(deprecated|pytree).*")
    tool = "torch-pruning" if scope == "torch-pruning" else f"cdp_gfi {scope}"
    signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(timeout)
    try:
        if scope == "torch-pruning":
            return torch_pruning(name, size, target)
        if scope.startswith("api-"):
            return api(name, scope[4:], size, target)
        return ours(name, scope, size, target)
    except RowTimeout:
        return dict(model=name, tool=tool, note=f"timed out after {timeout} s", seconds=timeout)
    except Exception as err:
        return dict(model=name, tool=tool, note=f"{type(err).__name__}: {str(err)[:120]}")
    finally:
        signal.alarm(0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--library", default="torchvision,timm", help="comma-separated: torchvision, timm")
    parser.add_argument("--models", help="comma-separated names (timm:NAME for timm); default: the libraries' lists")
    parser.add_argument("--api", action="store_true", help="add the default CDPPruner / GFIPruner through the API")
    parser.add_argument("--size", type=int, default=96, help="input height = width")
    parser.add_argument("--target", type=float, default=0.3, help="fraction of MACs to remove")
    parser.add_argument("--scopes", default=",".join(SCOPES), help="comma-separated; empty: Torch-Pruning only")
    parser.add_argument("--no-competitor", action="store_true", help="skip Torch-Pruning")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads per process")
    parser.add_argument("--jobs", type=int, default=1, help="processes, one model row each at a time (2 on 2 idle "
                                                            "cores: one thread each never waits on the other)")
    parser.add_argument("--timeout", type=int, default=600, help="seconds a row may take before it is recorded as "
                                                                  "timed out")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started, rows = time.perf_counter(), []
    models = (args.models or ",".join(LIBRARIES[lib] for lib in args.library.split(","))).split(",")
    jobs = [(m, s) for m in models for s in args.scopes.split(",") if s]
    jobs += [(m, f"api-{method}") for m in models for method in ("cdp", "gfi")] if args.api else []
    jobs += [] if args.no_competitor else [(m, "torch-pruning") for m in models]
    work = [(name, scope, args.size, args.target, args.threads, args.timeout) for name, scope in jobs]
    with multiprocessing.get_context("spawn").Pool(args.jobs) if args.jobs > 1 else contextlib.nullcontext() as pool:
        results = pool.imap(run_job, work) if pool else map(run_job, work)
        for row in tqdm(results, total=len(work), desc="coverage"):
            rows.append(row)
            pd.DataFrame(rows).to_csv(args.out, index=False)
    table = pd.DataFrame(rows)
    table.to_csv(args.out, index=False)
    with pd.option_context("display.width", 250, "display.max_columns", 20, "display.max_colwidth", 40):
        print(table.to_string(index=False))
    print(f"total {time.perf_counter() - started:.0f} s at {args.size}x{args.size}, {args.jobs} process(es) of "
          f"{args.threads} thread(s)")


if __name__ == "__main__":
    main()

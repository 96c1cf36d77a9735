"""Quality on held-out images: real pretrained networks, the whole CIFAR-10 (JPEG), every method at equal MACs.

Each network is first adapted to the data by dense fine-tuning (``--adapt_epochs``,
cached by checkpoint hash and recipe, see ``adaptation.py``); every row prunes
that same adapted network's block-internal convs to the MACs target, slims,
re-estimates BatchNorm on 20 batches of 128 training images (a), then
fine-tunes ``--epochs`` (default 1) over the 50,000 training images with one
recipe for every row (b); top-1 on the 5,000 held-out test images after each.
The ``dense`` row is the adapted network, fine-tuned the same way: the ceiling.
Recovery is a row suffix: ``+rec`` refits every layer from the first one
reading a pruned conv on by least squares (``cdp_gfi.slimming.reconstruct``,
the default ``downstream``) before (a), ``+rec-readers`` only the layers
reading pruned convs (the earlier default); ``+kd`` fine-tunes
with the dense network as teacher (``cdp_gfi.train.distill``), (b) only; its
temperature and weight go in the row's ``distill`` column (``none`` without
``+kd``), the reconstruction sample's batches (``--reconstruct_batches``) in
``rec_batches`` (0 without), and rows of other settings are not taken as done. Seeds
change the statistics sample, Taylor's batches, the BN batches, the
reconstruction sample and the fine-tuning order.

    python bench/bench_quality.py --quick     # ResNet-20, 50%, seed 0, the main rows, (a) and (b), 2 processes
    python bench/bench_quality.py --quick --epochs 0   # the same, (a) only
    python bench/bench_quality.py             # ResNet-20 and -32, 30% and 50%, seeds 0-2, every row
    python bench/bench_quality.py --epochs 0  # measure (a) only
    python bench/bench_quality.py --dataroot /data/cifar10 --adapt_epochs 0 --nets resnet56=ckpt/resnet56.pth

Each row also carries the CPU latency the slim network saves against the dense
one at batch 1 and 128 (``latency_b*_pct``, ``compare_latency`` as run summaries
report it, on the bench's threads; the row's load says how busy the machine was). Rows are appended to
<out>/bench_quality.csv as they finish, each in place of a row of the same network, method, target, seed and
distillation setting; rows of other runs sharing the folder are kept. --resume skips
the ones already there. The summary (mean and std over seeds, seed counts) goes
to <out>/bench_quality_summary.csv and the plot to <out>/bench_quality.png.
"""
from __future__ import annotations

import argparse
import copy
import multiprocessing
import os
import sys
import time
import warnings
import dataclasses
import fcntl
from dataclasses import replace
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
warnings.filterwarnings("ignore")
warnings.filterwarnings("default", message="reconstruct:")

import competitors  # noqa: E402
from adaptation import adapted, fine_tune  # noqa: E402
from cdp_gfi import count_flops, recalibrate_batchnorm, select, to_nni_masks  # noqa: E402
from cdp_gfi.data.datasets import cifar_datasets  # noqa: E402
from cdp_gfi.data.samplers import make_loader, sample_loader  # noqa: E402
from cdp_gfi.graph.scope import default_scope  # noqa: E402
from cdp_gfi.graph.sites import read_points  # noqa: E402
from cdp_gfi.graph.trace import ModelGraph, trace  # noqa: E402
from cdp_gfi.latency.report import compare_latency  # noqa: E402
from cdp_gfi.masks.variants import DEFAULTS, PUBLISHED, Variant  # noqa: E402
from cdp_gfi.runs.cli import OneLineParser  # noqa: E402
from cdp_gfi.scores.importance import scores_from_statistics  # noqa: E402
from cdp_gfi.slimming.reconstruct import DEFAULT_BATCHES as REC_BATCHES, reconstruct  # noqa: E402
from cdp_gfi.statistics.collect import collect_statistics  # noqa: E402
from cdp_gfi.statistics.store import Statistics  # noqa: E402
from cdp_gfi.train.distill import DEFAULT_TEMPERATURE, DEFAULT_WEIGHT  # noqa: E402
from cdp_gfi.train.loop import evaluate, seed_everything  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
DEFAULT_DATAROOT = SHARED / "cifar10-jpeg"
DEFAULT_NETS = {"resnet20": SHARED / "pretrained" / "resnet20-12fca82f.th",
                "resnet32": SHARED / "pretrained" / "resnet32-d509ac18.th"}
SIZE = (3, 32, 32)
DEVICE = torch.device("cpu")
BATCH = 128
STATS_BATCHES = 20
RECAL_BATCHES = 20
FINETUNE_LR = 0.01
LATENCY_BATCHES = (1, BATCH)  # the latency column (``compare_latency`` on the bench's threads)


OURS: Dict[str, Tuple[str, Variant]] = {
    "cdp": ("cdp", DEFAULTS["cdp"]),
    "gfi-ap": ("gfi", DEFAULTS["gfi"]),
    "cdp-classwise": ("cdp", replace(DEFAULTS["cdp"], cdp_mode="classwise")),
    "cdp[published]": ("cdp", PUBLISHED["cdp"]),
    "cdp-sample[published]": ("cdp", replace(PUBLISHED["cdp"], cdp_mode="sample")),
    "gfi-ap[published]": ("gfi", PUBLISHED["gfi"]),
}
OTHERS = ("nni-l1", "nni-fpgm", "nni-taylor", "tp-global", "tp-layer", "l1-layernorm", "random")
PEER = "nni-fpgm"  # the peer whose masks get our recovery too
RECOVERY = ("rec", "rec-readers", "kd")
BASES = ("dense", *OURS, *OTHERS)
METHODS = (*BASES, *(f"{m}+{r}" for r in ("rec", "kd", "rec+kd") for m in ("cdp", "gfi-ap", PEER)))
MAIN = ("dense", "cdp", "gfi-ap", PEER, "l1-layernorm", "tp-global", "cdp+rec", "gfi-ap+rec", f"{PEER}+rec")
MAIN_B = tuple(f"{m}+kd" if m.endswith("+rec") else m for m in MAIN)  # with (b): the recovery as it ships


def ours(base: str) -> Optional[Tuple[str, Variant]]:
    """(criterion, variant) of one of our rows: a named one, or a default with options changed, spelt
    ``cdp{cost_power=0.5;max_layer_sparsity=none}`` (the variant search); None for the other rows."""
    if base in OURS:
        return OURS[base]
    name, brace, options = base.partition("{")
    if name not in ("cdp", "gfi-ap") or not brace or not options.endswith("}"):
        return None
    kind, fields = name.replace("gfi-ap", "gfi"), [f.name for f in dataclasses.fields(Variant)]
    changes = {}
    for option in options[:-1].split(";"):
        key, _, value = option.partition("=")
        if key not in fields or not value:
            raise ValueError(f"row {base!r}: {option!r} is not key=value with a key among {', '.join(fields)}")
        numeric = key in ("cost_power", "max_layer_sparsity", "weight_power")
        changes[key] = None if value == "none" else float(value) if numeric else value
    return kind, replace(DEFAULTS[kind], **changes)


def parse_method(method: str) -> Tuple[str, Tuple[str, ...]]:
    """``cdp+rec+kd`` -> (``cdp``, (``rec``, ``kd``)); refuses unknown rows and recovery that cannot apply."""
    base, *extra = method.split("+")
    if (base not in BASES and ours(base) is None) or any(r not in RECOVERY for r in extra):
        raise ValueError(f"unknown row {method!r}: a row is one of {', '.join(BASES)} (ours with options: "
                         "cdp{cost_power=0.5;...}), optionally followed by +rec (or +rec-readers) and/or +kd")
    if "rec" in extra and "rec-readers" in extra:
        raise ValueError(f"row {method!r}: +rec and +rec-readers are two reconstructions; give one")
    if extra and (base == "dense" or base.startswith("tp-")):
        raise ValueError(f"row {method!r}: recovery applies to rows with masks (not dense or Torch-Pruning's)")
    return base, tuple(extra)


class Bench:
    """One network, one seed: the data, the adapted dense net, its graph and scope, statistics per feature site."""

    def __init__(self, name: str, base: nn.Module, splits, seed: int, epochs: int,
                 distill: Tuple[float, float], rec_batches: int = REC_BATCHES) -> None:
        self.name, self.splits, self.seed, self.epochs, self.distill = name, splits, seed, epochs, distill
        self.rec_batches = rec_batches
        self.base = base.eval()
        self.graph: ModelGraph = trace(self.base, torch.zeros(1, *SIZE))
        self.scope = default_scope(self.graph)
        self.test = make_loader(splits[2], 256, shuffle=False)
        self.base_top1 = self.top1(self.base)
        self.dense_macs = count_flops(self.base, SIZE)[0]
        self._stats: Dict[str, Statistics] = {}

    def top1(self, model: nn.Module) -> float:
        return evaluate(model, self.test, DEVICE, disable_progress=True)["top1"]

    def statistics(self, site: str) -> Statistics:
        """Every kind of statistics at ``site`` on a seeded sample of the training set, once per network and seed."""
        if site not in self._stats:
            loader = sample_loader(self.splits[1], BATCH, STATS_BATCHES, self.seed, 0)
            self._stats[site] = collect_statistics(
                self.base, loader, self.scope, ("cdp_class", "cdp_sample", "gfi"), num_classes=10,
                stop_batch=STATS_BATCHES, progress=False, read_at=read_points(self.graph, self.scope, site))
        return self._stats[site]

    def masks(self, method: str, target: float) -> competitors.Masks:
        """The masks of ``method`` removing ``target`` of conv+linear MACs (every row but Torch-Pruning's)."""
        if ours(method) is not None:
            kind, variant = ours(method)
            stats = self.statistics(variant.site)
            scores, tie = scores_from_statistics(stats, kind, variant.cdp_mode, None, self.scope)
            keep, _ = select(kind, scores, tie, flops_reduction=target, graph=self.graph,
                             normalization=variant.normalize, cost_power=variant.cost_power, rule=variant.rule,
                             max_layer_sparsity=variant.max_layer_sparsity, weight_power=variant.weight_power)
            return to_nni_masks(self.base, keep)
        if method == "random":
            return competitors.random_masks(self.base, self.graph, self.scope, target, self.seed)
        if method == "l1-layernorm":
            return competitors.l1_normalised_masks(self.base, self.graph, self.scope, target)
        factory = taylor_evaluator(self.splits[1], self.seed) if method == "nni-taylor" else None
        return competitors.nni_at_macs(method, self.base, self.scope, target, SIZE, factory)[0]

    def pruned(self, method: str, target: float) -> Tuple[nn.Module, Optional[competitors.Masks]]:
        """(slim copy of the dense net pruned by ``method``, its masks; None for Torch-Pruning's rows)."""
        if method == "dense":
            return copy.deepcopy(self.base), None
        if method.startswith("tp-"):
            return competitors.tp_at_macs(self.base, self.scope, target, SIZE, method == "tp-global")[0], None
        masks = self.masks(method, target)
        return competitors.slimmed(self.base, masks, SIZE), masks

    def run(self, method: str, target: float) -> Dict[str, object]:
        """Prune (+ reconstruct), re-estimate BN, evaluate (a); fine-tune (+ distil), evaluate (b): one row."""
        base, recovery = parse_method(method)
        seed_everything(self.seed)
        started = time.perf_counter()
        model, masks = self.pruned(base, target)
        if "rec" in recovery or "rec-readers" in recovery:
            sample = sample_loader(self.splits[1], BATCH, self.rec_batches, self.seed + 1000, 0)
            reconstruct(self.base, model, masks, sample, batches=self.rec_batches,
                        layers="readers" if "rec-readers" in recovery else "downstream")
        prune_s = time.perf_counter() - started
        a, b, a_s = self.measure(model, recalibrate=base != "dense", distill="kd" in recovery)
        a_s += prune_s
        latency = {f"latency_b{n}_pct": 0.0 for n in LATENCY_BATCHES}
        if base != "dense":  # after measuring: its random inputs leave the rows' seeds alone
            cut = compare_latency(self.base, model, SIZE, "cpu", LATENCY_BATCHES, min_run_time=0.2)
            latency = {f"latency_b{n}_pct": cut[f"latency_reduction_pct_b{n}"] for n in LATENCY_BATCHES}
        macs = count_flops(model, SIZE)[0]
        return dict(net=self.name, method=method, target_pct=0.0 if base == "dense" else 100 * target,
                    seed=self.seed, **settings_of(recovery, self.distill, self.rec_batches),
                    macs_removed_pct=100 * (1 - macs / self.dense_macs), **latency,
                    dense_top1=self.base_top1,
                    top1_a=a, top1_b=b, epochs=self.epochs, prune_s=prune_s, a_s=a_s,
                    total_s=time.perf_counter() - started, load_1min=os.getloadavg()[0])


    def measure(self, model: nn.Module, recalibrate: bool = True, distill: bool = False) -> Tuple[float, float, float]:
        """Top-1 after BN re-estimation (a) and after ``epochs`` of fine-tuning, distilled from the dense net if
        ``distill`` (b, NaN for 0 epochs); and the seconds (a) took. ``model`` is fine-tuned in place."""
        started = time.perf_counter()
        if recalibrate:
            recal = make_loader(self.splits[1], BATCH, shuffle=True, seed=self.seed)
            recalibrate_batchnorm(model, recal, RECAL_BATCHES, DEVICE, progress=False)
        a = self.top1(model)
        a_s = time.perf_counter() - started
        b = float("nan")
        if self.epochs:
            b = fine_tune(model, self.name, self.splits, self.test, self.epochs, FINETUNE_LR, self.seed,
                          teacher=self.base if distill else None, distill=self.distill if distill else None)
        return a, b, a_s


def taylor_evaluator(dataset, seed: int) -> Callable[[nn.Module], object]:
    """An NNI TorchEvaluator factory whose optimizer has lr 0: Taylor's batches only measure gradients."""
    import nni
    from nni.compression import TorchEvaluator

    loader = sample_loader(dataset, BATCH, 8, seed, 0)

    def training(model, optimizer, training_step, lr_schedulers=None, max_steps=None, max_epochs=None):
        model.train()
        for step, batch in enumerate(loader):
            if max_steps is not None and step >= max_steps:
                break
            optimizer.zero_grad()
            training_step(batch, model).backward()
            optimizer.step()

    def factory(model: nn.Module):
        optimizer = nni.trace(torch.optim.SGD)(model.parameters(), lr=0.0)
        return TorchEvaluator(training, optimizer, lambda batch, model: nn.functional.cross_entropy(
            model(batch[0]), batch[1]), dummy_input=torch.zeros(1, *SIZE))

    return factory


SETTINGS = ["distill", "rec_batches"]  # a row's recovery settings (``settings_of``), part of its key
ROW_KEY = ["net", "method", "target_pct", "seed", *SETTINGS]  # one row of the CSV per key


def settings_of(recovery: Tuple[str, ...], distill: Tuple[float, float], rec_batches: int) -> Dict[str, object]:
    """A row's ``SETTINGS``: ``distill``, ``T=4,W=0.9`` for a ``+kd`` row (temperature, weight), else ``none``;
    ``rec_batches``, the reconstruction sample's batches of 128 (0 for a row without reconstruction)."""
    rebuilt = any(r.startswith("rec") for r in recovery)  # +rec, +rec-readers, and renamed rows of the README CSV
    return {"distill": f"T={distill[0]:g},W={distill[1]:g}" if "kd" in recovery else "none",
            "rec_batches": rec_batches if rebuilt else 0}


def with_settings(rows: pd.DataFrame) -> pd.DataFrame:
    """``rows`` with every ``SETTINGS`` column. A CSV written before one was recorded says ``unknown`` for its
    ``+kd`` rows' setting (not recorded) and 4 reconstruction batches (the only sample before the option)."""
    if not len(rows):
        return rows
    recovery = [m.split("+")[1:] for m in rows["method"]]  # by spelling: renamed rows of the README CSV too
    if "distill" not in rows:
        rows = rows.assign(distill=["unknown" if "kd" in r else "none" for r in recovery])
    if "rec_batches" not in rows:
        rows = rows.assign(rec_batches=[settings_of(r, (0, 0), 4)["rec_batches"] for r in recovery])
    return rows


def pending(rows: pd.DataFrame, runs: List[Tuple[str, int, float, str]], distill: Tuple[float, float],
            need_b: bool, rec_batches: int = REC_BATCHES) -> List[Tuple[str, int, float, str]]:
    """The (net, seed, target, method) runs not already in ``rows`` (``with_settings``'s) with these recovery
    settings, and with (b) when ``need_b``."""
    if not len(rows):
        return list(dict.fromkeys(runs))
    rows = rows if not need_b else rows[rows["top1_b"].notna()]
    done = set(zip(*(rows[k] for k in ROW_KEY)))
    return [run for run in dict.fromkeys(runs)
            if (run[0], run[3], 100 * run[2], run[1],
                *settings_of(parse_method(run[3])[1], distill, rec_batches).values()) not in done]


_WORKER: Dict[str, object] = {}  # one process's setup (``start_worker``) and its current Bench


def start_worker(setup: Dict[str, object], threads: int, splits=None) -> None:
    """A row runner's setup (nets, data root, recipe, distillation); ``threads`` torch threads in this process;
    the data splits where this process has them already (else read from the data root at the first row)."""
    torch.set_num_threads(threads)
    _WORKER.clear()
    _WORKER.update(setup=setup, **({"splits": splits} if splits is not None else {}))


def run_row(run: Tuple[str, int, float, str]) -> Dict[str, object]:
    """One (net, seed, target, method) row in this process; its Bench (data, statistics) is kept while the next
    row has the same network and seed."""
    net, seed, target, method = run
    setup = _WORKER["setup"]
    if "splits" not in _WORKER:
        _WORKER["splits"] = cifar_datasets(setup["dataroot"], check_integrity=False)
    bench = _WORKER.get("bench")
    if bench is None or (bench.name, bench.seed) != (net, seed):
        splits = _WORKER["splits"]
        base, _ = adapted(net, setup["nets"][net], splits, make_loader(splits[2], 256, shuffle=False),
                          setup["adapt_epochs"], setup["dataroot"], setup["cache"])
        bench = _WORKER["bench"] = Bench(net, base, splits, seed, setup["epochs"], setup["distill"],
                                         setup["rec_batches"])
    return bench.run(method, target)


def run_rows(todo: List[Tuple[str, int, float, str]], setup: Dict[str, object], jobs: int,
             splits) -> Iterator[Dict]:
    """The rows of ``todo`` as they finish: in this process (with its ``splits``), or in ``jobs`` spawned ones of
    one share of the torch threads each, taking the next row as they free up (each row is seeded by itself, so the
    rows are the same)."""
    threads = max(1, torch.get_num_threads() // jobs)
    if jobs == 1:
        start_worker(setup, threads, splits)
        yield from map(run_row, todo)
        return
    with multiprocessing.get_context("spawn").Pool(jobs, start_worker, (setup, threads)) as pool:
        yield from pool.imap_unordered(run_row, todo)


def add_row(csv: Path, row: Dict[str, object]) -> pd.DataFrame:
    """Write ``row`` into ``csv`` in place of any row with its key, merged into what the file holds now (under a
    lock, written whole then renamed), so runs sharing an ``--out`` keep each other's rows; all rows after it."""
    with open(csv.parent / f".{csv.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        rows = with_settings(pd.read_csv(csv)) if csv.exists() else pd.DataFrame()
        if len(rows):
            rows = rows[~(rows[ROW_KEY] == pd.Series({k: row[k] for k in ROW_KEY})).all(axis=1)]
        rows = pd.concat([rows, pd.DataFrame([row])], ignore_index=True)
        partial = csv.parent / f".{csv.name}.partial"
        rows.to_csv(partial, index=False)
        os.replace(partial, csv)
    return rows


def summarize(rows: pd.DataFrame) -> pd.DataFrame:
    """Mean, std and seed count of both measures, per network, target, row and recovery settings (table order
    kept)."""
    grouped = rows.groupby(["net", "target_pct", "method", *SETTINGS], sort=False)
    latency = {c: (c, "mean") for c in rows.columns if c.startswith("latency_")}
    out = grouped.agg(macs_removed_pct=("macs_removed_pct", "mean"), **latency,
                      a_mean=("top1_a", "mean"), a_std=("top1_a", "std"), a_seeds=("top1_a", "count"),
                      b_mean=("top1_b", "mean"), b_std=("top1_b", "std"), b_seeds=("top1_b", "count"),
                      run_s=("total_s", "mean"), load_1min=("load_1min", "mean")).reset_index()
    return out.round(2)


def plot(summary: pd.DataFrame, path: Path) -> None:
    """One panel per network and target, (a) above (b): a horizontal bar per row (mean, std over seeds), the
    dense network as a dashed line; rows not measured in a panel are left out of it."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = summary[["method", *SETTINGS]].drop_duplicates().groupby("method").size()
    summary = summary.assign(method=[m if settings[m] == 1 else f"{m} ({d}, {r} rec batches)" for m, d, r in
                                     zip(summary["method"], summary["distill"], summary["rec_batches"])])
    dense = summary[summary["target_pct"] == 0].set_index("net")
    pruned = summary[summary["target_pct"] != 0]
    cases = list(pruned.groupby(["net", "target_pct"], sort=False).groups) or [(None, None)]
    methods = list(dict.fromkeys(pruned["method"]))
    measured = {col: [m for m in methods if pruned.loc[pruned["method"] == m, f"{col}_mean"].notna().any()]
                for col in ("a", "b")}
    fig, axes = plt.subplots(2, len(cases), squeeze=False, sharey="row", gridspec_kw={
        "height_ratios": [max(1, len(measured["a"])), max(1, len(measured["b"]))]},
        figsize=(3.6 * len(cases) + 2.5, 0.2 * (len(measured["a"]) + len(measured["b"])) + 3))
    for row, (col, title) in enumerate((("a", "(a) pruned + BN re-estimated"), ("b", "(b) + one epoch of fine-tuning"))):
        rows = measured[col]
        for ax, (net, pct) in zip(axes[row], cases):
            part = pruned[(pruned["net"] == net) & (pruned["target_pct"] == pct)].set_index("method")
            shown = [m for m in rows if m in part.index and pd.notna(part.loc[m, f"{col}_mean"])]
            ys = [rows.index(m) for m in shown]
            vals = [part.loc[m, f"{col}_mean"] for m in shown]
            errs = [0 if pd.isna(part.loc[m, f"{col}_std"]) else part.loc[m, f"{col}_std"] for m in shown]
            ax.barh(ys, vals, xerr=errs, color=["tab:orange" if m.split("+")[0] in ("cdp", "gfi-ap") else "tab:blue"
                                                for m in shown], capsize=2)
            if net in dense.index and pd.notna(dense.loc[net, f"{col}_mean"]):
                ax.axvline(dense.loc[net, f"{col}_mean"], color="k", ls="--", lw=1, label="dense")
            if vals:
                ax.set_xlim(max(0.0, min(vals) - 5), max(vals + [dense.loc[net, f"{col}_mean"]
                                                                 if net in dense.index else 0]) + 2)
            ax.set_title(f"{title}\n{net}, {pct:g}% of MACs removed" if net else title, fontsize=9)
            ax.grid(axis="x", alpha=0.3)
            ax.set_xlabel("top-1 % (held out)", fontsize=8)
        axes[row][0].set_yticks(range(len(rows)))
        axes[row][0].set_yticklabels(rows, fontsize=7)
        axes[row][0].set_ylim(len(rows) - 0.5, -0.5)
    fig.suptitle("orange: our defaults (cdp, gfi-ap), with or without recovery; blue: every other row; dashed: the "
                 "dense network (in (b) fine-tuned the same way)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_nets(text: Optional[str]) -> Dict[str, Path]:
    """``name=path,name=path`` (model names as --model takes them), or the shared defaults."""
    if not text:
        return dict(DEFAULT_NETS)
    nets = {}
    for part in text.split(","):
        name, sep, path = part.partition("=")
        if not sep:
            raise ValueError(f"--nets takes name=path pairs, got {part!r}")
        nets[name.strip()] = Path(path.strip())
    return nets


def check_paths(dataroot: Path, nets: Dict[str, Path]) -> None:
    """A missing data layout names the converter; a missing checkpoint names the flag to pass."""
    if not (dataroot / "cifar-10-batches-py").is_dir():
        raise FileNotFoundError(
            f"no cifar-10-batches-py/ under {str(dataroot)!r}: convert the JPEG archives with "
            f"python {SHARED / 'cifar10-jpeg' / 'to_pickle.py'} OUT_DIR and pass --dataroot OUT_DIR "
            "(or any CIFAR-10 folder in torchvision's python layout)")
    for name, path in nets.items():
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint for {name} not found at {str(path)!r}: pass --nets {name}=PATH")


def parse_args(argv) -> argparse.Namespace:
    p = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataroot", type=Path, default=DEFAULT_DATAROOT,
                   help="CIFAR-10 root holding cifar-10-batches-py/ (default ../shared/data/cifar10-jpeg, after "
                        "its to_pickle.py wrote the layout there)")
    p.add_argument("--nets", help="name=checkpoint pairs, comma-separated (default: the two shared pretrained "
                                  "ResNets, resnet20 and resnet32)")
    p.add_argument("--adapt_epochs", type=int, default=2,
                   help="dense fine-tuning epochs before pruning, cached (default 2; 0 for data the nets were "
                        "trained on)")
    p.add_argument("--cache", type=Path, default=Path("ckpt/adapted"), help="folder of adapted networks")
    p.add_argument("--targets", default="0.3,0.5", help="fractions of conv+linear MACs removed (default 0.3,0.5)")
    p.add_argument("--seeds", type=int, default=3, help="how many seeds (default 3)")
    p.add_argument("--first_seed", type=int, default=0,
                   help="seeds first..first+N-1 (default 0), so that jobs can share a grid's seeds")
    p.add_argument("--epochs", type=int, default=1, help="fine-tuning epochs for (b) (default 1): 0 measures "
                                                         "(a) only")
    p.add_argument("--methods", default=",".join(METHODS), help=f"rows (default all): {', '.join(METHODS)}")
    p.add_argument("--distill_temperature", type=float, default=DEFAULT_TEMPERATURE,
                   help=f"temperature of the +kd rows (default {DEFAULT_TEMPERATURE:g})")
    p.add_argument("--distill_weight", type=float, default=DEFAULT_WEIGHT,
                   help=f"weight of the soft term in the +kd rows (default {DEFAULT_WEIGHT:g})")
    p.add_argument("--reconstruct_batches", type=int, default=REC_BATCHES,
                   help=f"batches of 128 training images the +rec rows refit on (default {REC_BATCHES}, the "
                        "library's)")
    p.add_argument("--quick", action="store_true",
                   help="resnet20, 50%%, seed 0, the main rows (with (b): our recovery as it ships, +rec+kd), "
                        "2 processes; 14.6 min on 2 cores once the network is adapted (--epochs 0: (a) only)")
    p.add_argument("--jobs", type=int,
                   help="processes running rows side by side, each with its share of the torch threads (default 1; "
                        "2 with --quick)")
    p.add_argument("--resume", action="store_true", help="keep rows already in <out>/bench_quality.csv")
    p.add_argument("--out", type=Path, default=Path("readme"), help="folder for CSVs and the plot (default readme)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if args.jobs is None:
            args.jobs = 2 if args.quick else 1
        if args.jobs < 1:
            raise ValueError(f"--jobs must be >= 1, got {args.jobs}")
        if args.reconstruct_batches < 1:
            raise ValueError(f"--reconstruct_batches must be >= 1, got {args.reconstruct_batches}")
        if args.adapt_epochs < 0 or args.epochs < 0:
            raise ValueError(f"--adapt_epochs and --epochs must be >= 0, got {args.adapt_epochs}, {args.epochs}")
        nets = parse_nets(args.nets)
        if args.quick:
            nets = {k: v for k, v in nets.items() if k == "resnet20"} or dict(list(nets.items())[:1])
        check_paths(args.dataroot, nets)
        methods = list((MAIN_B if args.epochs else MAIN) if args.quick else args.methods.split(","))
        for method in methods:
            parse_method(method)
        if not args.epochs:  # distillation changes (b) only
            methods = [m for m in methods if "kd" not in parse_method(m)[1]]
        targets = [0.5] if args.quick else [float(t) for t in args.targets.split(",")]
        if args.seeds < 1 or args.first_seed < 0:
            raise ValueError(f"--seeds must be >= 1 and --first_seed >= 0, got {args.seeds}, {args.first_seed}")
        seeds = range(1) if args.quick else range(args.first_seed, args.first_seed + args.seeds)
        splits = cifar_datasets(args.dataroot, check_integrity=False)
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    csv = args.out / "bench_quality.csv"
    rows = with_settings(pd.read_csv(csv)) if args.resume and csv.exists() else pd.DataFrame()
    started = time.perf_counter()
    distill = (args.distill_temperature, args.distill_weight)
    todo = pending(rows, [(n, s, 0.0 if m == "dense" else t, m) for n in nets for s in seeds for t in targets
                          for m in methods], distill, need_b=bool(args.epochs),  # (a)-only rows get (b) too
                   rec_batches=args.reconstruct_batches)
    test = make_loader(splits[2], 256, shuffle=False)
    for net in dict.fromkeys(run[0] for run in todo):  # adapted here once, so that workers only read the cache
        adapted(net, nets[net], splits, test, args.adapt_epochs, args.dataroot, args.cache)
    setup = dict(nets=nets, dataroot=args.dataroot, adapt_epochs=args.adapt_epochs, cache=args.cache,
                 epochs=args.epochs, distill=distill, rec_batches=args.reconstruct_batches)
    loads = []
    for row in tqdm(run_rows(todo, setup, args.jobs, splits), total=len(todo), desc="bench_quality"):
        loads.append(row["load_1min"])
        rows = add_row(csv, row)
        tqdm.write(" ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
    if not len(rows):
        print("nothing to do")
        return 0
    summary = summarize(rows)
    summary.to_csv(args.out / "bench_quality_summary.csv", index=False)
    plot(summary, args.out / "bench_quality.png")
    print(summary.to_string(index=False))
    load = f"{min(loads, default=float('nan')):.1f}-{max(loads, default=float('nan')):.1f}"
    print(f"\n{len(todo)} runs in {(time.perf_counter() - started) / 60:.1f} min in {args.jobs} process(es) of "
          f"{max(1, torch.get_num_threads() // args.jobs)} thread(s), 1-min load {load}; "
          "dense top-1 on the held-out images: " +
          ", ".join(f"{n} {v:.2f}%" for n, v in rows.groupby("net")["dense_top1"].first().items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Quality on real pretrained networks and real CIFAR-10 images: every method at equal MACs removed.

Each (network, MACs target, seed) prunes the same block-internal convs of one
published checkpoint with every method, slims, re-estimates BatchNorm
statistics on the same 20 batches (a), then fine-tunes 3 epochs with one
fixed recipe (b); top-1 on the held-out images after each. Seeds change the
statistics sample, Taylor's batches, the BN batches and the fine-tuning order.

    python bench/bench_quality.py --quick     # ResNet-20, 50%, seed 0, the main rows
    python bench/bench_quality.py             # ResNet-20 and -32, 30% and 50%, seeds 0-2, every row
    python bench/bench_quality.py --epochs 0  # measure (a) only
    python bench/bench_quality.py --dataroot /data/cifar10 --nets resnet56=ckpt/resnet56.pth   # your own

Rows are appended to <out>/bench_quality.csv as they finish; --resume skips
the ones already there. The summary (mean and std over seeds) goes to
<out>/bench_quality_summary.csv and the plot to <out>/bench_quality.png.
"""
from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
warnings.filterwarnings("ignore")

import competitors  # noqa: E402
from cdp_gfi import build_model, count_flops, load_pretrained, recalibrate_batchnorm, select, to_nni_masks  # noqa: E402
from cdp_gfi.data.datasets import cifar_datasets  # noqa: E402
from cdp_gfi.data.samplers import make_loader, sample_loader  # noqa: E402
from cdp_gfi.graph.trace import ModelGraph, trace  # noqa: E402
from cdp_gfi.runs.cifar_config import PruneConfig, resolve  # noqa: E402
from cdp_gfi.runs.cifar_steps import finetune, train_loader  # noqa: E402
from cdp_gfi.graph.scope import default_scope  # noqa: E402
from cdp_gfi.scores.importance import scores_from_statistics  # noqa: E402
from cdp_gfi.graph.sites import read_points  # noqa: E402
from cdp_gfi.statistics.store import Statistics  # noqa: E402
from cdp_gfi.statistics.collect import collect_statistics  # noqa: E402
from cdp_gfi.train.loop import evaluate, seed_everything  # noqa: E402
from cdp_gfi.masks.variants import DEFAULTS, PUBLISHED, Variant  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
DEFAULT_DATAROOT = SHARED / "cifar10-real-subset"
DEFAULT_NETS = {"resnet20": SHARED / "pretrained" / "resnet20-12fca82f.th",
                "resnet32": SHARED / "pretrained" / "resnet32-d509ac18.th"}
SIZE = (3, 32, 32)
DEVICE = torch.device("cpu")
BATCH = 128
STATS_BATCHES = 20
RECAL_BATCHES = 20


OURS: Dict[str, Tuple[str, Variant]] = {
    "cdp": ("cdp", DEFAULTS["cdp"]),
    "gfi-ap": ("gfi", DEFAULTS["gfi"]),
    "cdp-classwise": ("cdp", replace(DEFAULTS["cdp"], cdp_mode="classwise")),
    "cdp[published]": ("cdp", PUBLISHED["cdp"]),
    "cdp-sample[published]": ("cdp", replace(PUBLISHED["cdp"], cdp_mode="sample")),
    "gfi-ap[published]": ("gfi", PUBLISHED["gfi"]),
}
OTHERS = ("nni-l1", "nni-fpgm", "nni-taylor", "tp-global", "tp-layer", "random")
METHODS = (*OURS, *OTHERS)
MAIN = ("cdp", "gfi-ap", "cdp[published]", "gfi-ap[published]", "nni-l1", "tp-global", "random")


class Bench:
    """One network, one seed: the data, the dense net, its graph and scope, statistics per feature site."""

    def __init__(self, name: str, path: Path, splits, seed: int, epochs: int) -> None:
        self.name, self.splits, self.seed, self.epochs = name, splits, seed, epochs
        self.base = build_model(name, "cifar10").eval()
        load_pretrained(self.base, path, what=f"--nets {name}")
        self.graph: ModelGraph = trace(self.base, torch.zeros(1, *SIZE))
        self.scope = default_scope(self.graph)
        self.test = make_loader(splits[2], 256, shuffle=False)
        self.base_top1 = self.top1(self.base)
        self.dense_macs = count_flops(self.base, SIZE)[0]
        self._stats: Dict[str, Statistics] = {}

    def top1(self, model: nn.Module) -> float:
        return evaluate(model, self.test, DEVICE, disable_progress=True)["top1"]

    def statistics(self, site: str) -> Statistics:
        """Every kind of statistics at ``site``, gathered once per network and seed."""
        if site not in self._stats:
            loader = sample_loader(self.splits[1], BATCH, STATS_BATCHES, self.seed, 0)
            self._stats[site] = collect_statistics(
                self.base, loader, self.scope, ("cdp_class", "cdp_sample", "gfi"), num_classes=10,
                stop_batch=STATS_BATCHES, progress=False, read_at=read_points(self.graph, self.scope, site))
        return self._stats[site]

    def pruned(self, method: str, target: float) -> nn.Module:
        """The dense net pruned by ``method`` to remove ``target`` of its conv+linear MACs, slimmed."""
        if method in OURS:
            kind, variant = OURS[method]
            stats = self.statistics(variant.site)
            scores, tie = scores_from_statistics(stats, kind, variant.cdp_mode, None, self.scope)
            keep, _ = select(kind, scores, tie, flops_reduction=target, graph=self.graph,
                             normalization=variant.normalize, cost_power=variant.cost_power, rule=variant.rule,
                             max_layer_sparsity=variant.max_layer_sparsity)
            return competitors.slimmed(self.base, to_nni_masks(self.base, keep), SIZE)
        if method.startswith("tp-"):
            return competitors.tp_at_macs(self.base, self.scope, target, SIZE, method == "tp-global")[0]
        if method == "random":
            masks = competitors.random_masks(self.base, self.graph, self.scope, target, self.seed)
        else:
            factory = taylor_evaluator(self.splits[1], self.seed) if method == "nni-taylor" else None
            masks = competitors.nni_at_macs(method, self.base, self.scope, target, SIZE, factory)[0]
        return competitors.slimmed(self.base, masks, SIZE)

    def run(self, method: str, target: float) -> Dict[str, object]:
        """Prune, evaluate; re-estimate BN, evaluate (a); fine-tune, evaluate (b): one row."""
        seed_everything(self.seed)
        started = time.perf_counter()
        model = self.pruned(method, target)
        prune_s = time.perf_counter() - started
        right_after = self.top1(model)
        recal = make_loader(self.splits[1], BATCH, shuffle=True, seed=self.seed)
        recalibrate_batchnorm(model, recal, RECAL_BATCHES, DEVICE, progress=False)
        recalibrated = self.top1(model)
        finetuned = float("nan")
        if self.epochs:
            config = resolve(PruneConfig(dataset="cifar10", model=self.name, epochs=self.epochs, lr=0.01,
                                         batch_size=BATCH, workers=0, seed=self.seed, sparsity=0.5))
            with tempfile.TemporaryDirectory() as tmp:
                log = finetune(replace(config, save_dir=tmp), model, {},
                               (train_loader(config, self.splits[0]), self.test), DEVICE, Path(tmp))
            finetuned = log.attrs["final_top1"]
        macs = count_flops(model, SIZE)[0]
        return dict(net=self.name, method=method, target_pct=100 * target, seed=self.seed,
                    macs_removed_pct=100 * (1 - macs / self.dense_macs), baseline_top1=self.base_top1,
                    top1_pruned=right_after, top1_recalibrated=recalibrated, top1_finetuned=finetuned,
                    prune_s=prune_s, total_s=time.perf_counter() - started)


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


def summarize(rows: pd.DataFrame) -> pd.DataFrame:
    """Mean and std over seeds of both measures, per network, target and method (table order kept)."""
    grouped = rows.groupby(["net", "target_pct", "method"], sort=False)
    out = grouped.agg(macs_removed_pct=("macs_removed_pct", "mean"), top1_pruned=("top1_pruned", "mean"),
                      a_mean=("top1_recalibrated", "mean"), a_std=("top1_recalibrated", "std"),
                      b_mean=("top1_finetuned", "mean"), b_std=("top1_finetuned", "std"),
                      seeds=("seed", "count"), b_seeds=("top1_finetuned", "count"),
                      run_s=("total_s", "mean")).reset_index()
    return out.round(2)


def plot(summary: pd.DataFrame, path: Path) -> None:
    """Grouped bars: top-1 after BN re-estimation (a) and after fine-tuning (b), per network and target."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = list(summary.groupby(["net", "target_pct"], sort=False).groups)
    methods = list(dict.fromkeys(summary["method"]))
    fig, axes = plt.subplots(2, 1, figsize=(max(8, 1.6 * len(cases) * len(methods) / 4), 8), sharex=True)
    width = 0.8 / len(methods)
    colors = plt.get_cmap("tab20")(range(len(methods)))
    for ax, (col, title) in zip(axes, (("a", "(a) after pruning + BN re-estimation"),
                                       ("b", "(b) after fine-tuning (missing bars: not measured)"))):
        for j, method in enumerate(methods):
            part = summary[summary["method"] == method].set_index(["net", "target_pct"])
            xs = [i + j * width for i, case in enumerate(cases) if case in part.index]
            vals = [part.loc[case, f"{col}_mean"] for case in cases if case in part.index]
            errs = [part.loc[case, f"{col}_std"] for case in cases if case in part.index]
            ax.bar(xs, vals, width, yerr=[0 if pd.isna(e) else e for e in errs], label=method, capsize=2,
                   color=colors[j])
        measured = summary[f"{col}_mean"].dropna()
        if len(measured):
            ax.set_ylim(max(0.0, float(measured.min()) - 10), 100)
        ax.set_ylabel("top-1 %")
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
    axes[1].set_xticks([i + 0.4 - width / 2 for i in range(len(cases))])
    axes[1].set_xticklabels([f"{net}\n{pct:g}% MACs removed" for net, pct in cases])
    axes[0].legend(fontsize=7, ncol=4)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
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
    """A missing default says which flag to pass."""
    if not (dataroot / "cifar-10-batches-py").is_dir():
        raise FileNotFoundError(f"no cifar-10-batches-py/ under {str(dataroot)!r}: pass --dataroot (a CIFAR-10 "
                                "folder in torchvision's python layout)")
    for name, path in nets.items():
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint for {name} not found at {str(path)!r}: pass --nets {name}=PATH")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataroot", type=Path, default=DEFAULT_DATAROOT,
                   help="CIFAR-10 root holding cifar-10-batches-py/ (default: ../shared/data/cifar10-real-subset)")
    p.add_argument("--nets", help="name=checkpoint pairs, comma-separated (default: the two shared pretrained "
                                  "ResNets, resnet20 and resnet32)")
    p.add_argument("--targets", default="0.3,0.5", help="fractions of conv+linear MACs removed (default 0.3,0.5)")
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 (default 3)")
    p.add_argument("--epochs", type=int, default=3, help="fine-tuning epochs for (b); 0: measure (a) only")
    p.add_argument("--methods", default=",".join(METHODS), help=f"rows (default all): {', '.join(METHODS)}")
    p.add_argument("--quick", action="store_true", help="resnet20, 50%%, seed 0, the main rows")
    p.add_argument("--resume", action="store_true", help="keep rows already in <out>/bench_quality.csv")
    p.add_argument("--out", type=Path, default=Path("readme"), help="folder for CSVs and the plot (default readme)")
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    try:
        nets = parse_nets(args.nets)
        if args.quick:
            nets = {k: v for k, v in nets.items() if k == "resnet20"} or dict(list(nets.items())[:1])
        check_paths(args.dataroot, nets)
        methods = list(MAIN if args.quick else args.methods.split(","))
        unknown = [m for m in methods if m not in METHODS]
        if unknown:
            raise ValueError(f"unknown --methods {unknown}; choose from {', '.join(METHODS)}")
        targets = [0.5] if args.quick else [float(t) for t in args.targets.split(",")]
        seeds = range(1 if args.quick else args.seeds)
        splits = cifar_datasets(args.dataroot, check_integrity=False)
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    csv = args.out / "bench_quality.csv"
    rows = pd.read_csv(csv) if args.resume and csv.exists() else pd.DataFrame()
    key = ["net", "method", "target_pct", "seed"]
    finished = rows[rows["top1_finetuned"].notna()] if len(rows) and args.epochs else rows
    done = set(zip(*(finished[k] for k in key))) if len(finished) else set()  # (a)-only rows get (b) too
    started = time.perf_counter()
    todo: List[Tuple[str, int, float, str]] = [(n, s, t, m) for s in seeds for n in nets for t in targets
                                               for m in methods if (n, m, 100 * t, s) not in done]
    bench = None
    for net, seed, target, method in tqdm(todo, desc="bench_quality"):
        if bench is None or (bench.name, bench.seed) != (net, seed):
            bench = Bench(net, nets[net], splits, seed, args.epochs)
        row = bench.run(method, target)
        if len(rows):
            rows = rows[~(rows[key] == pd.Series({k: row[k] for k in key})).all(axis=1)]
        rows = pd.concat([rows, pd.DataFrame([row])], ignore_index=True)
        rows.to_csv(csv, index=False)
        tqdm.write(" ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
    summary = summarize(rows)
    summary.to_csv(args.out / "bench_quality_summary.csv", index=False)
    plot(summary, args.out / "bench_quality.png")
    print(summary.to_string(index=False))
    print(f"\n{len(todo)} runs in {(time.perf_counter() - started) / 60:.1f} min on {torch.get_num_threads()} "
          f"thread(s); baseline top-1 on these images: " +
          ", ".join(f"{n} {v:.2f}%" for n, v in rows.groupby("net")["baseline_top1"].first().items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())

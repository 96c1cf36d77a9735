"""Scope "all" (coupled residual-stream groups) vs "internal" on the digits demo, side by side.

CIFAR ResNet-56 on scikit-learn's digits, one cached baseline, 50% and 60% of
conv+linear MACs removed, CDP (class-wise) and GFI-AP, the same short
fine-tuning budget for every run; each run is a full ``prune_cifar`` pipeline
run. Prints the table and writes readme/bench_scope.csv.

    python bench/bench_scope.py                  # 2 targets x 2 methods x 2 scopes, 3 fine-tuning epochs
    python bench/bench_scope.py --epochs 1 --targets 0.5
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import pandas as pd


from cdp_gfi.runs.cifar_config import PruneConfig  # noqa: E402
from cdp_gfi.runs.cifar import run  # noqa: E402

OUT = Path(__file__).resolve().parents[1] / "readme" / "bench_scope.csv"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet56")
    parser.add_argument("--targets", default="0.5,0.6", help="fractions of MACs to remove")
    parser.add_argument("--epochs", type=int, default=3, help="fine-tuning epochs per run")
    parser.add_argument("--baseline_epochs", type=int, default=6)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for target in (float(t) for t in args.targets.split(",")):
            for method in ("cdp", "gfi"):
                for scope in ("internal", "all"):
                    started = time.perf_counter()
                    summary = run(PruneConfig(
                        dataset="digits", model=args.model, method=method, scope=scope, flops_reduction=target,
                        epochs=args.epochs, baseline_epochs=args.baseline_epochs,
                        save_dir=str(Path(tmp) / f"{method}_{scope}_{target}")))
                    rows.append(dict(target=target, method=method, scope=scope,
                                     baseline_top1=summary["baseline_top1"], pruned_top1=summary["pruned_top1"],
                                     macs_reduction_pct=summary["macs_reduction_pct"],
                                     params_reduction_pct=summary["params_reduction_pct"],
                                     seconds=round(time.perf_counter() - started, 1)))
                    print(rows[-1], flush=True)
    frame = pd.DataFrame(rows)
    OUT.parent.mkdir(exist_ok=True)
    frame.to_csv(OUT, index=False)
    print(frame.to_string(index=False))
    wide = frame.pivot_table(index=["target", "method"], columns="scope", values="pruned_top1")
    wide["all - internal"] = wide["all"] - wide["internal"]
    print(wide.round(2).to_string())


if __name__ == "__main__":
    main()

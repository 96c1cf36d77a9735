"""Physical speed: latency and throughput of dense vs slim networks, the latency ratio next to the MAC ratio.

Per model, three networks with the same random weights: dense, cdp_gfi's slim
network (block-internal filters removed by a global selection at the MACs
target; random scores, since only the shape matters for speed) and
Torch-Pruning's group-magnitude result at the same MACs. CPU at batch 1
(latency, ms) and batch 32 (throughput, images/s); the same on CUDA when a
GPU is present. Calls alternate between the three networks within each
repeat, medians reported.

    python bench/bench_speed.py [--target 0.5] [--repeats 20] [--models resnet56,resnet50]
"""
from __future__ import annotations

import argparse
import statistics as st
import sys
import time
from pathlib import Path
from typing import Dict, List

import pandas as pd
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import competitors  # noqa: E402
from cdp_gfi import build_model, count_flops, select, to_nni_masks  # noqa: E402
from cdp_gfi.graph.trace import trace  # noqa: E402
from cdp_gfi.graph.scope import default_scope  # noqa: E402

CASES = {"resnet56": ("cifar10", 32), "resnet50": ("imagenet", 224)}


def networks(name: str, target: float) -> Dict[str, nn.Module]:
    """Dense, cdp_gfi slim and Torch-Pruning networks of ``name`` at ``target`` MACs removed."""
    dataset, size = CASES[name]
    shape = (3, size, size)
    torch.manual_seed(0)
    dense = build_model(name, dataset).eval()
    graph = trace(dense, torch.zeros(1, 3, min(size, 64), min(size, 64)))
    scope = default_scope(graph)
    scores = {n: torch.rand(graph.modules[n].out_channels) for n in scope}
    keep, _ = select("cdp", scores, flops_reduction=target, graph=graph)
    ours = competitors.slimmed(dense, to_nni_masks(dense, keep), (3, min(size, 64), min(size, 64)))
    theirs = competitors.tp_at_macs(dense, scope, target, shape)[0]
    return {"dense": dense, "cdp_gfi slim": ours.eval(), "Torch-Pruning": theirs.eval()}


@torch.no_grad()
def timings(nets: Dict[str, nn.Module], x: torch.Tensor, repeats: int) -> Dict[str, float]:
    """Median seconds per forward of each network on ``x``, calls interleaved across networks."""
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    for net in nets.values():
        net(x)  # warm-up
    seconds: Dict[str, List[float]] = {label: [] for label in nets}
    for _ in range(repeats):
        for label, net in nets.items():
            sync()
            t = time.perf_counter()
            net(x)
            sync()
            seconds[label].append(time.perf_counter() - t)
    return {label: st.median(v) for label, v in seconds.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", type=float, default=0.5, help="fraction of MACs removed (default 0.5)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--models", default=",".join(CASES))
    args = parser.parse_args()
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    rows = []
    for name in args.models.split(","):
        size = CASES[name][1]
        nets = networks(name, args.target)
        macs = {label: count_flops(net, (3, size, size))[0] for label, net in nets.items()}
        for device in devices:
            moved = {label: net.to(device) for label, net in nets.items()}
            for batch in (1, 32):
                reps = args.repeats if batch == 1 or name != "resnet50" or device != "cpu" else max(3, args.repeats // 5)
                secs = timings(moved, torch.randn(batch, 3, size, size, device=device), reps)
                for label, s in secs.items():
                    rows.append(dict(model=name, device=device, batch=batch, network=label, macs_m=macs[label] / 1e6,
                                     mac_ratio=macs[label] / macs["dense"], latency_ms=1e3 * s,
                                     images_per_s=batch / s, latency_ratio=s / secs["dense"]))
            print(f"{name} on {device} done", flush=True)
    frame = pd.DataFrame(rows)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(frame.to_string(index=False, float_format=lambda v: f"{v:.3f}"))


if __name__ == "__main__":
    main()

"""Slimming ResNet-50 with half of its bottleneck conv1/conv2 filters masked: ours vs NNI's defaults.

Target: <= 5 s on 2 CPU cores, outputs equal to the masked network. NNI's defaults
(its dummy at 224x224 run at batch 8, given an fx trace since its own tracer fails) run
in the same process on a copy of the same model and masks.
"""
from __future__ import annotations

import contextlib
import copy
import io
import logging
import time

import pandas as pd
import torch
import torch.fx as fx

from cdp_gfi import apply_masks, build_model, slim, to_nni_masks
from cdp_gfi.graph.trace import trace
from cdp_gfi.masks.select import select, with_batchnorm_masks
from cdp_gfi.graph.scope import default_scope


def main() -> None:
    from nni.compression.speedup import ModelSpeedup

    torch.manual_seed(0)
    base = build_model("resnet50", "imagenet").eval()
    x = torch.randn(2, 3, 224, 224)
    graph = trace(base, x[:1])
    scores = {n: torch.rand(graph.modules[n].out_channels) for n in default_scope(graph)}
    keep, _ = select("cdp", scores, sparsity=0.5)
    masks = to_nni_masks(base, keep)
    with torch.no_grad():
        reference = apply_masks(copy.deepcopy(base), masks, graph)(x)

    rows = []
    ours = copy.deepcopy(base)
    t = time.perf_counter()
    slim(ours, masks, torch.zeros(1, 3, 64, 64))
    rows.append(("cdp_gfi.slim (dummy 64x64, batch 8)", time.perf_counter() - t, ours))

    theirs = copy.deepcopy(base)
    gm = fx.symbolic_trace(theirs)
    gm.eval()
    logging.disable(logging.WARNING)
    t = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        ModelSpeedup(theirs, torch.zeros(1, 3, 224, 224), with_batchnorm_masks(graph, masks),
                     graph_module=gm).speedup_model()
    rows.append(("NNI ModelSpeedup defaults (224x224, batch 8)", time.perf_counter() - t, theirs))
    logging.disable(logging.NOTSET)
    theirs.eval()  # its replacement modules come back in train mode

    table = []
    for label, seconds, model in rows:
        with torch.no_grad():
            diff = (model(x) - reference).abs().max().item()
        table.append(dict(run=label, seconds=round(seconds, 2), max_abs_diff=f"{diff:.1e}"))
    frame = pd.DataFrame(table)
    print(frame.to_string(index=False))
    print(f"speed-up: {rows[1][1] / rows[0][1]:.1f}x")


if __name__ == "__main__":
    main()

"""BatchNorm re-estimation after pruning: new running statistics from a few batches, no training.

Removing filters changes what every later BatchNorm sees, so the running
means and variances the dense network learned no longer fit; re-estimating
them (no gradient, no weight change) recovers much of the accuracy lost in
one-shot pruning. Only BatchNorm buffers change.
"""
from __future__ import annotations

from typing import Iterable, Optional

import torch
from torch import nn
from tqdm.auto import tqdm

_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


DEFAULT_BATCHES = 20


def check_batches(batches: Optional[int], available: Optional[int], flag: str = "--bn_recalibrate") -> int:
    """``batches`` if it is an int in [0, available] (``available``: batches the loader can give), else raise.

    None means the default: 20 batches, or all of a smaller training set.
    """
    if batches is None:
        return DEFAULT_BATCHES if available is None else min(DEFAULT_BATCHES, available)
    if isinstance(batches, bool) or not isinstance(batches, int) or batches < 0:
        raise ValueError(f"{flag} must be an integer >= 0 (0 turns re-estimation off), got {batches!r}")
    if available is not None and batches > available:
        raise ValueError(f"{flag} {batches} asks for more batches than the training set gives ({available} "
                         f"at this batch size); use at most {available}")
    return batches


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, loader: Iterable, batches: int,
                          device: Optional[torch.device] = None, progress: bool = True) -> nn.Module:
    """Replace every BatchNorm's running mean/var by their exact averages over ``batches`` batches of ``loader``.

    The rest of the model runs in eval mode (dropout off); BN layers use batch
    statistics while accumulating. Returns ``model``, in eval mode.
    """
    check_batches(batches, None, "batches")
    bns = [m for m in model.modules() if isinstance(m, _BN) and m.track_running_stats]
    if batches == 0 or not bns:
        return model.eval()
    device = device or next(model.parameters()).device
    momenta = [m.momentum for m in bns]
    model.eval()
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches seen
        m.train()
    seen = 0
    try:
        for batch in tqdm(loader, total=batches, desc="BN re-estimation", leave=False, disable=not progress):
            if seen >= batches:
                break
            x = batch[0] if isinstance(batch, (list, tuple)) else batch
            model(x.to(device, non_blocking=True))
            seen += 1
    finally:
        for m, momentum in zip(bns, momenta):
            m.momentum = momentum
        model.eval()
    if seen < batches:
        raise ValueError(f"BatchNorm re-estimation wanted {batches} batches, the loader gave {seen}")
    return model

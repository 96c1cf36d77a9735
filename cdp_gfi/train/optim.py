"""Optimiser and learning-rate schedule of every training run (SGD; cosine or step)."""
from __future__ import annotations

from typing import Any

from torch import nn
from torch.optim import SGD, Optimizer
from torch.optim.lr_scheduler import CosineAnnealingLR, LambdaLR, LRScheduler, SequentialLR, StepLR


def build_optimizer(
    model: nn.Module,
    lr: float,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    nesterov: bool = True,
    no_wd_on_bn: bool = False,
) -> SGD:
    """SGD over the trainable parameters.

    `no_wd_on_bn` exempts 1-D tensors (BatchNorm affine parameters, biases) from weight decay.
    """
    if lr <= 0:
        raise ValueError(f"learning rate must be positive, got {lr}")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"{type(model).__name__} has no trainable parameters")
    groups: list[dict[str, Any]] = [{"params": params}]
    if no_wd_on_bn:
        groups = [
            group
            for group in (
                {"params": [p for p in params if p.ndim > 1]},
                {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0},
            )
            if group["params"]
        ]
    return SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov)


def build_scheduler(
    optimizer: Optimizer,
    kind: str,
    epochs: int,
    steps_per_epoch: int,
    warmup_epochs: float = 0.0,
    warmup_start_lr: float | None = None,
    step_size: int = 8,
    gamma: float = 1 / 1.8,
) -> LRScheduler:
    """LR schedule to be stepped after EVERY iteration: optional linear warmup from `warmup_start_lr`
    (default lr/10) to lr, then "cosine" annealing to 0, or GFI-AP's "step" decay (x`gamma` every `step_size` epochs).

    The decay runs over the iterations after the warmup; with several param groups,
    every group warms up by the first group's ratio warmup_start_lr / lr.
    """
    if kind not in ("cosine", "step"):
        raise ValueError(f"unknown LR schedule {kind!r}: expected 'cosine' or 'step'")
    if epochs < 1 or steps_per_epoch < 1:
        raise ValueError(f"epochs and steps_per_epoch must be >= 1, got {epochs} and {steps_per_epoch}")
    if not 0 <= warmup_epochs < epochs:
        raise ValueError(f"warmup_epochs must be in [0, epochs={epochs}), got {warmup_epochs}")
    if kind == "step" and (step_size < 1 or gamma <= 0):
        raise ValueError(f"step schedule needs step_size >= 1 and gamma > 0, got {step_size} and {gamma}")
    warmup_iters = round(warmup_epochs * steps_per_epoch)
    base_lr = optimizer.param_groups[0]["lr"]
    start_factor = 0.1 if warmup_start_lr is None else warmup_start_lr / base_lr
    if start_factor < 0:
        raise ValueError(f"warmup_start_lr must be >= 0, got {warmup_start_lr}")
    if warmup_iters == 0:
        return _decay(optimizer, kind, epochs * steps_per_epoch, steps_per_epoch, step_size, gamma)
    warmup = LambdaLR(optimizer, lambda it: start_factor + (1 - start_factor) * it / warmup_iters)
    decay = _decay(optimizer, kind, epochs * steps_per_epoch - warmup_iters, steps_per_epoch, step_size, gamma)
    return SequentialLR(optimizer, [warmup, decay], milestones=[warmup_iters])


def _decay(
    optimizer: Optimizer, kind: str, iters: int, steps_per_epoch: int, step_size: int, gamma: float
) -> LRScheduler:
    if kind == "cosine":
        return CosineAnnealingLR(optimizer, T_max=iters, eta_min=0.0)
    return StepLR(optimizer, step_size=step_size * steps_per_epoch, gamma=gamma)

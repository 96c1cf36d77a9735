"""The training loop of every run: evaluation, one epoch, and a resumable `fit` that logs every epoch
and checkpoints crash-safely."""
from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler
from tqdm import tqdm

from ..distributed import all_reduce_sum_, is_main_process
from ..files.checkpoint import (
    CheckpointError,
    PathLike,
    atomic_open,
    ensure_writable_dir,
    load_checkpoint,
    load_state_dict_strict,
    save_atomic,
    unwrap_model,
)
from .distill import Distillation

logger = logging.getLogger(__name__)

LOG_COLUMNS = ["epoch", "lr", "train_loss", "train_top1", "test_loss", "test_top1", "test_top5", "seconds"]
_TRAINING_STATE_KEYS = (
    "state_dict", "optimizer", "scheduler", "scaler", "epoch", "epochs", "best_top1", "best_epoch", "log", "rng",
)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (every device) so that CPU runs repeat exactly."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _rng_state(loader_generator: torch.Generator | None = None) -> dict[str, Any]:
    # Tensors and plain containers only, so checkpoints load with weights_only=True.
    name, keys, pos, has_gauss, cached = np.random.get_state()
    numpy_state = {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                   "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if loader_generator is not None:  # a DataLoader's own generator drives its shuffling and worker seeds
        state["loader"] = loader_generator.get_state()
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any], loader_generator: torch.Generator | None = None) -> None:
    if loader_generator is not None and "loader" in state:
        loader_generator.set_state(state["loader"])
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def _batch_to(batch: Any, device: torch.device) -> tuple[Tensor, Tensor]:
    """Move an (inputs, targets) batch to `device`; 4-D inputs go channels_last on CUDA."""
    if not isinstance(batch, Sequence) or len(batch) != 2:
        raise TypeError(f"a data loader batch must be an (inputs, targets) pair, got {type(batch).__name__}")
    images, targets = batch
    non_blocking = device.type == "cuda"
    images = images.to(device, non_blocking=non_blocking)
    if device.type == "cuda" and images.dim() == 4:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, targets.to(device, non_blocking=non_blocking)


def _autocast(device: torch.device, amp: bool) -> torch.autocast:
    return torch.autocast(device_type=device.type, enabled=amp and device.type == "cuda")


def _topk_correct(logits: Tensor, targets: Tensor, ks: Iterable[int]) -> list[Tensor]:
    ks = list(ks)
    hits = logits.topk(max(ks), dim=1).indices.eq(targets[:, None])
    return [hits[:, :k].any(dim=1).sum() for k in ks]


@torch.no_grad()
def evaluate(
    model: nn.Module, loader: Iterable, device: torch.device | str, amp: bool = False, disable_progress: bool = False
) -> dict[str, float]:
    """Mean cross-entropy `loss`, `top1` and (with >= 5 classes) `top5` accuracy in percent over `loader`.

    Leaves the model in eval mode; under DDP the sums are combined across ranks.
    """
    device = torch.device(device)
    model = unwrap_model(model)  # no DDP collectives in a forward-only pass
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # loss sum, top-1 hits, top-5 hits, samples
    num_classes = 0
    for batch in tqdm(loader, desc="eval", leave=False, disable=disable_progress or not is_main_process()):
        images, targets = _batch_to(batch, device)
        with _autocast(device, amp):
            logits = model(images)
        logits = logits.float()
        num_classes = logits.shape[1]
        top1, top5 = _topk_correct(logits, targets, (1, min(5, num_classes)))
        totals[0] += F.cross_entropy(logits, targets, reduction="sum")
        totals[1] += top1
        totals[2] += top5
        totals[3] += targets.numel()
    loss_sum, top1_hits, top5_hits, count = all_reduce_sum_(totals).tolist()
    if count == 0:
        raise ValueError("evaluation loader yielded no samples")
    result = {"loss": loss_sum / count, "top1": 100.0 * top1_hits / count}
    if num_classes >= 5:
        result["top5"] = 100.0 * top5_hits / count
    return result


def train_one_epoch(
    model: nn.Module,
    loader: Iterable,
    optimizer: Optimizer,
    scheduler: LRScheduler,
    device: torch.device | str,
    *,
    criterion: Callable[[Tensor, Tensor], Tensor],
    scaler: torch.amp.GradScaler | None = None,
    amp: bool = False,
    after_step: Callable[[nn.Module], None] | None = None,
    epoch: int = 0,
    log_interval: int = 20,
    disable_progress: bool = False,
    distill: Distillation | None = None,
) -> dict[str, float]:
    """Train one pass over `loader`, stepping `scheduler` every iteration (with `distill`, against its teacher too).

    `after_step(model)` gets the unwrapped model after each optimiser step (e.g. to re-zero pruned weights).
    AMP and channels_last apply only on CUDA. Returns mean `loss`, `top1` (percent) and the epoch's starting `lr`.
    """
    device = torch.device(device)
    model.train()
    start_lr = optimizer.param_groups[0]["lr"]
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, top-1 hits, samples
    bar = tqdm(loader, desc=f"epoch {epoch + 1}", leave=False, disable=disable_progress or not is_main_process())
    for step, batch in enumerate(bar, start=1):
        images, targets = _batch_to(batch, device)
        with _autocast(device, amp):
            logits = model(images)
            loss = criterion(logits, targets) if distill is None else distill.loss(logits, targets, images, criterion)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        if after_step is not None:
            after_step(unwrap_model(model))
        scheduler.step()
        totals[0] += loss.detach().double() * targets.numel()
        totals[1] += (logits.detach().argmax(dim=1) == targets).sum()
        totals[2] += targets.numel()
        if step % log_interval == 0:
            loss_sum, hits, count = totals.tolist()
            _check_finite(loss_sum / count, epoch, step)
            lr = optimizer.param_groups[0]["lr"]
            bar.set_postfix(loss=f"{loss_sum / count:.4f}", top1=f"{100 * hits / count:.2f}", lr=f"{lr:.2e}")
    loss_sum, hits, count = all_reduce_sum_(totals).tolist()
    if count == 0:
        raise ValueError("training loader yielded no batches")
    _check_finite(loss_sum / count, epoch, "end")
    return {"loss": loss_sum / count, "top1": 100.0 * hits / count, "lr": start_lr}


def _check_finite(loss: float, epoch: int, step: int | str) -> None:
    if not math.isfinite(loss):
        raise FloatingPointError(
            f"training loss is {loss} in epoch {epoch + 1} (step {step}); try a lower learning rate"
        )


def set_sampler_epoch(sampler: Any, epoch: int) -> None:
    """Tell a DistributedSampler (or anything with `set_epoch`) the epoch, so each epoch shuffles differently."""
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)


def _log_frame(rows: list[dict[str, float]], best_top1: float, best_epoch: int) -> pd.DataFrame:
    frame = pd.DataFrame(rows, columns=LOG_COLUMNS)
    frame.attrs.update(final_top1=rows[-1]["test_top1"], best_top1=best_top1, best_epoch=best_epoch)
    return frame


def _extra_checkpoint_entries(make_checkpoint: Callable[[], dict[str, Any]] | None) -> dict[str, Any]:
    extra = make_checkpoint() if make_checkpoint is not None else {}
    if not isinstance(extra, dict):
        raise TypeError(f"make_checkpoint() must return a dict, got {type(extra).__name__}")
    if clash := sorted(extra.keys() & set(_TRAINING_STATE_KEYS)):
        raise ValueError(f"make_checkpoint() returned reserved keys {clash}")
    return extra


def _restore(
    path: Path,
    epochs: int,
    model: nn.Module,
    optimizer: Optimizer,
    scheduler: LRScheduler,
    scaler: torch.amp.GradScaler | None,
    train_loader: Iterable,
) -> dict[str, Any]:
    """Load every training state saved by `fit` from `path` into the given objects; returns the checkpoint."""
    ckpt = load_checkpoint(path)
    missing = [key for key in _TRAINING_STATE_KEYS if not isinstance(ckpt, dict) or key not in ckpt]
    if missing:
        raise CheckpointError(f"{str(path)!r} is not a resumable fit() checkpoint: missing {', '.join(missing)}")
    if ckpt["epochs"] != epochs:
        raise ValueError(
            f"{str(path)!r} belongs to a {ckpt['epochs']}-epoch run but epochs={epochs}: the LR schedule would differ; "
            "resume with the same epochs or use a new run directory"
        )
    load_state_dict_strict(model, ckpt, what=f"resume checkpoint {str(path)!r}")
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    if scaler is not None and ckpt["scaler"]:
        scaler.load_state_dict(ckpt["scaler"])
    _set_rng_state(ckpt["rng"], getattr(train_loader, "generator", None))
    return ckpt


def fit(
    model: nn.Module,
    train_loader: Iterable,
    test_loader: Iterable,
    *,
    epochs: int,
    optimizer: Optimizer,
    scheduler: LRScheduler,
    device: torch.device | str,
    run_dir: PathLike,
    make_checkpoint: Callable[[], dict[str, Any]] | None = None,
    resume: bool = False,
    label_smoothing: float = 0.0,
    amp: bool = False,
    after_step: Callable[[nn.Module], None] | None = None,
    on_epoch_end: Callable[[int, dict[str, float]], None] | None = None,
    is_main: bool = True,
    train_sampler: Any = None,
    checkpoint_names: tuple[str, str] = ("last.pth", "best.pth"),
    log_interval: int = 20,
    distill: Distillation | None = None,
) -> pd.DataFrame:
    """Train and test for `epochs`, writing run_dir/log.csv, run_dir/last.pth and (on a new best) run_dir/best.pth
    after every epoch; `resume=True` continues from last.pth and ends exactly as an uninterrupted run.
    `checkpoint_names` renames (last.pth, best.pth), e.g. to the ImageNet scripts' checkpoint.pth.tar/model_best.pth.tar.

    Returns the per-epoch log (epochs numbered from 1). The result is the LAST epoch's test accuracy,
    `attrs["final_top1"]`; `attrs["best_top1"]`/`attrs["best_epoch"]` are reported alongside, never substituted.
    `make_checkpoint()` adds entries (slim model, masks, args) to each checkpoint; `on_epoch_end(epoch, row)` runs
    on every rank after the epoch's files are written. `distill` fine-tunes against a teacher (see `train.distill`).
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    device = torch.device(device)
    run_dir = Path(run_dir)
    if is_main:
        ensure_writable_dir(run_dir)
    last_path, best_path, log_path = run_dir / checkpoint_names[0], run_dir / checkpoint_names[1], run_dir / "log.csv"
    use_amp = amp and device.type == "cuda"
    if amp and not use_amp and is_main:
        logger.warning("AMP needs CUDA; training on %s in float32", device)
    scaler = torch.amp.GradScaler("cuda") if use_amp else None
    criterion = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
    sampler = train_sampler if train_sampler is not None else getattr(train_loader, "sampler", None)

    rows: list[dict[str, float]] = []
    start_epoch, best_top1, best_epoch = 0, -math.inf, 0
    if resume and last_path.exists():
        ckpt = _restore(last_path, epochs, model, optimizer, scheduler, scaler, train_loader)
        rows, start_epoch, best_top1, best_epoch = ckpt["log"], ckpt["epoch"], ckpt["best_top1"], ckpt["best_epoch"]
        if is_main:
            logger.info("resuming %s after epoch %d/%d", last_path, start_epoch, epochs)
    elif last_path.exists() and is_main:
        logger.warning("%s exists and will be overwritten (pass resume=True to continue that run)", last_path)

    try:
        for epoch in range(start_epoch, epochs):
            set_sampler_epoch(sampler, epoch)
            started = time.perf_counter()
            train = train_one_epoch(
                model, train_loader, optimizer, scheduler, device, criterion=criterion, scaler=scaler,
                amp=use_amp, after_step=after_step, epoch=epoch, log_interval=log_interval, disable_progress=not is_main,
                distill=distill,
            )
            test = evaluate(model, test_loader, device, amp=use_amp, disable_progress=not is_main)
            row = {
                "epoch": epoch + 1, "lr": train["lr"], "train_loss": train["loss"], "train_top1": train["top1"],
                "test_loss": test["loss"], "test_top1": test["top1"], "test_top5": test.get("top5", math.nan),
                "seconds": time.perf_counter() - started,
            }
            rows.append(row)
            is_best = row["test_top1"] > best_top1
            if is_best:
                best_top1, best_epoch = row["test_top1"], epoch + 1
            if is_main:
                logger.info("epoch %d/%d: %s", epoch + 1, epochs, ", ".join(f"{k}={v:.4g}" for k, v in row.items()))
                with atomic_open(log_path, "w") as handle:
                    _log_frame(rows, best_top1, best_epoch).to_csv(handle, index=False)
                ckpt = {
                    "state_dict": unwrap_model(model).state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict() if scaler is not None else None,
                    "epoch": epoch + 1, "epochs": epochs, "best_top1": best_top1, "best_epoch": best_epoch,
                    "log": rows, "rng": _rng_state(getattr(train_loader, "generator", None)),
                    **_extra_checkpoint_entries(make_checkpoint),
                }
                if is_best:  # before last.pth: a crash in between only repeats this epoch on resume
                    save_atomic(ckpt, best_path)
                save_atomic(ckpt, last_path)
            if on_epoch_end is not None:
                on_epoch_end(epoch + 1, row)
    except KeyboardInterrupt:
        if is_main and last_path.exists():
            logger.warning("interrupted; %s holds the last complete epoch (continue with resume=True)", last_path)
        raise
    return _log_frame(rows, best_top1, best_epoch)

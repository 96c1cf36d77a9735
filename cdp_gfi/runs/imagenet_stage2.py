"""Stage 2 of the ImageNet pipeline: fine-tune a pruned network, single-process or under torchrun (DDP).

Three checkpoint kinds travel between the stages (written atomically with `save_atomic`; tensors and plain
containers only, read with weights_only=True; masks are stored compact: kept filter indices per conv, see
`mask_files`):

- ``masks`` (stage 1, `save_masks_checkpoint`): {"kind": "masks", "model": model name, "num_classes": int,
  "masks": compact masks, "state_dict": dense (pretrained) weights, "args": dict}. Stage 2 rebuilds the dense
  model, loads the weights strictly, zeroes the pruned filters (and their BatchNorm channels), keeps them at
  zero through training and slims at the end (``--make-mask``).
- ``slim`` (stage 1's slimmed model, or stage 2's ``slim_final.pth``; `slim_files.save_slim_checkpoint`):
  {"kind": "slim", "model_name", "dataset", "num_classes", "masks" (the compact masks it was slimmed with),
  "state_dict": its weights, "args"}; rebuilt by `slim_files.load_slim`. Stage 2 fine-tunes it as is.
- ``retrain`` (this stage's ``checkpoint.pth.tar`` / ``model_best.pth.tar``): `fit`'s training state (state_dict,
  optimizer, scheduler, scaler, epoch, epochs, best_top1, best_epoch, log, rng) plus {"kind": "retrain",
  "model_name", "dataset", "num_classes", "route": "masked" | "slim" | "dense", "masks" (compact; None on the
  dense route), "args"}. ``--resume`` of it continues the run.

Training ends like a CIFAR run: ``summary.json``/``summary.csv`` and one printed line with the final slim
network's top-1, MACs and parameters."""
from __future__ import annotations

import argparse
import copy
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset

from ..data.datasets import imagenet_datasets
from ..data.samplers import EpochTaggedSampler, SeededAugmentation, ShardSampler, make_loader
from ..distributed import (DistInfo, barrier, from_main_rank, init_distributed, launched_rank, on_every_rank,
                           parse_device)
from ..files.checkpoint import (
    CheckpointError,
    PathLike,
    ensure_writable_dir,
    load_checkpoint,
    load_state_dict_strict,
    save_atomic,
    unwrap_model,
)
from ..files.mask_files import MaskFileError, compact_masks, expand_masks
from ..flops import count_flops
from ..graph.trace import trace
from ..masks.masked import MaskEnforcer, Masks
from ..masks.select import apply_masks
from ..models import build_model
from ..slimming.slim_files import SLIM_DUMMY_SIZE, rebuild_slim, save_slim_checkpoint
from ..slimming.speedup import slim
from ..files.pretrained import load_pretrained
from ..train.distill import Distillation, check_distillation
from ..train.loop import evaluate, fit, seed_everything
from ..train.optim import build_optimizer, build_scheduler
from .cli import USER_ERRORS, OneLineParser, add_distributed_argument, add_recovery_arguments, exit_status, \
    imagenet_model
from .folders import claim
from .report import result_line, write_summary

logger = logging.getLogger(__name__)

KINDS = ("masks", "slim", "retrain")
_REQUIRED = {
    "masks": ("model", "num_classes", "masks", "state_dict"),
    "slim": ("model_name", "dataset", "num_classes", "masks", "state_dict"),
    "retrain": ("model_name", "num_classes", "route", "masks", "state_dict", "epoch"),
}
CHECKPOINT_NAME, BEST_NAME, SLIM_FINAL_NAME = "checkpoint.pth.tar", "model_best.pth.tar", "slim_final.pth"
DEFAULT_RESULTS_DIR = "results"
# A results folder holding any of these holds a run: a fresh run refuses it or takes the next free name
RESULTS_FILES = (CHECKPOINT_NAME, BEST_NAME, SLIM_FINAL_NAME, "summary.json", "summary.csv", "log.csv")
_LIST_LIMIT = 8


class UsageError(ValueError):
    """Bad command-line input, reported as one `error:` line with exit status 2."""


def save_masks_checkpoint(path: PathLike, model_name: str, num_classes: int, masks: Masks,
                          state_dict: Dict[str, torch.Tensor], args: Optional[Dict[str, Any]] = None) -> None:
    """Write stage 1's masks checkpoint: the dense weights plus the (compact) masks to apply to them."""
    save_atomic({"kind": "masks", "model": model_name, "num_classes": int(num_classes),
                 "masks": compact_masks(masks), "state_dict": {k: v.detach().cpu() for k, v in state_dict.items()},
                 "args": dict(args or {})}, path)


def load_pruned_checkpoint(path: PathLike) -> Tuple[str, Dict[str, Any]]:
    """Load a stage-1 or stage-2 checkpoint and return (kind, contents); kind is "masks", "slim" or "retrain"."""
    ckpt = load_checkpoint(path)
    kind = ckpt.get("kind") if isinstance(ckpt, dict) else None
    if kind not in KINDS:
        found = f"keys {sorted(map(str, ckpt))[:_LIST_LIMIT]}" if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(f"{str(path)!r} is not a cdp_gfi masks, slim or retrain checkpoint (found {found})")
    missing = [key for key in _REQUIRED[kind] if key not in ckpt]
    if missing:
        raise CheckpointError(f"{str(path)!r} is a {kind} checkpoint without {', '.join(missing)} (damaged?)")
    return kind, ckpt


@dataclass
class Prepared:
    """The network to train and how it came about."""

    model: nn.Module
    model_name: str
    route: str  # "masked": dense + masks, slimmed at the end; "slim": trained as is; "dense": from scratch
    masks: Optional[Masks]  # what the network was (masked route) or is being (slim route) pruned with
    retrain: Optional[Dict[str, Any]]  # a retrain checkpoint to continue


def _check_classes(ckpt_classes: int, num_classes: int, path: PathLike, dataroot: PathLike) -> None:
    if ckpt_classes != num_classes:
        raise UsageError(f"{str(path)!r} is for {ckpt_classes} classes but {str(dataroot)!r} has {num_classes} "
                         "class folders")


def _masked_model(name: str, num_classes: int, compact: Dict[str, Any], state_dict: Any, path: PathLike,
                  ckpt_name: str) -> Tuple[nn.Module, Masks]:
    """The dense `name` with `state_dict` loaded strictly, and the stored masks rebuilt on it (refused if unfit)."""
    model = build_model(name, "imagenet", num_classes)
    load_state_dict_strict(model, state_dict, what=f"{str(path)!r} (weights of a {ckpt_name})")
    try:
        masks = expand_masks(model, compact, source=f"the masks in {str(path)!r}")
    except MaskFileError as err:
        raise UsageError(f"{err} ({name})") from None
    return model, masks


def _check_name(wanted: Optional[str], found: str, what: str) -> None:
    if wanted is not None and wanted != found:
        raise UsageError(f"{what} holds a {found}, not --model {wanted}")


def prepare_model(args: argparse.Namespace, num_classes: int) -> Prepared:
    """Build the network that `--resume`/`--make-mask`/`--model` describe, refusing any mismatch."""
    if args.resume is None:
        if args.make_mask:
            raise UsageError("--make-mask needs --resume with a masks checkpoint from stage 1")
        if args.model is None:
            raise UsageError("give --model (to train from scratch) or --resume (a stage-1 or stage-2 checkpoint)")
        return Prepared(build_model(args.model, "imagenet", num_classes), args.model, "dense", None, None)
    path = args.resume
    kind, ckpt = load_pruned_checkpoint(path)
    if kind == "masks":
        if not args.make_mask:
            raise UsageError(f"{str(path)!r} is a masks checkpoint (a dense {ckpt['model']} plus pruning masks): "
                             "add --make-mask to train the masked network and slim it at the end")
        _check_classes(ckpt["num_classes"], num_classes, path, args.dataroot)
        name = args.model or ckpt["model"]
        model, masks = _masked_model(name, num_classes, ckpt["masks"], ckpt["state_dict"], path, ckpt["model"])
        return Prepared(model, name, "masked", masks, None)
    route = "slim" if kind == "slim" else ckpt["route"]
    if args.make_mask and route != "masked":
        what = "an already slimmed" if route == "slim" else "a dense"
        raise UsageError(f"--make-mask: {str(path)!r} is a {kind} checkpoint of {what} {ckpt['model_name']}, not a "
                         "masks checkpoint; drop --make-mask to fine-tune it as is")
    _check_classes(ckpt["num_classes"], num_classes, path, args.dataroot)
    _check_name(args.model, ckpt["model_name"], f"{str(path)!r}")
    name, masks = ckpt["model_name"], None
    if route == "masked":
        model, masks = _masked_model(name, num_classes, ckpt["masks"], ckpt["state_dict"], path, name)
    elif route == "slim":
        model, masks = rebuild_slim({"dataset": "imagenet", **ckpt}, what=repr(str(path)))
    else:
        model = build_model(name, "imagenet", num_classes)
        load_state_dict_strict(model, ckpt["state_dict"], what=f"{str(path)!r}")
    return Prepared(model, name, route, masks, ckpt if kind == "retrain" else None)


def resolve_device(args: Any) -> DistInfo:
    """Join torchrun's process group (if launched by it) and pick this process's device from --device/--gpus."""
    info = init_distributed(args.device, args.dist_timeout)
    if args.gpus is None:
        return info

    def single_gpu() -> DistInfo:
        if info.distributed:
            raise UsageError("--gpus: under torchrun each process uses cuda:LOCAL_RANK; choose GPUs with "
                             "CUDA_VISIBLE_DEVICES")
        return DistInfo(rank=0, world_size=1, local_rank=0, device=parse_device(args.device, args.gpus),
                        is_main=True)

    return on_every_rank(single_gpu, USER_ERRORS)


def _to_device(model: nn.Module, device: torch.device) -> nn.Module:
    model = model.to(device)
    return model.to(memory_format=torch.channels_last) if device.type == "cuda" else model


def _slim_final(model: nn.Module, prepared: Prepared, num_classes: int, args: argparse.Namespace) -> nn.Module:
    """Slim a copy of the trained masked network and write it as `slim_final.pth`; returns the slim copy."""
    net = copy.deepcopy(unwrap_model(model)).cpu().to(memory_format=torch.contiguous_format).eval()
    slim(net, prepared.masks, torch.randn(1, 3, SLIM_DUMMY_SIZE, SLIM_DUMMY_SIZE))
    path = Path(args.results_dir) / SLIM_FINAL_NAME
    save_slim_checkpoint(path, prepared.model_name, net, prepared.masks, num_classes, vars(args))
    logger.info("wrote %s", path)
    return net


def _final_summary(net: nn.Module, log: Any, prepared: Prepared, args: argparse.Namespace, num_classes: int
                   ) -> Dict[str, Any]:
    """Write `summary.json`/`.csv` (top-1, MACs and parameters of the final slim network, and of the dense network
    it came from) and print one result line."""
    net = copy.deepcopy(unwrap_model(net)).cpu().to(memory_format=torch.contiguous_format).eval()
    size = (3, args.input_size, args.input_size)
    macs, params = count_flops(net, size)
    dense_macs, dense_params = count_flops(build_model(prepared.model_name, "imagenet", num_classes), size)
    summary = {"model": prepared.model_name, "route": prepared.route, "epochs": int(log.iloc[-1]["epoch"]),
               "final_top1": float(log.attrs["final_top1"]), "best_top1": float(log.attrs["best_top1"]),
               "best_epoch": int(log.attrs["best_epoch"]), "macs": int(macs), "params": int(params),
               "dense_macs": int(dense_macs), "dense_params": int(dense_params), "input_size": args.input_size}
    write_summary(summary, args.results_dir)
    row = {"pruned_top1": summary["final_top1"], "macs_before": dense_macs, "macs_after": macs,
           "params_before": dense_params, "params_after": params}
    print(result_line(args.results_dir, [row], f"result of the final slim {prepared.model_name} "
                      f"(best top-1 {summary['best_top1']:.2f}% at epoch {summary['best_epoch']}; "
                      f"{args.input_size}x{args.input_size}, conv+linear)"), flush=True)
    return summary


def claim_results_dir(args: argparse.Namespace, info: DistInfo) -> str:
    """The folder rank 0 chose for this run's files (``runs.folders.claim``): ``--results_dir``, refused when it
    holds another run unless ``--resume`` continues the checkpoint in it, or the default ./results (or the next free
    name after it)."""
    directory = Path(args.results_dir or DEFAULT_RESULTS_DIR)

    def choose() -> Optional[str]:
        if not info.is_main:
            return None
        resumed = Path(args.resume) if args.resume is not None else None
        if resumed is not None and resumed.name in (CHECKPOINT_NAME, BEST_NAME) and \
                resumed.resolve().parent == directory.resolve():
            return str(directory)  # continuing the run that lives there
        return str(claim(directory, RESULTS_FILES, default=args.results_dir is None, flag="--results_dir",
                         to_continue=f"continue it with --resume {directory / CHECKPOINT_NAME}"))

    return from_main_rank(on_every_rank(choose, USER_ERRORS))


def _adopt_retrain_checkpoint(prepared: Prepared, results_dir: Path, args: argparse.Namespace,
                              info: DistInfo) -> None:
    """Put the checkpoint being continued where `fit` resumes from: results_dir/checkpoint.pth.tar."""
    target = results_dir / CHECKPOINT_NAME
    if Path(args.resume).resolve() != target.resolve() and info.is_main:
        logger.warning("continuing %s in %s", args.resume, results_dir)
        save_atomic(prepared.retrain, target)
    barrier()


def _warn_start_epoch(args: argparse.Namespace, prepared: Prepared) -> None:
    resumed = prepared.retrain["epoch"] if prepared.retrain is not None else 0
    if args.start_epoch != resumed:
        logger.warning("--start-epoch %d ignored: training continues after epoch %d (the resumed state)",
                       args.start_epoch, resumed)


def teacher_model(args: argparse.Namespace, name: str, num_classes: int) -> Optional[nn.Module]:
    """``--distill``'s dense teacher: ``--distill_teacher``'s weights, else those of a stage-1 masks checkpoint."""
    if not args.distill:
        if args.distill_teacher:
            raise UsageError("--distill_teacher is used only with --distill")
        return None
    check_distillation(args.distill_temperature, args.distill_weight)
    teacher = build_model(name, "imagenet", num_classes)
    if args.distill_teacher:
        load_pretrained(teacher, args.distill_teacher, what="--distill_teacher")
        return teacher.eval()
    kind, ckpt = load_pruned_checkpoint(args.resume) if args.resume else (None, None)
    if kind != "masks":
        raise UsageError("--distill needs the dense network as teacher: pass --distill_teacher PATH (only a stage-1 "
                         "masks checkpoint carries the dense weights itself)")
    load_state_dict_strict(teacher, ckpt["state_dict"], what=f"the dense weights of {str(args.resume)!r}")
    return teacher.eval()


def _check_inputs(args: argparse.Namespace, info: DistInfo
                  ) -> Tuple[Dataset, Dataset, int, Prepared, Optional[nn.Module]]:
    """This rank's data, checkpoint, teacher and (on rank 0) results folder, checked before any collective."""
    train_set, _, val_set = imagenet_datasets(args.dataroot, args.input_size, args.skip_unreadable)
    num_classes = len(train_set.classes)
    prepared = prepare_model(args, num_classes)
    teacher = None if args.evaluate else teacher_model(args, prepared.model_name, num_classes)
    if info.is_main and not args.evaluate:
        ensure_writable_dir(Path(args.results_dir))
    return train_set, val_set, num_classes, prepared, teacher


def run(args: argparse.Namespace) -> Optional[Dict[str, float]]:
    """Validate everything (on every rank, agreed under torchrun), then evaluate (`-e`) or train; returns the
    evaluation or the last epoch's log row. After training rank 0 alone slims and writes the summary."""
    info = resolve_device(args)
    if not args.evaluate:
        args = argparse.Namespace(**{**vars(args), "results_dir": claim_results_dir(args, info)})
    seed_everything(args.seed)
    train_set, val_set, num_classes, prepared, teacher = on_every_rank(lambda: _check_inputs(args, info), USER_ERRORS)
    model = prepared.model
    enforce: Optional[Callable[[nn.Module], None]] = None
    if prepared.route == "masked":
        graph = trace(model, torch.randn(1, 3, SLIM_DUMMY_SIZE, SLIM_DUMMY_SIZE))
        apply_masks(model, prepared.masks, graph)
        model = _to_device(model, info.device)
        enforce = MaskEnforcer(model, prepared.masks, graph)
    else:
        model = _to_device(model, info.device)
    val_loader = make_loader(val_set, args.batch_size, shuffle=False, workers=args.workers,
                             sampler=ShardSampler(len(val_set), info.world_size, info.rank))
    amp = info.device.type == "cuda"
    if args.evaluate:
        result = evaluate(model, val_loader, info.device, amp=amp)
        if info.is_main:
            print(", ".join(f"{k}={v:.4f}" for k, v in result.items()))
        return result
    _warn_start_epoch(args, prepared)
    results_dir = Path(args.results_dir)
    if prepared.retrain is not None:
        _adopt_retrain_checkpoint(prepared, results_dir, args, info)
    sampler = EpochTaggedSampler(train_set, num_replicas=info.world_size, rank=info.rank, shuffle=True,
                                 seed=args.seed)
    train_loader = make_loader(SeededAugmentation(train_set, args.seed), args.batch_size, shuffle=False,
                               workers=args.workers, seed=args.seed, sampler=sampler)
    if info.distributed:
        model = DistributedDataParallel(model, device_ids=[info.device.index] if info.device.type == "cuda" else None)
    optimizer = build_optimizer(model, args.lr, args.momentum, args.decay, nesterov=True)
    scheduler = build_scheduler(optimizer, "cosine", args.epochs, len(train_loader), args.warmup, args.warm_lr)
    extra = {"kind": "retrain", "model_name": prepared.model_name, "dataset": "imagenet", "num_classes": num_classes,
             "route": prepared.route, "masks": compact_masks(prepared.masks) if prepared.masks is not None else None,
             "args": vars(args)}
    log = fit(model, train_loader, val_loader, epochs=args.epochs, optimizer=optimizer, scheduler=scheduler,
              device=info.device, run_dir=results_dir, resume=prepared.retrain is not None,
              make_checkpoint=lambda: extra,
              label_smoothing=args.label_smoothing, amp=amp, after_step=enforce, is_main=info.is_main,
              train_sampler=sampler, checkpoint_names=(CHECKPOINT_NAME, BEST_NAME), log_interval=args.log_interval,
              distill=None if teacher is None else Distillation(_to_device(teacher, info.device),
                                                                args.distill_temperature, args.distill_weight))
    if info.is_main:
        final = _slim_final(model, prepared, num_classes, args) if prepared.route == "masked" else model
        _final_summary(final, log, prepared, args, num_classes)
    return log.iloc[-1].to_dict()


def build_parser() -> argparse.ArgumentParser:
    """The command line of imagenet/imagenet.py (the CDP README's flags)."""
    p = OneLineParser(
        description="Stage 2: fine-tune a pruned ImageNet network (torchrun for several GPUs/processes).",
        epilog="--batch-size is per process. --start-epoch is accepted for compatibility only: a resumed "
               "checkpoint's epoch always wins, and without one training starts at epoch 0.")
    p.add_argument("--model", type=imagenet_model, default=None, metavar="NAME",
                   help="torchvision CNN name or timm:NAME (default: the one in the --resume checkpoint)")
    p.add_argument("--dataroot", required=True, help="folder with train/ and val/ class folders")
    p.add_argument("--resume", default=None, help="masks (with --make-mask), slim or retrain checkpoint")
    p.add_argument("--make-mask", action="store_true",
                   help="train the masked dense network of a masks checkpoint, then slim it (slim_final.pth)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--epochs", type=int, default=90)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("-m", "--momentum", type=float, default=0.9)
    p.add_argument("-d", "--decay", type=float, default=1e-4, help="weight decay")
    p.add_argument("--warmup", type=float, default=0.0, help="linear warmup epochs (per iteration)")
    p.add_argument("--warm_lr", type=float, default=None, help="warmup start LR (default lr/10)")
    p.add_argument("--label-smoothing", type=float, default=0.0)
    p.add_argument("-e", "--evaluate", action="store_true", help="only evaluate on val/; writes nothing")
    p.add_argument("--results_dir", help=f"where checkpoints, log and summary go (default ./{DEFAULT_RESULTS_DIR}, "
                                          "or its next free name ...-2 when it holds another run); a folder holding "
                                          "another run is refused unless --resume continues its checkpoint")
    p.add_argument("--start-epoch", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--input-size", type=int, default=224)
    p.add_argument("--log-interval", type=int, default=20, help="iterations between progress-bar updates")
    p.add_argument("-j", "--workers", type=int, default=4)
    p.add_argument("--gpus", default=None, help="GPU index (single process), e.g. 0")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available)")
    p.add_argument("--skip-unreadable", action="store_true",
                   help="skip images that cannot be decoded (counted in warnings) instead of failing")
    add_recovery_arguments(p, reconstruct=False)
    p.add_argument("--distill_teacher", metavar="PATH",
                   help="the dense teacher's weights for --distill (default: those of a stage-1 masks checkpoint)")
    add_distributed_argument(p)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run stage 2; returns the exit status (2 with one `error:` line on stderr for bad input, 1 when another
    torchrun rank failed)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if launched_rank() == 0 else logging.WARNING,
                        format="%(levelname)s %(message)s", stream=sys.stderr)
    return exit_status(lambda: run(args))

"""Networks adapted to the bench's data by dense fine-tuning, cached on disk by checkpoint hash and recipe.

A network trained on other images (the shared ResNets on the original
CIFAR-10, measured on its JPEG re-encoding) is first fine-tuned densely, so
every pruning row starts from the same network fitted to this data. The cache
file is named by a hash of the recipe (the checkpoint's sha256, epochs, lr,
batch, seed, the data's identity) and holds the recipe: another recipe
rebuilds, never reuses.
"""
from __future__ import annotations

import hashlib
import json
import sys
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch
from torch import nn

from cdp_gfi import build_model, load_pretrained
from cdp_gfi.files.checkpoint import load_checkpoint, load_state_dict_strict, save_atomic
from cdp_gfi.runs.cifar_config import PruneConfig, resolve
from cdp_gfi.runs.cifar_steps import finetune, train_loader

LR, BATCH, SEED = 0.01, 128, 0


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def data_identity(dataroot: Path) -> str:
    """sha256 over the names and bytes of the pickle files under ``dataroot``/cifar-10-batches-py."""
    digest = hashlib.sha256()
    for path in sorted((Path(dataroot) / "cifar-10-batches-py").iterdir()):
        if path.is_file():
            digest.update(path.name.encode())
            digest.update(file_sha256(path).encode())
    return digest.hexdigest()


def recipe(name: str, checkpoint: Path, epochs: int, data: str, lr: float = LR, batch: int = BATCH,
           seed: int = SEED) -> Dict[str, Any]:
    """Everything the adapted weights depend on."""
    return dict(net=name, checkpoint_sha256=file_sha256(checkpoint), epochs=epochs, lr=lr, batch=batch, seed=seed,
                schedule="cosine", data=data)


def fine_tune(model: nn.Module, name: str, splits, test_loader, epochs: int, lr: float, seed: int,
              teacher: Optional[nn.Module] = None, distill: Optional[Tuple[float, float]] = None) -> float:
    """``epochs`` of SGD Nesterov (cosine, batch 128, crop+flip) over the whole training split; final top-1.

    ``teacher`` with ``distill`` = (temperature, weight) fine-tunes with knowledge distillation.
    """
    config = resolve(PruneConfig(dataset="cifar10", model=name, epochs=epochs, lr=lr, batch_size=BATCH, workers=0,
                                 seed=seed, sparsity=0.5, reconstruct=False, distill=False))  # one recipe for all rows
    if distill is not None:
        config = replace(config, distill=True, distill_temperature=distill[0], distill_weight=distill[1])
    with tempfile.TemporaryDirectory() as tmp:
        log = finetune(replace(config, save_dir=tmp), model, {}, (train_loader(config, splits[0]), test_loader),
                       torch.device("cpu"), Path(tmp), teacher=teacher)
    return float(log.attrs["final_top1"])


def adapted(name: str, checkpoint: Path, splits, test_loader, epochs: int, dataroot: Path,
            cache_dir: Path) -> Tuple[nn.Module, Dict[str, Any]]:
    """The pretrained ``name`` fine-tuned densely for ``epochs`` on ``splits`` (0: as published), from the cache
    when one of the same recipe is there; (model in eval mode, its recipe with ``top1``)."""
    if epochs < 0:
        raise ValueError(f"--adapt_epochs must be >= 0, got {epochs}")
    model = build_model(name, "cifar10").eval()
    load_pretrained(model, checkpoint, what=f"--nets {name}")
    if epochs == 0:
        return model, {"net": name, "epochs": 0}
    wanted = recipe(name, checkpoint, epochs, data_identity(dataroot))
    key = hashlib.sha256(json.dumps(wanted, sort_keys=True).encode()).hexdigest()[:16]
    path = Path(cache_dir) / f"{name}_adapted_{key}.pth"
    if path.exists():
        saved = load_checkpoint(path)
        if saved.get("recipe") == wanted:
            load_state_dict_strict(model, saved, what=f"adapted {name}")
            return model.eval(), {**wanted, "top1": saved["top1"], "path": str(path)}
        print(f"warning: {path} holds a network adapted with another recipe; rebuilding it", file=sys.stderr)
    top1 = fine_tune(model, name, splits, test_loader, epochs, wanted["lr"], wanted["seed"])
    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    save_atomic({"state_dict": model.state_dict(), "recipe": wanted, "top1": top1}, path)
    print(f"adapted {name}: {epochs} epoch(s) of dense fine-tuning, top-1 {top1:.2f}% -> {path}", flush=True)
    return model.eval(), {**wanted, "top1": top1, "path": str(path)}

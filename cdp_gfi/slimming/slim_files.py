"""Slim networks as files that need no code to load: what rebuilds the network, and its weights.

A slim network is written as its recipe: ``model_name``, ``dataset``,
``num_classes`` and the masks it was slimmed with (kept filters per conv,
`mask_files`), plus its ``state_dict``. Loading builds the dense
architecture, slims it with those masks (`cdp_gfi.slim`) and loads the
weights strictly, so every shape is checked; no pickled module is read.
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Tuple

import torch
from torch import nn

from ..files.checkpoint import (
    CheckpointError,
    PathLike,
    load_checkpoint,
    load_state_dict_strict,
    save_atomic,
    unwrap_model,
)
from ..files.mask_files import MaskFileError, Masks, compact_masks, expand_masks
from ..models import build_model, input_size_for
from ..statistics.collect import infer_num_classes
from .speedup import slim

SLIM_DUMMY_SIZE = 64  # ImageNet nets pool adaptively, so slimming at 64x64 gives the same network, fast
RECIPE_KEYS = ("model_name", "dataset", "num_classes", "masks", "state_dict")


def slim_dummy(dataset: str) -> torch.Tensor:
    """The input `slim` traces with: the data set's size, at most 64x64 (only shapes matter)."""
    size = min(SLIM_DUMMY_SIZE, input_size_for(dataset)[1])
    return torch.zeros(1, 3, size, size)


def slim_recipe(model_name: str, dataset: str, num_classes: int, masks: Masks) -> Dict[str, Any]:
    """The checkpoint entries that rebuild a network slimmed from ``model_name`` with ``masks`` (no weights)."""
    return {"model_name": model_name, "dataset": dataset, "num_classes": int(num_classes),
            "masks": compact_masks(masks)}


def save_slim_checkpoint(path: PathLike, model_name: str, model: nn.Module, masks: Masks,
                         num_classes: Optional[int] = None, args: Optional[Dict[str, Any]] = None,
                         dataset: str = "imagenet") -> None:
    """Write a slim checkpoint: {"kind": "slim", recipe (see `slim_recipe`), "state_dict", "args"}, atomically."""
    model = unwrap_model(model)
    recipe = slim_recipe(model_name, dataset, num_classes or infer_num_classes(model), masks)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    save_atomic({"kind": "slim", **recipe, "state_dict": state, "args": dict(args or {})}, path)


def rebuild_slim(ckpt: Mapping[str, Any], what: str = "checkpoint") -> Tuple[nn.Module, Masks]:
    """The slim network (eval mode) and its NNI masks from a loaded checkpoint holding a slim recipe.

    A ``route: "masked"`` checkpoint (dense weights held at zero under masks) is slimmed after loading.
    """
    missing = [k for k in RECIPE_KEYS if k not in ckpt]
    if missing:
        raise CheckpointError(f"{what} does not describe a slim network: no {', '.join(missing)}")
    try:
        model = build_model(ckpt["model_name"], ckpt["dataset"], ckpt["num_classes"])
        masks = expand_masks(model, ckpt["masks"], source=f"the masks in {what}")
    except (ValueError, TypeError, MaskFileError) as err:
        raise CheckpointError(f"{what}: {err}") from err
    model.eval()
    masked = ckpt.get("route") == "masked"
    if masked:
        load_state_dict_strict(model, ckpt["state_dict"], what=what)
    with torch.random.fork_rng(devices=[]):  # NNI draws its random batch from the global generator
        slim(model, masks, slim_dummy(ckpt["dataset"]))
    if not masked:
        load_state_dict_strict(model, ckpt["state_dict"], what=what)
    return model, masks


def load_slim(path: PathLike) -> nn.Module:
    """The slim network (eval mode) in ``path``: a slim, retrain or fine-tuning checkpoint of this package.

    Replaces ``torch.load(path, weights_only=False)["model"]``: nothing is unpickled but tensors and
    plain containers; the network is rebuilt from its recipe and its weights loaded strictly.
    """
    return rebuild_slim(load_checkpoint(path), what=repr(str(path)))[0]

"""Crash-safe checkpoint writing and strict, well-explained checkpoint loading."""

from __future__ import annotations

import errno
import os
import pickle
import re
import secrets
import tempfile
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Union

import torch
from torch import Tensor, nn
from torch.nn.modules.utils import consume_prefix_in_state_dict_if_present
from torch.nn.parallel import DataParallel, DistributedDataParallel

PathLike = Union[str, "os.PathLike[str]"]

# Prefixes added by DataParallel/DistributedDataParallel and by torch.compile.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
_LIST_LIMIT = 10


class CheckpointError(RuntimeError):
    """A checkpoint file is unreadable or does not hold what was asked of it."""


class UnsafeCheckpointError(CheckpointError):
    """A file would need code (pickled Python objects) to load; it was refused unread."""


class CheckpointMismatchError(CheckpointError):
    """A state dict's keys or tensor shapes differ from the model it is loaded into."""


def ensure_writable_dir(directory: PathLike) -> Path:
    """Create `directory` if needed and prove a file can be written in it.

    Scripts call this before long work so a bad output path fails in seconds, not hours.
    """
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as err:
        raise OSError(err.errno, f"cannot write to directory ({err.strerror})", str(directory)) from err
    return directory


@contextmanager
def atomic_open(path: PathLike, mode: str = "wb") -> Iterator[IO[Any]]:
    """Open a temp file next to `path`; on success fsync it and rename it onto `path`.

    An exception (or Ctrl-C) inside the block removes the temp file and leaves `path` untouched.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open mode must be 'w' or 'wb', got {mode!r}")
    path = Path(path)
    ensure_writable_dir(path.parent)
    tmp_path = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    # os.open with mode 0o666 keeps the usual umask-derived permissions (mkstemp would force 0o600).
    fd = os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def save_atomic(obj: Any, path: PathLike) -> None:
    """torch.save `obj` to `path` so that a crash mid-write never leaves a partial file."""
    with atomic_open(path, "wb") as handle:
        torch.save(obj, handle)


def load_checkpoint(path: PathLike, map_location: Any = "cpu") -> Any:
    """Load a torch file with ``weights_only=True``: tensors and plain containers only, so loading runs no code.

    Pretrained weights come from anyone's drive; a file that would need code to load (a pickled
    module or any other Python object) is refused with `UnsafeCheckpointError` and nothing from it runs.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(errno.ENOENT, "checkpoint not found", str(path))
    if path.is_dir():
        raise IsADirectoryError(errno.EISDIR, "checkpoint path is a directory, expected a file", str(path))
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch.load reports damage as OSError, KeyError, EOFError, pickle and zip errors
        found = re.search(r"GLOBAL (\S+)", str(err)) if isinstance(err, pickle.UnpicklingError) else None
        if found:  # the restricted unpickler met a reference to code, and stopped there
            raise UnsafeCheckpointError(
                f"{str(path)!r} refused: loading it would need code ({found.group(1)}); it was read with weights_only=True and nothing in it ran. cdp_gfi reads only tensors and plain "
                "containers: save weights with torch.save(model.state_dict(), path)") from None
        raise CheckpointError(
            f"{str(path)!r} is corrupt or not a torch checkpoint "
            f"(an interrupted copy or download?): {type(err).__name__}: {err}"
        ) from err


def unwrap_model(model: nn.Module) -> nn.Module:
    """Return the user model inside DataParallel/DDP and torch.compile wrappers."""
    while True:
        if isinstance(model, (DataParallel, DistributedDataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and all(isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items())


def _shared_wrapper_prefix(state_dict: Mapping[str, Tensor]) -> str | None:
    """A wrapper prefix carried by every key (so a real submodule named `module` is left alone), if any."""
    for prefix in _WRAPPER_PREFIXES:
        if state_dict and all(key.startswith(prefix) for key in state_dict):
            return prefix
    return None


def extract_state_dict(obj: Any) -> dict[str, Tensor]:
    """Find the state dict in a loaded checkpoint and strip DDP (`module.`) and torch.compile (`_orig_mod.`) prefixes.

    Accepts a plain state dict, an nn.Module, or a dict whose `state_dict` or `model` entry is one of those.
    """
    if isinstance(obj, nn.Module):
        obj = unwrap_model(obj).state_dict()
    elif isinstance(obj, Mapping) and not _is_state_dict(obj):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), (Mapping, nn.Module)):
                return extract_state_dict(obj[key])
        keys = ", ".join(map(repr, list(obj)[:_LIST_LIMIT]))
        raise CheckpointError(f"no state dict found: expected tensors or a 'state_dict'/'model' entry, got keys {keys}")
    elif not isinstance(obj, Mapping):
        raise CheckpointError(f"no state dict found in an object of type {type(obj).__name__}")
    state_dict = OrderedDict(obj)
    if hasattr(obj, "_metadata"):
        state_dict._metadata = obj._metadata
    while prefix := _shared_wrapper_prefix(state_dict):
        consume_prefix_in_state_dict_if_present(state_dict, prefix)
    return state_dict


def _listing(title: str, items: list[str]) -> str:
    shown = "\n".join(f"    {item}" for item in items[:_LIST_LIMIT])
    more = f"\n    ... and {len(items) - _LIST_LIMIT} more" if len(items) > _LIST_LIMIT else ""
    return f"  {len(items)} {title}:\n{shown}{more}"


def load_state_dict_strict(model: nn.Module, source: Any, what: str = "checkpoint") -> Any:
    """Load weights from `source` (a path or a loaded object) into `model`, explaining any key/shape mismatch.

    Raises CheckpointMismatchError before touching the model; returns the loaded object.
    """
    if isinstance(source, (str, os.PathLike)):
        what = f"{what} {str(source)!r}"
        source = load_checkpoint(source)
    state_dict = extract_state_dict(source)
    target = unwrap_model(model)
    expected = target.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    shapes = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
        for k, v in state_dict.items()
        if k in expected and v.shape != expected[k].shape
    ]
    if missing or unexpected or shapes:
        sections = (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes))
        parts = [_listing(title, items) for title, items in sections if items]
        raise CheckpointMismatchError(f"{what} does not match {type(target).__name__}:\n" + "\n".join(parts))
    target.load_state_dict(state_dict, strict=True)
    return source

"""Run folders: a fresh run never removes or mixes another run's files.

A folder holds a run when it holds one of the files a run writes. A fresh run
asked to write into such a folder refuses (one error naming the flags that
continue the run or choose another folder); a run left to its default folder
takes the first free name after it (``..._seed0-2``, ``-3``, ...) and says so.
Nothing is created here: the choice is a pure function of what is on disk.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Optional

from ..files.checkpoint import PathLike


def occupant(directory: PathLike, run_files: Iterable[str]) -> Optional[str]:
    """The first entry of ``directory`` matching ``run_files`` (names or glob patterns); None when it holds no run."""
    directory = Path(directory)
    if not directory.is_dir():
        return None
    for pattern in run_files:
        found = sorted(directory.glob(pattern))
        if found:
            return found[0].name
    return None


def next_free(directory: PathLike, run_files: Iterable[str]) -> Path:
    """``directory`` if it holds no run, else the first of ``directory-2``, ``directory-3``, ... that holds none."""
    run_files, directory = tuple(run_files), Path(directory)
    candidate, n = directory, 1
    while occupant(candidate, run_files) is not None:
        n += 1
        candidate = directory.with_name(f"{directory.name}-{n}")
    return candidate


def claim(directory: PathLike, run_files: Iterable[str], *, default: bool, flag: str, to_continue: str) -> Path:
    """The folder a fresh run writes to: ``directory`` if it holds no run; for a default folder the next free
    name (printed); otherwise ValueError naming ``to_continue`` (how to continue that run) and ``flag``."""
    run_files, directory = tuple(run_files), Path(directory)
    found = occupant(directory, run_files)
    if found is None:
        return directory
    if not default:
        raise ValueError(f"{flag} {directory} holds another run ({found}): {to_continue}, or give another {flag}; "
                         "nothing was written")
    chosen = next_free(directory, run_files)
    print(f"{directory} holds another run ({found}): this run writes to {chosen} ({flag} chooses the folder)",
          flush=True)
    return chosen

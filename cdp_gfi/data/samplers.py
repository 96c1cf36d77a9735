"""Loaders and samplers: seeded class-balanced statistics samples, class shards, resumable shuffles."""
from __future__ import annotations

import bisect
import itertools
from typing import Any, Iterator, Optional, Sequence, Tuple

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, Subset


def _check_positive(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def dataset_targets(dataset: Dataset) -> list[int]:
    """Class labels of every item, from `dataset.targets` (looked through `Subset`s)."""
    if isinstance(dataset, Subset):
        parent = dataset_targets(dataset.dataset)
        return [parent[int(i)] for i in dataset.indices]
    targets = getattr(dataset, "targets", None)
    if targets is None:
        raise ValueError(f"{type(dataset).__name__} has no `targets`; class-balanced sampling needs the labels")
    return [int(t) for t in torch.as_tensor(targets).tolist()]


def _balanced_indices(targets: Sequence[int], count: int, generator: torch.Generator) -> list[int]:
    """`count` indices taken round-robin across classes (random order within a class and within a round)."""
    by_class: dict[int, list[int]] = {}
    for index, label in enumerate(targets):
        by_class.setdefault(label, []).append(index)
    queues = [[members[j] for j in torch.randperm(len(members), generator=generator).tolist()]
              for _, members in sorted(by_class.items())]
    picked: list[int] = []
    depth = 0
    while len(picked) < count:
        alive = [queue for queue in queues if depth < len(queue)]
        for k in torch.randperm(len(alive), generator=generator).tolist()[:count - len(picked)]:
            picked.append(alive[k][depth])
        depth += 1
    return picked


class ClassShardSampler(Sampler[int]):
    """Positions of a dataset in class order, each process (`rank` of `world_size`) taking whole classes.

    GFI-AP's class-mean maps then need one class's sums at a time (see `statistics`).
    Classes go to processes in contiguous blocks of about equal image counts; within a
    class the dataset's order is kept.
    """

    def __init__(self, targets: Sequence[int], world_size: int = 1, rank: int = 0) -> None:
        by_class: dict[int, list[int]] = {}
        for position, label in enumerate(targets):
            by_class.setdefault(int(label), []).append(position)
        classes = sorted(by_class)
        if len(classes) < world_size:
            raise ValueError(f"the statistics sample holds {len(classes)} classes, fewer than the {world_size} "
                             "processes that would each read whole classes: use fewer processes")
        before = list(itertools.accumulate((len(by_class[c]) for c in classes), initial=0))  # images before class i
        starts = [0]
        for r in range(1, world_size):  # rank r starts at the first class beyond r/world_size of the images
            first = bisect.bisect_left(before, r * len(targets) / world_size)
            starts.append(min(max(first, starts[-1] + 1), len(classes) - (world_size - r)))
        starts.append(len(classes))
        self.indices = [p for c in classes[starts[rank]:starts[rank + 1]] for p in by_class[c]]

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def is_class_ordered(loader: Any) -> bool:
    """Whether `loader` yields its items class by class (a DataLoader over a `ClassShardSampler`)."""
    return isinstance(getattr(loader, "sampler", None), ClassShardSampler)


def sample_loader(dataset: Dataset, batch_size: int, stop_batch: Optional[int], seed: int,
                  workers: int = 0, class_balanced: bool = False, class_ordered: bool = False) -> DataLoader:
    """Loader over a seeded random subset of `stop_batch * batch_size` items (all if None), for pruning statistics.

    The order is fixed by `seed`, so the same seed yields the same items in the same
    order. `class_balanced` draws classes round-robin from `dataset.targets`.
    `class_ordered` yields the same items class by class (`ClassShardSampler`), which
    lets GFI-AP keep one class's maps at a time. Pass an un-augmented dataset.
    """
    _check_positive("batch_size", batch_size)
    if stop_batch is not None:
        _check_positive("stop_batch", stop_batch)
    total = len(dataset)
    if total == 0:
        raise ValueError("cannot sample from an empty dataset")
    count = total if stop_batch is None else min(total, stop_batch * batch_size)
    generator = torch.Generator().manual_seed(seed)
    if class_balanced:
        chosen = _balanced_indices(dataset_targets(dataset), count, generator)
        indices = [chosen[i] for i in torch.randperm(count, generator=generator).tolist()]
    else:
        indices = torch.randperm(total, generator=generator)[:count].tolist()
    sample = Subset(dataset, indices)
    sampler = ClassShardSampler(dataset_targets(sample)) if class_ordered else None
    return make_loader(sample, batch_size, shuffle=False, workers=workers, seed=seed, sampler=sampler)


def make_loader(dataset: Dataset, batch_size: int, shuffle: bool, workers: int = 0, seed: int = 0,
                drop_last: bool = False, sampler: Optional[Sampler] = None) -> DataLoader:
    """DataLoader with a seeded generator (shuffling and worker seeds), pinned memory only when CUDA exists."""
    _check_positive("batch_size", batch_size)
    if workers < 0:
        raise ValueError(f"workers must be >= 0, got {workers!r}")
    if sampler is not None and shuffle:
        raise ValueError("pass shuffle=True or a sampler, not both")
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, sampler=sampler, num_workers=workers,
                      pin_memory=torch.cuda.is_available(), persistent_workers=workers > 0,
                      drop_last=drop_last, generator=torch.Generator().manual_seed(seed))


class EpochTaggedSampler(DistributedSampler):
    """DistributedSampler that yields (index, epoch) pairs, for `SeededAugmentation`."""

    def __iter__(self) -> Iterator[Tuple[int, int]]:
        return ((index, self.epoch) for index in super().__iter__())


class SeededAugmentation(Dataset):
    """Draws each item's random augmentation from a generator seeded by (seed, epoch, index).

    So every sample is augmented the same way whatever the number of processes or loader workers.
    """

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: Tuple[int, int]) -> Any:
        index, epoch = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(hash((self.seed, epoch, index)) & 0x7FFF_FFFF_FFFF_FFFF)
            return self.dataset[index]


class ShardSampler(Sampler[int]):
    """Every `world_size`-th index from `rank`, unpadded, so an all-reduced evaluation counts each image once."""

    def __init__(self, length: int, world_size: int, rank: int) -> None:
        self.indices = list(range(rank, length, world_size))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)

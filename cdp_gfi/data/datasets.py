"""The datasets: CIFAR (pickle layout), scikit-learn's digits, ImageFolder trees."""
from __future__ import annotations

import copy
import functools
import warnings
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset
from torchvision import transforms as T
from torchvision.datasets import CIFAR10, CIFAR100, ImageFolder
from torchvision.datasets.folder import find_classes
from torchvision.datasets.utils import check_integrity as md5_matches
from torchvision.datasets.vision import StandardTransform

PathLike = Union[str, Path]
Splits = tuple[Dataset, Dataset, Dataset]

# Per-channel statistics of the training images (CIFAR-10 as in the CDP authors' scripts).
CIFAR10_MEAN = (125.31 / 255, 122.95 / 255, 113.87 / 255)
CIFAR10_STD = (63.0 / 255, 62.09 / 255, 66.70 / 255)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# What a broken image file raises while PIL decodes it (PIL uses SyntaxError for some malformed PNGs).
_DECODE_ERRORS = (OSError, SyntaxError, ValueError)


class _UncheckedCIFAR10(CIFAR10):
    """torchvision's CIFAR10 loader with its md5 check reduced to "the file exists"."""

    train_list = [[name, None] for name, _ in CIFAR10.train_list]
    test_list = [[name, None] for name, _ in CIFAR10.test_list]
    meta = {**CIFAR10.meta, "md5": None}


class _UncheckedCIFAR100(CIFAR100):
    """torchvision's CIFAR100 loader with its md5 check reduced to "the file exists"."""

    train_list = [[name, None] for name, _ in CIFAR100.train_list]
    test_list = [[name, None] for name, _ in CIFAR100.test_list]
    meta = {**CIFAR100.meta, "md5": None}


_CIFAR = {
    "cifar10": (CIFAR10, _UncheckedCIFAR10, CIFAR10_MEAN, CIFAR10_STD),
    "cifar100": (CIFAR100, _UncheckedCIFAR100, CIFAR100_MEAN, CIFAR100_STD),
}


def _with_transform(dataset: Dataset, transform: Callable) -> Dataset:
    """A shallow copy of a torchvision dataset that shares its data but applies another transform."""
    clone = copy.copy(dataset)
    clone.transform = transform
    clone.transforms = StandardTransform(transform, dataset.target_transform)
    return clone


def _cifar_files(cls: type[CIFAR10]) -> list[tuple[str, str]]:
    """(file name, official md5) of every file a torchvision CIFAR class reads."""
    return [(name, md5) for name, md5 in cls.train_list + cls.test_list] + [(cls.meta["filename"], cls.meta["md5"])]


def cifar_datasets(root: PathLike, dataset: str = "cifar10", download: bool = False,
                   check_integrity: bool = True) -> Splits:
    """CIFAR-10/100 from the standard python-pickle layout under `root`: (train_aug, train_plain, test).

    `check_integrity=False` skips torchvision's md5 comparison with the official
    release (for re-packed copies); the files must still exist and load.
    """
    if dataset not in _CIFAR:
        raise ValueError(f"unknown CIFAR dataset {dataset!r}; expected one of {sorted(_CIFAR)}")
    checked_cls, unchecked_cls, mean, std = _CIFAR[dataset]
    folder = Path(root) / checked_cls.base_folder
    if not download:
        if not Path(root).is_dir():
            raise FileNotFoundError(f"{dataset} root {str(root)!r} does not exist; expected a folder "
                                    f"containing {checked_cls.base_folder}/")
        if not folder.is_dir():
            raise FileNotFoundError(f"{dataset} root {str(root)!r} has no {checked_cls.base_folder}/ folder "
                                    f"(extract the python version of the dataset there, or let it download: --download, download=True)")
        missing = [name for name, _ in _cifar_files(checked_cls) if not (folder / name).is_file()]
        if missing:
            raise FileNotFoundError(f"{str(folder)!r} lacks {missing}")
    cls = checked_cls if check_integrity else unchecked_cls
    normalize = [T.ToTensor(), T.Normalize(mean, std)]
    plain = T.Compose(normalize)
    augment = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), *normalize])
    try:
        train = cls(str(root), train=True, transform=plain, download=download)
        test = cls(str(root), train=False, transform=plain, download=False)
    except RuntimeError as err:
        if download:
            raise
        mismatched = [name for name, md5 in _cifar_files(checked_cls) if not md5_matches(str(folder / name), md5)]
        raise ValueError(f"files in {str(folder)!r} do not match the official {dataset} release (md5 differs for "
                         f"{mismatched}); pass check_integrity=False to load them anyway") from err
    return _with_transform(train, augment), train, test


class TensorImageDataset(Dataset):
    """Images held in one in-memory tensor, with a torchvision-style `targets` list and optional transform."""

    def __init__(self, images: torch.Tensor, targets: Sequence[int], classes: Sequence[str],
                 transform: Optional[Callable] = None) -> None:
        if len(images) != len(targets):
            raise ValueError(f"{len(images)} images but {len(targets)} targets")
        self.images = images
        self.targets = [int(t) for t in targets]
        self.classes = list(classes)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.images[index]
        if self.transform is not None:
            image = self.transform(image)
        return image, self.targets[index]


@functools.lru_cache(maxsize=4)
def _digits_tensors(seed: int, test_fraction: float) -> tuple[torch.Tensor, ...]:
    """The 1,797 scikit-learn digits as 3x32x32 images in [0, 1], split stratified.

    Returns (train, train_y, test, test_y, stats) with stats = [mean; std] per channel of the train split.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = F.interpolate(images, size=(32, 32), mode="bilinear", align_corners=False).clamp_(0, 1)
    images = images.expand(-1, 3, -1, -1).contiguous()
    labels = torch.tensor(digits.target, dtype=torch.long)
    train_idx, test_idx = train_test_split(torch.arange(len(labels)).numpy(), test_size=test_fraction,
                                           random_state=seed, stratify=labels.numpy())
    train_idx, test_idx = torch.from_numpy(train_idx), torch.from_numpy(test_idx)
    train = images[train_idx]
    mean, std = train.mean(dim=(0, 2, 3)), train.std(dim=(0, 2, 3))
    return train, labels[train_idx], images[test_idx], labels[test_idx], torch.stack([mean, std])


def digits_datasets(seed: int = 0, test_fraction: float = 0.2) -> Splits:
    """scikit-learn's bundled 8x8 digits upsampled to 3x32x32: a real 10-class dataset that needs no download.

    The split is stratified and fixed by `seed`; normalization uses the train split's
    statistics. Augmentation is a small translation only (digits are not mirror-symmetric).
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must lie strictly between 0 and 1, got {test_fraction!r}")
    train, train_y, test, test_y, stats = _digits_tensors(int(seed), float(test_fraction))
    normalize = T.Normalize(stats[0].tolist(), stats[1].tolist())
    augment = T.Compose([T.RandomCrop(32, padding=2), normalize])
    classes = [str(d) for d in range(10)]
    return (TensorImageDataset(train, train_y, classes, augment),
            TensorImageDataset(train, train_y, classes, normalize),
            TensorImageDataset(test, test_y, classes, normalize))


class ImageFolderSkipping(ImageFolder):
    """ImageFolder whose decode errors name the file, or, with `skip_unreadable`, are skipped.

    A skipped image is replaced by the next readable one in the folder order (so
    batches keep their size); its path is recorded in `skipped` and a warning
    with the running count is issued. With worker processes each worker keeps
    its own `skipped` list, but the warnings still reach stderr.
    """

    def __init__(self, root: PathLike, transform: Optional[Callable] = None,
                 skip_unreadable: bool = False) -> None:
        super().__init__(str(root), transform=transform)
        self.skip_unreadable = skip_unreadable
        self.skipped: list[str] = []

    def __getitem__(self, index: int) -> tuple[object, int]:
        for offset in range(len(self.samples)):
            path, target = self.samples[(index + offset) % len(self.samples)]
            try:
                sample = self.loader(path)
            except _DECODE_ERRORS as err:
                if not self.skip_unreadable:
                    raise ValueError(f"cannot decode image {path!r}: {err}") from err
                if path not in self.skipped:
                    self.skipped.append(path)
                    warnings.warn(f"skipped unreadable image {path!r} ({err}); "
                                  f"{len(self.skipped)} skipped so far", RuntimeWarning, stacklevel=2)
                continue
            if self.transform is not None:
                sample = self.transform(sample)
            return sample, target
        raise ValueError(f"no readable image under {self.root!r}")


def _class_folders(split: Path) -> list[str]:
    if not split.is_dir():
        raise FileNotFoundError(f"ImageNet split folder {str(split)!r} does not exist; expected "
                                f"{split.name}/ with one sub-folder per class")
    return find_classes(str(split))[0]


def _preview(names: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return f"[{shown}{', ...' if len(names) > limit else ''}] ({len(names)} in all)"


def imagenet_datasets(root: PathLike, input_size: int = 224, skip_unreadable: bool = False) -> Splits:
    """ImageNet-style `root/train` and `root/val` class folders: (train_aug, train_plain, val).

    Train augmentation is RandomResizedCrop + flip; train_plain and val are
    resized to input_size/0.875 and center-cropped. Both splits must have the same classes.
    """
    if isinstance(input_size, bool) or not isinstance(input_size, int) or input_size < 1:
        raise ValueError(f"input_size must be a positive int, got {input_size!r}")
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"ImageNet root {str(root)!r} does not exist; expected a folder with train/ and val/")
    train_classes, val_classes = _class_folders(root / "train"), _class_folders(root / "val")
    if train_classes != val_classes:
        only_train = sorted(set(train_classes) - set(val_classes))
        only_val = sorted(set(val_classes) - set(train_classes))
        raise ValueError(f"class folders differ between {str(root / 'train')!r} and {str(root / 'val')!r}: "
                         f"only in train {_preview(only_train)}, only in val {_preview(only_val)}")
    normalize = [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    plain = T.Compose([T.Resize(int(input_size / 0.875)), T.CenterCrop(input_size), *normalize])
    augment = T.Compose([T.RandomResizedCrop(input_size), T.RandomHorizontalFlip(), *normalize])
    train = ImageFolderSkipping(root / "train", transform=plain, skip_unreadable=skip_unreadable)
    val = ImageFolderSkipping(root / "val", transform=plain, skip_unreadable=skip_unreadable)
    return _with_transform(train, augment), train, val

"""Tiny on-disk datasets in the real formats, so the real torchvision loaders run without any download."""
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _write_pickle(path: Path, obj: dict) -> None:
    # The official batches are Python 2 pickles whose str keys torchvision reads with
    # encoding="latin1"; Python 3 str keys load the same way.
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def _cifar_batch(rng: np.random.Generator, per_class: int) -> dict:
    labels = [c for c in range(len(CIFAR_CLASSES)) for _ in range(per_class)]
    data = rng.integers(0, 256, size=(len(labels), 3 * 32 * 32), dtype=np.uint8)
    return {"batch_label": "tiny batch", "labels": labels, "data": data,
            "filenames": [f"img_{i}.png" for i in range(len(labels))]}


def _cifar_root(root: Path, per_class: int) -> Path:
    """``root`` with the official `cifar-10-batches-py` layout: 5 train batches of ``per_class`` images a class,
    2 test images a class."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for b in range(1, 6):
        _write_pickle(folder / f"data_batch_{b}", _cifar_batch(rng, per_class=per_class))
    _write_pickle(folder / "test_batch", _cifar_batch(rng, per_class=2))
    _write_pickle(folder / "batches.meta", {"label_names": CIFAR_CLASSES, "num_cases_per_batch": 10 * per_class,
                                            "num_vis": 3072})
    return root


@pytest.fixture(scope="session")
def cifar_root(tmp_path_factory) -> Path:
    """A CIFAR-10 root with the official `cifar-10-batches-py` layout: 5 train batches x 30 images, 20 test images."""
    return _cifar_root(tmp_path_factory.mktemp("cifar"), per_class=3)


@pytest.fixture(scope="session")
def cifar_root_2600(tmp_path_factory) -> Path:
    """The same layout with 2,600 training images: the 20 batches of 128 the quality bench reads."""
    return _cifar_root(tmp_path_factory.mktemp("cifar2600"), per_class=52)


@pytest.fixture(scope="session")
def imagefolder_root(tmp_path_factory) -> Path:
    """An ImageNet-style root of real digit images as 32x32 RGB PNGs: train/ (6 per class) and val/ (2 per class)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    root = tmp_path_factory.mktemp("imagefolder")
    for label in range(10):
        images = digits.images[digits.target == label][:8]
        for i, image in enumerate(images):
            split = "train" if i < 6 else "val"
            folder = root / split / f"digit_{label}"
            folder.mkdir(parents=True, exist_ok=True)
            gray = Image.fromarray((image * 255 / 16).astype(np.uint8)).resize((32, 32), Image.BILINEAR)
            gray.convert("RGB").save(folder / f"{i}.png")
    return root


@pytest.fixture(autouse=True)
def _seeded():
    """Every test starts from the same random state, whatever ran before it (a test's tiny model and data must
    not depend on the order pytest runs them in)."""
    import random

    import torch

    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)

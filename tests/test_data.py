"""Data builders on tiny real-format datasets, the digits demo, and the statistics/training loaders."""
import shutil
import warnings
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import Subset

from cdp_gfi.data.datasets import TensorImageDataset, cifar_datasets, digits_datasets, imagenet_datasets
from cdp_gfi.data.samplers import dataset_targets, make_loader, sample_loader


# --- CIFAR -------------------------------------------------------------------------------------

def test_cifar_loads_through_torchvision(cifar_root):
    train_aug, train_plain, test = cifar_datasets(str(cifar_root), check_integrity=False)
    assert (len(train_aug), len(train_plain), len(test)) == (150, 150, 20)
    assert train_aug.targets == train_plain.targets
    assert Counter(test.targets) == {c: 2 for c in range(10)}
    assert train_aug.data is train_plain.data, "the two train views share one copy of the images"
    image, label = train_plain[0]
    assert image.shape == (3, 32, 32) and label == train_plain.targets[0]
    # The plain view is ToTensor + Normalize of the stored pixels, nothing else.
    raw = torch.from_numpy(train_plain.data[0]).permute(2, 0, 1).float() / 255
    normalize = train_plain.transform.transforms[-1]
    mean, std = torch.tensor(normalize.mean), torch.tensor(normalize.std)
    assert torch.allclose(image, (raw - mean[:, None, None]) / std[:, None, None], atol=1e-6)
    assert train_aug[0][0].shape == (3, 32, 32)


def test_cifar_md5_check_rejects_unofficial_files(cifar_root):
    with pytest.raises(ValueError, match="check_integrity=False"):
        cifar_datasets(cifar_root)


def test_cifar_missing_paths_are_named(cifar_root, tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        cifar_datasets(missing)
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py"):
        cifar_datasets(tmp_path)
    with pytest.raises(FileNotFoundError, match="cifar-100-python"):
        cifar_datasets(cifar_root, dataset="cifar100")
    partial = tmp_path / "partial"
    shutil.copytree(cifar_root, partial)
    (partial / "cifar-10-batches-py" / "test_batch").unlink()
    with pytest.raises(FileNotFoundError, match="test_batch"):
        cifar_datasets(partial, check_integrity=False)
    with pytest.raises(ValueError, match="svhn"):
        cifar_datasets(cifar_root, dataset="svhn")


# --- ImageNet-style folders --------------------------------------------------------------------

def test_imagefolder_loads_and_shares_classes(imagefolder_root):
    train_aug, train_plain, val = imagenet_datasets(imagefolder_root, input_size=32)
    assert (len(train_aug), len(train_plain), len(val)) == (60, 60, 20)
    assert train_plain.classes == val.classes == [f"digit_{d}" for d in range(10)]
    assert Counter(val.targets) == {c: 2 for c in range(10)}
    for dataset in (train_aug, train_plain, val):
        image, label = dataset[7]
        assert image.shape == (3, 32, 32) and label == dataset.targets[7]
    assert torch.equal(train_plain[3][0], train_plain[3][0]), "the plain view is deterministic"


def test_imagefolder_missing_folders_are_named(imagefolder_root, tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        imagenet_datasets(tmp_path / "nowhere")
    root = tmp_path / "no_val"
    shutil.copytree(imagefolder_root / "train", root / "train")
    with pytest.raises(FileNotFoundError, match="val"):
        imagenet_datasets(root)
    with pytest.raises(ValueError, match="input_size"):
        imagenet_datasets(imagefolder_root, input_size=0)


def test_imagefolder_class_mismatch_lists_differences(imagefolder_root, tmp_path):
    root = tmp_path / "mismatch"
    shutil.copytree(imagefolder_root, root)
    (root / "val" / "digit_9").rename(root / "val" / "digit_nine")
    with pytest.raises(ValueError, match=r"only in train \[digit_9\].*only in val \[digit_nine\]"):
        imagenet_datasets(root)


@pytest.fixture
def corrupt_root(imagefolder_root, tmp_path):
    root = tmp_path / "corrupt"
    shutil.copytree(imagefolder_root, root)
    (root / "train" / "digit_0" / "0.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    return root


def test_unreadable_image_error_names_the_file(corrupt_root):
    _, train_plain, _ = imagenet_datasets(corrupt_root, input_size=32)
    index = [path for path, _ in train_plain.samples].index(str(corrupt_root / "train" / "digit_0" / "0.png"))
    with pytest.raises(ValueError, match=r"digit_0.0\.png"):
        train_plain[index]


def test_unreadable_image_is_skipped_and_counted(corrupt_root):
    _, train_plain, _ = imagenet_datasets(corrupt_root, input_size=32, skip_unreadable=True)
    bad = str(corrupt_root / "train" / "digit_0" / "0.png")
    index = [path for path, _ in train_plain.samples].index(bad)
    with pytest.warns(RuntimeWarning, match="1 skipped"):
        image, label = train_plain[index]
    assert image.shape == (3, 32, 32) and label == 0   # the next image of the folder stands in
    assert train_plain.skipped == [bad]
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # already counted: no second warning
        labels = labels_of(make_loader(train_plain, 16, shuffle=False))
    assert len(labels) == 60 and train_plain.skipped == [bad], "a file is counted once"


# --- digits --------------------------------------------------------------------------------------

def test_digits_sizes_and_normalization():
    train_aug, train_plain, test = digits_datasets()
    assert len(train_plain) + len(test) == 1797 and len(train_aug) == len(train_plain)
    assert len(test) == 360
    assert set(train_plain.targets) == set(test.targets) == set(range(10))
    counts = Counter(test.targets)
    assert max(counts.values()) - min(counts.values()) <= 2, "the split is stratified"
    image, label = train_plain[0]
    assert image.shape == (3, 32, 32) and isinstance(label, int)
    assert torch.equal(image[0], image[1]) and torch.equal(image[1], image[2])
    batch = torch.stack([train_plain[i][0] for i in range(len(train_plain))])
    assert abs(batch.mean()) < 1e-3 and abs(batch.std() - 1) < 1e-2


def test_digits_are_deterministic_per_seed():
    a, b = digits_datasets(seed=3), digits_datasets(seed=3)
    for x, y in zip(a, b):
        assert x.targets == y.targets and torch.equal(x.images, y.images)
    other = digits_datasets(seed=4)
    assert not torch.equal(a[2].images, other[2].images)
    with pytest.raises(ValueError, match="test_fraction"):
        digits_datasets(test_fraction=1.0)


def test_digits_augmentation_is_a_small_translation_without_flip():
    train_aug, train_plain, _ = digits_datasets()
    normalize = train_plain.transform
    mean, std = torch.tensor(normalize.mean)[:, None, None], torch.tensor(normalize.std)[:, None, None]
    torch.manual_seed(0)
    for index in range(20):
        raw = train_plain.images[index]
        shifted = train_aug[index][0] * std + mean
        padded = F.pad(raw, (2, 2, 2, 2))
        crops = [padded[:, dy:dy + 32, dx:dx + 32] for dy in range(5) for dx in range(5)]
        assert any(torch.allclose(shifted, crop, atol=1e-5) for crop in crops)


# --- loaders -------------------------------------------------------------------------------------

def labels_of(loader) -> list[int]:
    return [int(y) for _, ys in loader for y in ys]


def test_sample_loader_is_seeded_subset():
    _, train_plain, _ = digits_datasets()
    first = sample_loader(train_plain, batch_size=16, stop_batch=4, seed=1)
    again = sample_loader(train_plain, batch_size=16, stop_batch=4, seed=1)
    other = sample_loader(train_plain, batch_size=16, stop_batch=4, seed=2)
    assert len(first.dataset) == 64 and len(first) == 4
    assert first.dataset.indices == again.dataset.indices != other.dataset.indices
    xs = torch.cat([x for x, _ in first])
    assert torch.equal(xs, torch.cat([x for x, _ in again]))
    assert len(set(first.dataset.indices)) == 64
    assert first.dataset.indices != sorted(first.dataset.indices), "the subset is shuffled"
    assert len(sample_loader(train_plain, 100, None, seed=0).dataset) == len(train_plain)
    assert len(sample_loader(train_plain, 100, 1000, seed=0).dataset) == len(train_plain)


def test_sample_loader_class_balanced():
    _, train_plain, _ = digits_datasets()
    loader = sample_loader(train_plain, batch_size=10, stop_batch=3, seed=0, class_balanced=True)
    assert Counter(labels_of(loader)) == {c: 3 for c in range(10)}
    assert labels_of(loader) == labels_of(sample_loader(train_plain, 10, 3, seed=0, class_balanced=True))
    # Sorted by class, a plain prefix would see one class only; the balanced draw sees all of them.
    by_class = Subset(train_plain, sorted(range(len(train_plain)), key=lambda i: train_plain.targets[i]))
    assert len(Counter(labels_of(sample_loader(by_class, 20, 1, seed=5, class_balanced=True)))) == 10


def test_sample_loader_balances_uneven_classes():
    targets = [0] * 50 + [1] * 5 + [2] * 20
    dataset = TensorImageDataset(torch.zeros(len(targets), 1, 2, 2), targets, ["a", "b", "c"])
    loader = sample_loader(dataset, batch_size=10, stop_batch=3, seed=0, class_balanced=True)
    counts = Counter(dataset_targets(loader.dataset))
    assert counts[1] == 5 and abs(counts[0] - counts[2]) <= 1 and sum(counts.values()) == 30


def test_sample_loader_with_worker_matches_in_process():
    _, train_plain, _ = digits_datasets()
    in_process = sample_loader(train_plain, 32, 2, seed=3)
    with_worker = sample_loader(train_plain, 32, 2, seed=3, workers=1)
    assert with_worker.persistent_workers and with_worker.pin_memory == torch.cuda.is_available()
    assert labels_of(in_process) == labels_of(with_worker)


def test_loader_argument_errors():
    _, train_plain, _ = digits_datasets()
    with pytest.raises(ValueError, match="batch_size"):
        sample_loader(train_plain, 0, 1, seed=0)
    with pytest.raises(ValueError, match="stop_batch"):
        sample_loader(train_plain, 8, 0, seed=0)
    with pytest.raises(ValueError, match="targets"):
        sample_loader(torch.utils.data.TensorDataset(torch.zeros(4, 1)), 2, 1, seed=0, class_balanced=True)
    with pytest.raises(ValueError, match="sampler"):
        make_loader(train_plain, 8, shuffle=True, sampler=torch.utils.data.SequentialSampler(train_plain))
    with pytest.raises(ValueError, match="workers"):
        make_loader(train_plain, 8, shuffle=False, workers=-1)


def test_make_loader_shuffle_is_seeded():
    _, train_plain, _ = digits_datasets()
    first = labels_of(make_loader(train_plain, 64, shuffle=True, seed=7))
    assert first == labels_of(make_loader(train_plain, 64, shuffle=True, seed=7))
    assert first != labels_of(make_loader(train_plain, 64, shuffle=True, seed=8))
    assert len(make_loader(train_plain, 64, shuffle=False, drop_last=True)) == len(train_plain) // 64

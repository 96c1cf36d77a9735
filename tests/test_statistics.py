"""One-pass statistics: exact sums, untouched BatchNorm, multi-pass budget, file round trip, bad input."""
import copy

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from cdp_gfi import build_model
from cdp_gfi.data.samplers import ClassShardSampler, is_class_ordered, sample_loader
from cdp_gfi.data.datasets import TensorImageDataset
from cdp_gfi.statistics.store import Statistics, StatisticsError
from cdp_gfi.statistics.collect import collect_statistics, plan_gfi_passes

LAYERS = ["layer1.0.conv1", "layer2.1.conv1", "layer3.2.conv1"]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = build_model("resnet20", "cifar10")
    for mod in m.modules():  # non-trivial BN so "before BN" matters
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.2, 0.2)
            mod.running_var.uniform_(0.5, 1.5)
    return m.eval()


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(40, 3, 32, 32, generator=g)
    y = torch.arange(40) % 4  # 4 of 10 classes present
    return x, y


def _reference(model, x, y, name):
    """Conv outputs captured the plain way, then reduced by the formulas."""
    out = {}
    h = dict(model.named_modules())[name].register_forward_hook(lambda m, i, o: out.__setitem__("f", o))
    with torch.no_grad():
        model(x)
    h.remove()
    f = out["f"]
    a = f.clamp_min(0).mean((2, 3))
    cdp = torch.zeros(10, f.shape[1]).index_add_(0, y, a)
    counts = torch.bincount(y, minlength=10).float()
    class_mean = torch.zeros(10, *f.shape[1:]).index_add_(0, y, f) / counts.clamp_min(1).view(-1, 1, 1, 1)
    return cdp, a, class_mean.abs().mean((2, 3))


def test_sums_equal_reference_and_batchnorm_untouched(model, data):
    x, y = data
    before = copy.deepcopy(model.state_dict())
    model.train()  # collection must switch to eval and back
    loader = DataLoader(TensorDataset(x, y), batch_size=16)
    stats = collect_statistics(model, loader, LAYERS, ["cdp_class", "cdp_sample", "gfi"], progress=False)
    assert model.training
    model.eval()
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k  # running stats untouched
    assert stats.num_images == 40 and stats.class_counts.tolist() == [10, 10, 10, 10] + [0] * 6
    for name in LAYERS:
        cdp, a, gfi = _reference(model, x, y, name)
        assert torch.allclose(stats.cdp_class[name], cdp, atol=1e-4)
        assert torch.allclose(stats.cdp_sample[name], a, atol=1e-5)
        assert torch.allclose(stats.gfi[name], gfi, atol=1e-5)


def test_stop_batch_bounds_batches(model, data):
    x, y = data
    loader = DataLoader(TensorDataset(x, y), batch_size=8)
    stats = collect_statistics(model, loader, LAYERS, stop_batch=2, progress=False)
    assert stats.num_images == 16


def test_gfi_memory_budget_splits_passes_with_same_result(model, data):
    x, y = data
    loader = DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True)
    # per-layer sums: 10 x 16x32x32 x 4 B = 655 KB; 10 x 32x16x16 = 327 KB; 10 x 64x8x8 = 164 KB
    budget = 0.7 / 1024  # GB: ~717 KB -> passes [layer1], [layer2, layer3]
    shapes = {"a": [16, 32, 32], "b": [32, 16, 16], "c": [64, 8, 8]}
    assert plan_gfi_passes(shapes, 10, budget) == [["a"], ["b", "c"]]
    torch.manual_seed(5)
    one = collect_statistics(model, loader, LAYERS, ["gfi"], stop_batch=3, progress=False)
    torch.manual_seed(5)
    split = collect_statistics(model, loader, LAYERS, ["gfi"], stop_batch=3, memory_budget_gb=budget,
                               progress=False)
    for name in LAYERS:  # same shuffled images in every pass
        assert torch.allclose(one.gfi[name], split.gfi[name], atol=1e-6)


def test_class_ordered_gfi_equals_the_unordered_one(model, data):
    x, y = data
    dataset = TensorImageDataset(x, y.tolist(), [str(c) for c in range(10)])
    unordered = DataLoader(dataset, batch_size=6, shuffle=True, generator=torch.Generator().manual_seed(0))
    ordered = sample_loader(dataset, 6, None, seed=0, class_ordered=True)  # same images, class by class
    assert is_class_ordered(ordered) and not is_class_ordered(unordered)
    labels = [int(t) for _, yb in ordered for t in yb]
    assert labels == sorted(labels) and len(labels) == 40
    kinds = ["cdp_class", "gfi"]
    one = collect_statistics(model, unordered, LAYERS, kinds, num_classes=10, progress=False)
    two = collect_statistics(model, ordered, LAYERS, kinds, num_classes=10, progress=False)
    assert torch.equal(one.class_counts, two.class_counts)
    for name in LAYERS:
        torch.testing.assert_close(two.gfi[name], one.gfi[name], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(two.gfi[name], _reference(model, x, y, name)[2], rtol=1e-5, atol=1e-7)
    with pytest.raises(StatisticsError, match="not in class order"):
        collect_statistics(model, unordered, LAYERS, ["gfi"], num_classes=10, progress=False, class_ordered=True)


def test_class_shards_give_each_process_whole_classes():
    targets = [3, 1, 1, 2, 0, 0, 0, 2, 3, 3, 1]
    for world in (1, 2, 3, 4):
        shards = [list(ClassShardSampler(targets, world, rank)) for rank in range(world)]
        assert sorted(p for shard in shards for p in shard) == list(range(len(targets)))
        classes = [{targets[p] for p in shard} for shard in shards]
        assert all(classes) and sum(map(len, classes)) == 4  # no class split, none empty
    with pytest.raises(ValueError, match="fewer than the 5 processes"):
        ClassShardSampler(targets, 5, 0)


def test_file_round_trip_and_mismatch(model, data, tmp_path):
    x, y = data
    stats = collect_statistics(model, DataLoader(TensorDataset(x, y), batch_size=20), LAYERS,
                               progress=False, meta={"model": "resnet20"})
    path = tmp_path / "stats.pt"
    stats.save(str(path))
    back = Statistics.load(str(path), model)
    assert torch.equal(back.cdp_class[LAYERS[0]], stats.cdp_class[LAYERS[0]])
    other = build_model("vgg11", "cifar10")
    with pytest.raises(StatisticsError, match="does not match this model"):
        Statistics.load(str(path), other)
    with pytest.raises(StatisticsError, match="no data for layers"):
        back.check_layers(["layer1.1.conv1"])
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(StatisticsError, match="not a readable statistics file"):
        Statistics.load(str(tmp_path / "junk.pt"))


def test_bad_input(model, data):
    x, y = data
    with pytest.raises(StatisticsError, match="no batches"):
        collect_statistics(model, DataLoader(TensorDataset(x[:0], y[:0]), batch_size=4), LAYERS, progress=False)
    unlabelled = DataLoader(TensorDataset(x), batch_size=8)
    with pytest.raises(StatisticsError, match="need labels"):
        collect_statistics(model, unlabelled, LAYERS, ["cdp_class"], progress=False)
    stats = collect_statistics(model, unlabelled, LAYERS, ["cdp_sample"], progress=False)  # needs no labels
    assert stats.cdp_sample[LAYERS[0]].shape == (40, 16)
    broken = copy.deepcopy(model)
    with torch.no_grad():
        broken.layer2[1].conv1.weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(StatisticsError, match="layer2.1.conv1"):
        collect_statistics(broken, DataLoader(TensorDataset(x, y), batch_size=8), LAYERS, progress=False)
    with pytest.raises(StatisticsError, match="Conv2d"):
        collect_statistics(model, unlabelled, ["fc"], ["cdp_sample"], progress=False)


def test_progress_bar_counts_the_batches_the_data_gives():
    from cdp_gfi.statistics.collect import _pass_length

    loader = DataLoader(TensorDataset(torch.zeros(23, 3, 8, 8), torch.zeros(23, dtype=torch.long)), batch_size=1)
    assert _pass_length(loader, 200) == 23 and _pass_length(loader, 5) == 5 and _pass_length(loader, None) == 23
    assert _pass_length((batch for batch in loader), 200) == 200  # no length known: the requested batches

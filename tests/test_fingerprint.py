"""Statistics fingerprints: a real hash of the weights, every field compared, a mismatch named."""
import pytest
import torch
from torch import nn

from cdp_gfi.statistics.fingerprint import FingerprintMismatchError, check_fingerprint, fingerprint, weights_sha256
from cdp_gfi.statistics.store import Statistics


def net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))


def settings(**change):
    return {**dict(model="resnet20", dataroot=None, seed=0, stop_batch=2, batch_size=8, input_size=32,
                   scope="internal", feature_site="output", extra={"dataset": "cifar10"}), **change}


def test_hash_tells_apart_weights_that_a_float_sum_cannot():
    a = net()
    b = net()
    with torch.no_grad():
        b[0].weight.copy_(a[0].weight.flip(0))  # filters swapped: same sum of |w|, other network
    assert sum(t.abs().sum() for t in a.state_dict().values()) == sum(t.abs().sum() for t in b.state_dict().values())
    assert weights_sha256(a) != weights_sha256(b)
    assert weights_sha256(a) == weights_sha256(net()) == weights_sha256(net().state_dict())


def test_statistics_file_from_other_weights_is_refused_naming_the_field(tmp_path):
    model = net()
    stats = Statistics(layers={"0": [4, 3, 3, 3]}, num_classes=2, num_images=4, class_counts=torch.tensor([2, 2]),
                       meta={"fingerprint": fingerprint(model, **settings())})
    stats.save(str(tmp_path / "stats.pth"))
    back = Statistics.load(str(tmp_path / "stats.pth"), model, fingerprint=fingerprint(model, **settings()))
    assert back.meta["fingerprint"]["batch_size"] == 8
    other = net()
    with torch.no_grad():
        other[1].running_mean.add_(1e-3)
    with pytest.raises(FingerprintMismatchError, match=r"from other weights: weights_sha256 '[0-9a-f]{12}' in file"):
        Statistics.load(str(tmp_path / "stats.pth"), other, fingerprint=fingerprint(other, **settings()))
    for change, named in ((dict(seed=1), "seed 0 in file, 1 now"), (dict(scope="all"), "scope 'internal'"),
                          (dict(feature_site="input"), "feature_site 'output' in file, 'input' now"),
                          (dict(extra={"dataset": "cifar100"}), "extra.dataset 'cifar10' in file, 'cifar100' now")):
        with pytest.raises(FingerprintMismatchError, match="other settings: " + named):
            Statistics.load(str(tmp_path / "stats.pth"), model, fingerprint=fingerprint(model, **settings(**change)))


def test_file_without_a_fingerprint_is_refused():
    with pytest.raises(FingerprintMismatchError, match="records no fingerprint"):
        check_fingerprint(None, fingerprint(net(), **settings()), "statistics file 'old.pth'")

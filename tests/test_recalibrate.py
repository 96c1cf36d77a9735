"""BatchNorm re-estimation after pruning: only running statistics change, and a pruned network gets better."""
import copy

import pytest
import torch
from torch import nn

from cdp_gfi import apply_masks, recalibrate_batchnorm, select, to_nni_masks
from cdp_gfi.data.datasets import digits_datasets
from cdp_gfi.data.samplers import make_loader
from cdp_gfi.graph.trace import trace
from cdp_gfi.train.loop import evaluate


def _tiny_cnn() -> nn.Module:
    def block(cin, cout):
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]
    return nn.Sequential(*block(3, 16), nn.MaxPool2d(2), *block(16, 24), nn.MaxPool2d(2), *block(24, 24),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(24, 10))


@pytest.fixture(scope="module")
def trained():
    """A small CNN trained for two epochs on the real digits: (model, train loader, test loader)."""
    torch.manual_seed(0)
    train, plain, test = digits_datasets(0)
    model = _tiny_cnn()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(2):
        model.train()
        for x, y in make_loader(train, 64, shuffle=True):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
    return model.eval(), make_loader(plain, 64, shuffle=True, seed=1), make_loader(test, 128, shuffle=False)


def test_recalibration_changes_only_running_statistics_and_raises_top1(trained):
    model, train, test = trained
    graph = trace(model, torch.zeros(1, 3, 32, 32))
    convs = ["0", "4"]
    l1 = {n: graph.modules[n].weight.detach().abs().sum(dim=(1, 2, 3)) for n in convs}
    keep, _ = select("cdp", l1, sparsity=0.5, max_layer_sparsity=0.6, graph=graph)
    pruned = apply_masks(copy.deepcopy(model), to_nni_masks(model, keep), graph)
    before = {k: v.clone() for k, v in pruned.state_dict().items()}
    top1_before = evaluate(pruned, test, "cpu", disable_progress=True)["top1"]

    recalibrate_batchnorm(pruned, train, batches=10, progress=False)

    after = pruned.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.rsplit(".", 1)[1] in ("running_mean", "running_var", "num_batches_tracked")
                           for k in changed)
    assert not pruned.training and all(m.momentum == 0.1 for m in pruned.modules() if isinstance(m, nn.BatchNorm2d))
    top1_after = evaluate(pruned, test, "cpu", disable_progress=True)["top1"]
    assert top1_after > top1_before


def test_recalibration_refuses_more_batches_than_the_loader_has(trained):
    model, train, _ = trained
    with pytest.raises(ValueError, match="wanted 1000 batches, the loader gave 23"):
        recalibrate_batchnorm(copy.deepcopy(model), train, batches=1000, progress=False)
    with pytest.raises(ValueError, match="must be an integer >= 0"):
        recalibrate_batchnorm(copy.deepcopy(model), train, batches=-2, progress=False)

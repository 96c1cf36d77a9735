"""Composing with NNI's own pruners: L1/FPGM/Taylor masks, merging, agreement tables, evaluators for scores."""
import copy

import nni
import pytest
import torch
from nni.compression import TorchEvaluator
from torch.utils.data import DataLoader, TensorDataset

from cdp_gfi import CDPPruner, GFIPruner, apply_masks, build_model, compute_scores, slim
from cdp_gfi.masks.compare import mask_agreement, merge_masks, nni_masks
from cdp_gfi.flops import keep_vectors
from cdp_gfi.graph.trace import trace

CONFIG = [{"op_types": ["Conv2d"], "sparse_ratio": 0.5}]
DUMMY = torch.zeros(1, 3, 32, 32)


@pytest.fixture(scope="module")
def base():
    torch.manual_seed(0)
    return build_model("resnet20", "cifar10").eval()


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(2)
    return torch.randn(32, 3, 32, 32, generator=g), torch.arange(32) % 10


@pytest.fixture(scope="module")
def loader(data):
    return DataLoader(TensorDataset(*data), batch_size=16)


def evaluator_for(model, loader) -> TorchEvaluator:
    """A tiny NNI TorchEvaluator whose training loop cycles ``loader`` for max_steps steps."""
    def training_func(model, optimizers, training_step, lr_schedulers=None, max_steps=None, max_epochs=None):
        step = 0
        while True:
            for batch in loader:
                loss = training_step(batch, model)
                loss.backward()
                optimizers.step()
                optimizers.zero_grad()
                step += 1
                if step >= max_steps:
                    return

    def training_step(batch, model):
        return torch.nn.functional.cross_entropy(model(batch[0]), batch[1])

    optimizer = nni.trace(torch.optim.SGD)(model.parameters(), lr=0.01)
    return TorchEvaluator(training_func, optimizer, training_step, dummy_input=DUMMY)


@pytest.fixture(scope="module")
def cdp(base, loader):
    pruner = CDPPruner(copy.deepcopy(base), CONFIG, loader, stop_batch=2, progress=False)
    _, masks = pruner.compress()
    pruner.unwrap_model()
    return pruner.layers, masks


def test_cdp_vs_l1_table_has_one_row_per_layer_in_unit_range(base, cdp):
    layers, masks = cdp
    l1 = nni_masks(base, CONFIG, "l1", layers=layers)
    assert set(l1) == set(layers)
    for name, kept in keep_vectors(l1).items():
        assert int((~kept).sum()) == kept.numel() // 2  # NNI: sparse_ratio per layer
    table = mask_agreement(masks, l1)
    assert sorted(table["layer"]) == sorted(layers)
    assert table[["jaccard", "agreement"]].apply(lambda c: c.between(0, 1)).all().all()
    assert (table["pruned_both"] <= table[["pruned_a", "pruned_b"]].min(axis=1)).all()
    same = mask_agreement(masks, masks)
    assert (same["jaccard"] == 1).all() and (same["agreement"] == 1).all()


@pytest.mark.parametrize("how", ["and", "or"])
def test_merged_masks_slim_to_the_masked_network(base, cdp, data, how):
    layers, masks = cdp
    merged = merge_masks(masks, nni_masks(base, CONFIG, "fpgm", layers=layers), how)
    ka, km = keep_vectors(masks), keep_vectors(merged)
    for name in layers:
        assert bool((km[name] <= ka[name]).all()) if how == "and" else bool((km[name] >= ka[name]).all())
    masked = apply_masks(copy.deepcopy(base), merged, trace(base, DUMMY))
    slimmed = slim(copy.deepcopy(base), merged, DUMMY)
    assert sum(p.numel() for p in slimmed.parameters()) < sum(p.numel() for p in base.parameters())
    with torch.no_grad():
        assert torch.allclose(slimmed(data[0]), masked(data[0]), atol=1e-4)


def test_taylor_masks_leave_the_model_untouched(base, cdp, loader):
    layers, masks = cdp
    before = copy.deepcopy(base.state_dict())
    taylor = nni_masks(base, CONFIG, "taylor", evaluator_for(base, loader), layers=layers, training_steps=2)
    assert set(taylor) == set(layers)
    assert all(torch.equal(v, before[k]) for k, v in base.state_dict().items())
    assert len(mask_agreement(masks, taylor)) == len(layers)


def test_gfi_merges_with_l1_on_one_side_only(base, loader):
    pruner = GFIPruner(copy.deepcopy(base), [{"op_names": ["layer1.0.conv1"], "sparse_ratio": 0.5}], loader,
                       stop_batch=1, progress=False)
    _, gfi = pruner.compress()
    l1 = nni_masks(base, [{"op_names": ["layer2.0.conv1"], "sparse_ratio": 0.25}])
    both = keep_vectors(merge_masks(gfi, l1, "and"))
    assert set(both) == {"layer1.0.conv1", "layer2.0.conv1"}
    assert torch.equal(both["layer2.0.conv1"], keep_vectors(l1)["layer2.0.conv1"])
    assert keep_vectors(merge_masks(gfi, l1, "or"))["layer2.0.conv1"].all()
    assert mask_agreement(gfi, l1).empty


def test_bad_requests(base, cdp):
    _, masks = cdp
    with pytest.raises(ValueError, match="unknown NNI pruner"):
        nni_masks(base, CONFIG, "apoz")
    with pytest.raises(ValueError, match="TorchEvaluator"):
        nni_masks(base, CONFIG, "taylor")
    with pytest.raises(ValueError, match="'and' or 'or'"):
        merge_masks(masks, masks, "xor")
    name = next(iter(masks))
    kept = keep_vectors(masks)[name]
    flipped = {name: {"weight": masks[name]["weight"] * 0 + (~kept).float().view(-1, 1, 1, 1), "bias": None}}
    with pytest.raises(ValueError, match="removes every filter"):
        merge_masks({name: masks[name]}, flipped, "and")


@pytest.mark.parametrize("method", ["cdp", "gfi"])
def test_compute_scores_takes_a_torch_evaluator(base, loader, method):
    before = copy.deepcopy(base.state_dict())
    direct = compute_scores(base, loader, method, stop_batch=2, progress=False)
    via = compute_scores(base, evaluator_for(base, loader), method, stop_batch=2, progress=False)
    assert set(via) == set(direct)
    for name in direct:
        assert torch.allclose(via[name], direct[name])
    assert all(torch.equal(v, before[k]) for k, v in base.state_dict().items())

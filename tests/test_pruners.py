"""CDPPruner / GFIPruner as NNI pruners: DataLoader or TorchEvaluator, config lists, masks format."""
import copy

import nni
import pytest
import torch
from nni.compression import TorchEvaluator
from torch.utils.data import DataLoader, TensorDataset

from cdp_gfi import CDPPruner, GFIPruner, build_model, compute_scores, count_flops
from cdp_gfi.statistics.collect import collect_statistics

CONFIG = [{"op_types": ["Conv2d"], "sparse_ratio": 0.5}]
SCOPE = [f"layer{s}.{b}.conv1" for s in (1, 2, 3) for b in range(3)]


@pytest.fixture(scope="module")
def base():
    torch.manual_seed(0)
    return build_model("resnet20", "cifar10").eval()


@pytest.fixture(scope="module")
def loader():
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(48, 3, 32, 32, generator=g), torch.arange(48) % 10
    return DataLoader(TensorDataset(x, y), batch_size=16)


@pytest.mark.parametrize("cls,opts", [(CDPPruner, {"published": True}), (CDPPruner, {}), (CDPPruner, {"cdp_mode": "classwise"}),
                                      (GFIPruner, {}), (GFIPruner, {"published": True})])
def test_masks_in_nni_format_over_default_scope(base, loader, cls, opts):
    model = copy.deepcopy(base)
    pruner = cls(model, CONFIG, loader, stop_batch=2, progress=False, **opts)
    out, masks = pruner.compress()
    assert out is model and set(masks) == set(SCOPE)
    convs = dict(base.named_modules())
    for name, m in masks.items():
        assert m["weight"].shape == convs[name].weight.shape
        assert set(m["weight"].unique().tolist()) <= {0.0, 1.0}
    pruner.unwrap_model()
    assert type(model.layer1[0].conv1) is torch.nn.Conv2d
    removed = sum(int((~k).sum()) for k in pruner.keep.values())
    total = sum(k.numel() for k in pruner.keep.values())
    if cls is CDPPruner and opts.get("published"):
        assert removed == round(0.5 * total)  # the paper's one global ranking: exactly the requested number
    else:
        assert removed > 0 and all(k.any() for k in pruner.keep.values())


def test_scores_match_compute_scores(base, loader):
    model = copy.deepcopy(base)
    pruner = CDPPruner(model, CONFIG, loader, stop_batch=2, progress=False, published=True)
    pruner.compress()
    direct = compute_scores(base, loader, "cdp", stop_batch=2, progress=False)  # the paper's CDP
    assert set(direct) == set(SCOPE)
    for name in SCOPE:
        assert torch.allclose(pruner.scores[name], direct[name])


def test_torch_evaluator_feeds_batches_and_trains_nothing(base, loader):
    def training_func(model, optimizers, training_step, lr_schedulers=None, max_steps=None, max_epochs=None):
        step = 0
        while True:
            for batch in loader:
                model.train()
                loss = training_step(batch, model)
                loss.backward()
                optimizers.step()
                optimizers.zero_grad()
                step += 1
                if max_steps is not None and step >= max_steps:
                    return

    def training_step(batch, model):
        x, y = batch
        return torch.nn.functional.cross_entropy(model(x), y)

    model = copy.deepcopy(base)
    before = copy.deepcopy(model.state_dict())
    optimizer = nni.trace(torch.optim.SGD)(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    evaluator = TorchEvaluator(training_func, optimizer, training_step, dummy_input=torch.zeros(1, 3, 32, 32))
    pruner = CDPPruner(model, CONFIG, evaluator, stop_batch=2, progress=False)
    _, masks = pruner.compress()
    pruner.unwrap_model()
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k  # no training step, BN stats untouched
    ref = CDPPruner(copy.deepcopy(base), CONFIG, loader, stop_batch=2, progress=False)
    _, ref_masks = ref.compress()
    for name in SCOPE:
        assert torch.equal(masks[name]["weight"], ref_masks[name]["weight"])


def test_config_list_narrows_and_bad_entries(base, loader):
    model = copy.deepcopy(base)
    cfg = [{"op_types": ["Conv2d"], "exclude_op_names": ["layer1.0.conv1"], "sparse_ratio": 0.3}]
    _, masks = CDPPruner(model, cfg, loader, stop_batch=1, progress=False).compress()
    assert set(masks) == set(SCOPE) - {"layer1.0.conv1"}
    with pytest.raises(ValueError, match="matches no prunable conv"):
        CDPPruner(copy.deepcopy(base), [{"op_names": ["layer1.0.conv2"], "sparse_ratio": 0.5}], loader)
    with pytest.raises(ValueError, match="sparse_ratio"):
        CDPPruner(copy.deepcopy(base), [{"op_types": ["Conv2d"], "sparse_ratio": 1.2}], loader)
    with pytest.raises(ValueError, match="unknown cdp_mode"):
        CDPPruner(copy.deepcopy(base), CONFIG, loader, cdp_mode="bogus")


def test_flops_target_and_reused_statistics(base, loader):
    stats = collect_statistics(base, loader, SCOPE, ["gfi"], stop_batch=2, progress=False)
    model = copy.deepcopy(base)
    pruner = GFIPruner(model, [{"op_types": ["Conv2d"]}], statistics=stats, flops_reduction=0.4,
                       dummy_input=torch.zeros(1, 3, 32, 32))
    _, masks = pruner.compress()
    pruner.unwrap_model()
    dense, _ = count_flops(model, (3, 32, 32))
    pruned, _ = count_flops(model, (3, 32, 32), masks=masks)
    assert abs(1 - pruned / dense - 0.4) <= 0.005
    wrong = collect_statistics(base, loader, SCOPE, ["cdp_class"], stop_batch=1, progress=False)
    with pytest.raises(ValueError, match="'gfi'"):
        GFIPruner(copy.deepcopy(base), CONFIG, statistics=wrong, dummy_input=torch.zeros(1, 3, 32, 32)).compress()


def test_flops_reduction_and_max_layer_sparsity_as_config_keys(base, loader):
    stats = collect_statistics(base, loader, SCOPE, ["gfi"], stop_batch=1, progress=False)
    dummy = torch.zeros(1, 3, 32, 32)

    def keep_of(config, **kwargs):
        pruner = GFIPruner(copy.deepcopy(base), config, statistics=stats, dummy_input=dummy, **kwargs)
        pruner.compress()
        return pruner.keep

    as_key = keep_of([{"op_types": ["Conv2d"], "flops_reduction": 0.4}])
    as_keyword = keep_of([{"op_types": ["Conv2d"]}], flops_reduction=0.4)
    assert all(torch.equal(as_key[n], as_keyword[n]) for n in as_keyword)
    capped = keep_of([{"op_types": ["Conv2d"], "sparse_ratio": 0.5, "max_layer_sparsity": 0.55}])
    by_keyword = keep_of([{"op_types": ["Conv2d"], "sparse_ratio": 0.5}], max_layer_sparsity=0.55)
    assert all(torch.equal(capped[n], v) for n, v in by_keyword.items())
    assert all((~k).sum() <= 0.55 * k.numel() for k in capped.values())
    legacy = keep_of([{"op_types": ["Conv2d"], "sparsity": 0.5}])  # NNI 2.x spelling
    assert all(torch.equal(legacy[n], v) for n, v in keep_of([{"op_types": ["Conv2d"], "sparse_ratio": 0.5}]).items())
    with pytest.raises(ValueError, match="sets no target: give it sparse_ratio .* or flops_reduction"):
        keep_of([{"op_types": ["Conv2d"]}])
    with pytest.raises(ValueError, match="not both"):
        keep_of([{"op_types": ["Conv2d"], "sparse_ratio": 0.5, "flops_reduction": 0.4}])
    with pytest.raises(ValueError, match="give it once"):
        keep_of([{"op_types": ["Conv2d"], "flops_reduction": 0.4}], flops_reduction=0.3)

"""Slimming every model family: outputs equal the masked network, counts equal mask-aware counts."""
import copy

import pytest
import torch

from cdp_gfi import apply_masks, build_model, count_flops, slim, to_nni_masks
from cdp_gfi.graph.trace import trace
from cdp_gfi.masks.select import select
from cdp_gfi.graph.scope import default_scope
from nets import randomized_bn

FAMILIES = [("resnet20", "cifar10", 32), ("vgg11", "cifar10", 32),
            ("resnet18", "imagenet", 64), ("resnet50", "imagenet", 64), ("vgg11", "imagenet", 32)]


@pytest.mark.parametrize("name,dataset,size", FAMILIES)
def test_slim_equals_masked_and_counts(name, dataset, size):
    torch.manual_seed(0)
    model = build_model(name, dataset).eval()
    randomized_bn(model)
    x = torch.randn(2, 3, size, size)
    graph = trace(model, x)
    scope = default_scope(graph)
    scores = {n: torch.rand(graph.modules[n].out_channels) for n in scope}
    keep, _ = select("cdp", scores, sparsity=0.5)
    masks = to_nni_masks(model, keep)
    masked_out = apply_masks(copy.deepcopy(model), masks, graph)(x)
    expected = {conv: counts for conv in ("conv-linear", "ptflops")
                for counts in [count_flops(model, (3, size, size), conv, masks)]}
    slim(model, masks, x[:1])
    assert (model(x) - masked_out).abs().max().item() <= 1e-4
    modules = dict(model.named_modules())
    for conv in scope:
        assert modules[conv].out_channels == int(keep[conv].sum())  # physically smaller
    for conv, counts in expected.items():
        assert count_flops(model, (3, size, size), conv) == counts


def test_slim_refuses_a_wrapped_model():
    from cdp_gfi import CDPPruner
    model = build_model("resnet20", "cifar10").eval()
    x = torch.randn(8, 3, 32, 32)
    loader = [(x, torch.arange(8))]
    pruner = CDPPruner(model, [{"op_types": ["Conv2d"], "sparse_ratio": 0.3}], loader, progress=False)
    _, masks = pruner.compress()
    with pytest.raises(ValueError, match="unwrap_model"):
        slim(model, masks, x[:1])

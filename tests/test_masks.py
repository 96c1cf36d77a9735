"""Global ranking, ties, caps, GFI-AP's adaptive threshold and FLOPs targets."""
import math

import pytest
import torch

from cdp_gfi import build_model, count_flops, to_nni_masks
from cdp_gfi.graph.trace import trace
from cdp_gfi.masks.select import LayerEmptiedError, select, select_by_count, select_by_threshold
from cdp_gfi.graph.scope import default_scope


def test_global_ranking_removes_exact_count_across_layers():
    scores = {"a": torch.tensor([0.1, 0.9, 0.5]), "b": torch.tensor([0.2, 0.05, 0.8, 0.3])}
    keep = select_by_count(scores, 3)
    assert keep["a"].tolist() == [False, True, True]
    assert keep["b"].tolist() == [False, False, True, True]


def test_ties_broken_by_tf_then_position():
    scores = {"a": torch.tensor([0.0, 0.0]), "b": torch.tensor([0.0, 0.0])}
    tf = {"a": torch.tensor([0.3, 0.1]), "b": torch.tensor([0.1, 0.2])}
    keep = select_by_count(scores, 2, tf)
    # lowest tf go first: a[1] (0.1) and b[0] (0.1, later position than a[1])
    assert keep["a"].tolist() == [True, False]
    assert keep["b"].tolist() == [False, True]
    assert select_by_count(scores, 2, tf)["b"].tolist() == keep["b"].tolist()  # deterministic


def test_emptying_a_layer_is_an_error_naming_it():
    scores = {"a": torch.tensor([0.01, 0.02]), "b": torch.tensor([0.5, 0.6, 0.7])}
    with pytest.raises(LayerEmptiedError, match="'a'"):
        select_by_count(scores, 2)
    keep = select_by_count(scores, 2, max_layer_sparsity=0.5)  # cap redistributes
    assert keep["a"].sum() == 1 and keep["b"].sum() == 2


def test_gfi_adaptive_threshold_and_cap():
    scores = {"a": torch.tensor([0.1, 0.2, 0.3, 0.4]), "b": torch.tensor([0.9, 0.8, 0.05, 0.7])}
    p = 0.4  # total 8: T = sorted[floor(3.2)] = sorted[3] = 0.3 -> prune <= 0.3: a0, a1, a2, b2
    keep = select_by_threshold(scores, p)
    # cap: floor((1 + 0.4) / 2 * 4) = 2 per layer -> a keeps its highest two of the three below T
    assert keep["a"].tolist() == [False, False, True, True]
    assert keep["b"].tolist() == [True, True, False, True]
    assert math.floor((1 + p) / 2 * 4) == 2


def test_sparsity_out_of_range_and_both_targets():
    scores = {"a": torch.rand(4)}
    for bad in (0, 1, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="sparsity"):
            select("cdp", scores, sparsity=bad)
    with pytest.raises(ValueError, match="exactly one"):
        select("cdp", scores, sparsity=0.5, flops_reduction=0.5)


@pytest.mark.parametrize("method", ["cdp", "gfi"])
def test_flops_target_met_within_half_a_point(method):
    model = build_model("resnet56", "cifar10")
    graph = trace(model, torch.zeros(1, 3, 32, 32))
    torch.manual_seed(0)
    names = default_scope(graph)
    scores = {n: torch.rand(graph.modules[n].out_channels) for n in names}
    keep, _ = select(method, scores, flops_reduction=0.3, graph=graph)
    dense, _ = count_flops(model, (3, 32, 32))
    pruned, _ = count_flops(model, (3, 32, 32), masks=to_nni_masks(model, keep))
    assert abs((1 - pruned / dense) - 0.3) <= 0.005
    with pytest.raises(ValueError, match="cannot remove 99.00% of MACs"):
        select(method, scores, flops_reduction=0.99, graph=graph)

"""Criterion variants: where feature maps are read, how layers' scores are normalised, how MACs weigh in."""
import pytest
import torch
from torch import nn

from cdp_gfi import build_model, collect_statistics, select
from cdp_gfi.graph.trace import trace
from cdp_gfi.graph.groups import internal_units
from cdp_gfi.masks.select import group_costs
from cdp_gfi.scores.ranking import cost_weighted, normalize, weight_scaled
from cdp_gfi.graph.readers import filter_weights
from cdp_gfi.graph.scope import default_scope
from cdp_gfi.graph.sites import read_points
from cdp_gfi.masks.variants import DEFAULTS, PUBLISHED, Variant, resolve_variant


def test_read_points_of_a_resnet_block_and_a_vgg_head():
    graph = trace(build_model("resnet20", "cifar10"), torch.zeros(1, 3, 32, 32))
    assert read_points(graph, ["layer2.1.conv1"], "conv") == {"layer2.1.conv1": ("layer2.1.conv1", "output")}
    assert read_points(graph, ["layer2.1.conv1"], "bn") == {"layer2.1.conv1": ("layer2.1.bn1", "output")}
    assert read_points(graph, ["layer2.1.conv1"], "input") == {"layer2.1.conv1": ("layer2.1.conv2", "input")}
    vgg = trace(build_model("vgg11", "cifar10"), torch.zeros(1, 3, 32, 32))
    last = default_scope(vgg)[-1]
    assert read_points(vgg, [last], "input") == {last: ("classifier.0", "input")}  # through pool and flatten
    with pytest.raises(ValueError, match="unknown feature site 'relu'"):
        read_points(graph, ["layer2.1.conv1"], "relu")


def test_statistics_at_the_input_site_are_what_the_next_layer_reads():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Conv2d(4, 6, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3)).eval()
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1)
    x, y = torch.randn(12, 3, 8, 8), torch.arange(12) % 3
    graph = trace(model, x[:1])
    stats = collect_statistics(model, [(x, y)], ["0"], ("cdp_sample", "gfi"), num_classes=3, progress=False,
                               read_at=read_points(graph, ["0"], "input"))
    seen = model[:4](x)  # what conv "4" reads: after BN, ReLU and pooling
    assert torch.allclose(stats.cdp_sample["0"], seen.mean(dim=(2, 3)), atol=1e-6)
    class_means = torch.stack([seen[y == k].mean(0) for k in range(3)])
    assert torch.allclose(stats.gfi["0"], class_means.abs().mean(dim=(2, 3)), atol=1e-6)


def test_vgg_last_conv_read_through_flatten_into_the_linear():
    model = build_model("vgg11", "cifar10").eval()
    graph = trace(model, torch.zeros(1, 3, 32, 32))
    last = default_scope(graph)[-1]
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    stats = collect_statistics(model, [(x, y)], [last], ("cdp_sample",), num_classes=10, progress=False,
                               read_at=read_points(graph, [last], "input"))
    assert stats.cdp_sample[last].shape == (4, 512)
    assert torch.allclose(stats.cdp_sample[last], torch.flatten(model.features(x), 1), atol=1e-5)


def test_normalizations_keep_each_layers_order_and_rescale_it():
    scores = {"a": torch.tensor([1.0, 3.0, 2.0]), "b": torch.tensor([10.0, 30.0])}
    assert torch.allclose(normalize(scores, "mean")["a"], torch.tensor([0.5, 1.5, 1.0]))
    assert torch.allclose(normalize(scores, "max")["b"], torch.tensor([1 / 3, 1.0]))
    assert torch.allclose(normalize(scores, "rank")["a"], torch.tensor([1 / 3, 1.0, 2 / 3]))
    assert normalize(scores, "none")["b"].tolist() == [10.0, 30.0]
    with pytest.raises(ValueError, match="unknown score normalization"):
        normalize(scores, "zscore")
    weighted = cost_weighted(scores, {"a": 300.0, "b": 100.0}, 1.0)  # mean cost 200
    assert torch.allclose(weighted["a"], scores["a"] / 1.5) and torch.allclose(weighted["b"], scores["b"] / 0.5)


def test_cost_power_prunes_expensive_layers_first():
    graph = trace(build_model("resnet20", "cifar10"), torch.zeros(1, 3, 32, 32))
    scope = default_scope(graph)
    units = internal_units(graph)
    costs = group_costs(graph, units, {n: graph.modules[n].out_channels for n in scope})
    assert costs["layer1.1.conv1"] == pytest.approx(4 * costs["layer3.1.conv1"])  # 32x32 vs 8x8, 16 vs 64 wide
    flat = {n: torch.ones(graph.modules[n].out_channels) + 1e-3 * torch.arange(graph.modules[n].out_channels)
            for n in scope}
    plain, _ = select("cdp", flat, flops_reduction=0.3, graph=graph)
    costly, _ = select("cdp", flat, flops_reduction=0.3, graph=graph, cost_power=1.0)
    removed = lambda keep, stage: sum(int((~keep[n]).sum()) for n in scope if n.startswith(stage))  # noqa: E731
    assert removed(costly, "layer1") > removed(plain, "layer1")
    assert sum(int((~k).sum()) for k in costly.values()) < sum(int((~k).sum()) for k in plain.values())


def test_variants_published_default_and_overrides():
    assert resolve_variant("cdp", published=True) == PUBLISHED["cdp"] == Variant("conv", "none", 0.0)
    assert resolve_variant("gfi") == DEFAULTS["gfi"]
    assert resolve_variant("cdp", published=True, site="bn").site == "bn"
    assert PUBLISHED["cdp"].label("cdp") == "cdp[published]"
    with pytest.raises(ValueError, match="--normalize must be one of"):
        resolve_variant("cdp", normalize="zscore")
    with pytest.raises(ValueError, match="--cost_power must be >= 0"):
        resolve_variant("gfi", cost_power=-1)
    with pytest.raises(ValueError, match="--weight_power must be >= 0"):
        resolve_variant("cdp", weight_power=-0.5)
    assert resolve_variant("cdp", published=True, weight_power=1).label("cdp").endswith(",weight1]")


def test_filter_weights_are_the_filters_norm_times_the_norm_of_what_reads_its_channel():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 5, 3, padding=1),
                          nn.ReLU(), nn.MaxPool2d(4), nn.Flatten(), nn.Linear(5 * 2 * 2, 3)).eval()
    graph = trace(model, torch.zeros(1, 3, 8, 8))
    weights = filter_weights(graph, ["0", "3"])
    own0, own3 = model[0].weight.flatten(1).norm(dim=1), model[3].weight.flatten(1).norm(dim=1)
    read0 = model[3].weight.transpose(0, 1).flatten(1).norm(dim=1)  # conv "3" reads channel k through BN and ReLU
    read3 = model[7].weight.view(3, 5, 4).transpose(0, 1).flatten(1).norm(dim=1)  # 4 features per channel
    assert torch.allclose(weights["0"], own0 * read0, rtol=1e-5)
    assert torch.allclose(weights["3"], own3 * read3, rtol=1e-5)
    resnet = trace(build_model("resnet20", "cifar10"), torch.zeros(1, 3, 32, 32))
    stream = resnet.modules["layer1.0.conv2"]  # its channels meet an addition: its own norm alone
    assert torch.allclose(filter_weights(resnet, ["layer1.0.conv2"])["layer1.0.conv2"],
                          stream.weight.flatten(1).norm(dim=1))


def test_weight_power_removes_a_channel_nobody_reads_first_and_zero_changes_nothing():
    graph = trace(build_model("resnet20", "cifar10"), torch.zeros(1, 3, 32, 32))
    scope = default_scope(graph)
    with torch.no_grad():
        graph.modules["layer2.1.conv2"].weight[:, 5] = 0  # channel 5 of layer2.1.conv1 is read by nobody
    scores = {n: torch.linspace(1.0, 2.0, graph.modules[n].out_channels) for n in scope}
    plain, _ = select("cdp", scores, sparsity=0.02, graph=graph)
    weighted, _ = select("cdp", scores, sparsity=0.02, graph=graph, weight_power=1.0)
    assert bool(plain["layer2.1.conv1"][5]) and not bool(weighted["layer2.1.conv1"][5])
    unweighted, _ = select("cdp", scores, sparsity=0.02, graph=graph, weight_power=0.0)
    assert all(torch.equal(plain[n], unweighted[n]) for n in scope)
    assert weight_scaled(scores, {n: torch.full_like(s, 2.0) for n, s in scores.items()}, 2.0)[scope[0]][0] == 4.0
    with pytest.raises(ValueError, match="weight power must be >= 0"):
        weight_scaled(scores, scores, -1.0)

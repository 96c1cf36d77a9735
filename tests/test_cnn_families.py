"""Depthwise, grouped, squeeze-excitation, concatenation and shuffle blocks: coupled groups, pruners, slim.

Small members of the torchvision families (MobileNetV2, ResNeXt,
EfficientNet, DenseNet, ShuffleNetV2) at 32x32: the pruners' selection
slims to a network equal to the masked one, with the MACs the masks count.
"""
import copy
import warnings

import pytest
import torch
import torchvision
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchvision.models.efficientnet import MBConvConfig
from torchvision.models.resnet import Bottleneck

from cdp_gfi import CDPPruner, GFIPruner, apply_masks, count_flops, slim
from cdp_gfi.flops import layer_costs
from cdp_gfi.graph.trace import trace
from cdp_gfi.masks.select import select, to_nni_masks
from cdp_gfi.models import build_model
from cdp_gfi.graph.scope import follower_convs, prunable_units, unit_convs
from nets import randomized_bn


def _tiny(name: str) -> nn.Module:
    torch.manual_seed(0)
    if name == "mobilenet_v2":
        setting = [[1, 16, 1, 1], [6, 24, 2, 2], [6, 32, 2, 2]]
        model = torchvision.models.mobilenet_v2(width_mult=0.5, num_classes=10, inverted_residual_setting=setting)
    elif name == "resnext":
        down = nn.Sequential(nn.Conv2d(32, 64, 1, stride=2, bias=False), nn.BatchNorm2d(64))
        model = nn.Sequential(nn.Conv2d(3, 32, 3, bias=False), nn.BatchNorm2d(32), nn.ReLU(),  # ResNeXt blocks
                              Bottleneck(32, 8, groups=4, base_width=32), Bottleneck(32, 16, 2, down, 4, 32),
                              nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))
    elif name == "efficientnet":
        setting = [MBConvConfig(1, 3, 1, 16, 8, 1), MBConvConfig(6, 3, 2, 8, 16, 2), MBConvConfig(6, 5, 2, 16, 24, 1)]
        model = torchvision.models.EfficientNet(setting, dropout=0.2, last_channel=64, num_classes=10)
    elif name == "densenet":
        model = torchvision.models.DenseNet(growth_rate=8, block_config=(2, 2), num_init_features=16, bn_size=2,
                                            num_classes=10)
    else:
        model = torchvision.models.ShuffleNetV2([2, 1, 1], [8, 16, 32, 64, 128], num_classes=10)
    return randomized_bn(model)


@pytest.mark.parametrize("name,scope,cls", [("mobilenet_v2", "internal", CDPPruner), ("resnext", "all", GFIPruner),
                                            ("efficientnet", "all", CDPPruner),
                                            ("densenet", "all", GFIPruner), ("shufflenet", "all", CDPPruner)])
def test_pruner_slims_to_the_masked_network(name, scope, cls):
    model = _tiny(name)
    x, y = torch.randn(16, 3, 32, 32), torch.arange(16) % 10
    pruner = cls(model, [{"op_types": ["Conv2d"], "sparse_ratio": 0.3}], DataLoader(TensorDataset(x, y), 8),
                 scope=scope, progress=False)
    _, masks = pruner.compress()
    pruner.unwrap_model()
    assert set(pruner.layers) == set(unit_convs(pruner.units))  # statistics: ranked convs only
    assert set(follower_convs(pruner.units)) <= set(masks)  # followers masked with their channels
    masked = apply_masks(copy.deepcopy(model), masks, pruner.graph)(x)
    counted = count_flops(model, (3, 32, 32), masks=masks)
    dense = count_flops(model, (3, 32, 32))[0]
    slim(model, masks, x[:1])
    out = model(x)
    assert (out - masked).abs().max() <= 1e-5 * masked.abs().max()
    assert count_flops(model, (3, 32, 32)) == counted
    assert counted[0] < dense


def test_depthwise_conv_follows_its_expansion():
    graph = trace(_tiny("mobilenet_v2"), torch.zeros(1, 3, 32, 32))
    unit = prunable_units(graph, "internal")["features.2.conv.0.0"]
    assert unit.convs == ["features.2.conv.0.0"] and list(unit.follower_widths) == ["features.2.conv.1.0"]
    assert all(f == [("features.2.conv.1.0", k)] for (((_, k),), f) in zip(unit.groups, unit.followers))
    assert "features.2.conv.1.0" not in prunable_units(graph, "all")  # never ranked in either scope


def test_squeeze_excitation_expander_follows_and_its_reducer_stays_whole():
    graph = trace(_tiny("efficientnet"), torch.zeros(1, 3, 32, 32))
    units = prunable_units(graph, "internal")
    expand = units["features.2.0.block.0.0"]  # MBConv expansion: its depthwise conv and SE fc2 follow it
    assert set(expand.follower_widths) == {"features.2.0.block.1.0", "features.2.0.block.2.fc2"}
    assert "features.2.0.block.2.fc1" not in units  # a few filters on 1x1 maps: never ranked


def test_grouped_conv_couples_each_place_across_groups():
    graph = trace(_tiny("resnext"), torch.zeros(1, 3, 32, 32))
    units = prunable_units(graph, "internal")
    width, groups = graph.modules["4.conv2"].in_channels, graph.modules["4.conv2"].groups
    for conv in ("4.conv1", "4.conv2"):  # the grouped conv's input and output channels
        assert len(units[conv].groups) == width // groups
        assert units[conv].groups[0] == [(conv, g * (width // groups)) for g in range(groups)]


def test_mobilenet_v2_internal_scope_covers_its_macs_and_reaches_30_percent():
    model = build_model("mobilenet_v2", "imagenet")
    graph = trace(model, torch.zeros(1, 3, 64, 64))
    units = prunable_units(graph, "internal")
    dense = {r["module"]: r["macs"] for r in layer_costs(graph, {}, "conv-linear") if r["type"] == "Conv2d"}
    emptied = {c: torch.zeros(graph.modules[c].out_channels, dtype=torch.bool)
               for c in unit_convs(units) + follower_convs(units)}
    shrunk = {r["module"] for r in layer_costs(graph, emptied, "conv-linear") if r["macs"] < dense.get(r["module"], 0)}
    assert sum(dense[c] for c in shrunk) >= 0.9 * sum(dense.values())
    scores = {n: torch.rand(graph.modules[n].out_channels) for n in unit_convs(units)}
    select("cdp", scores, graph=graph, flops_reduction=0.3, units=units)  # raises if out of reach


def test_an_op_not_understood_pins_its_channels_and_is_named():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.GroupNorm(2, 8), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(),
                          nn.Conv2d(8, 4, 3))
    with pytest.warns(UserWarning, match="GroupNorm"):
        units = prunable_units(trace(model, torch.zeros(1, 3, 16, 16)), "all")
    assert list(units) == ["3"]  # conv 0 reaches the GroupNorm, conv 5 the output


def test_unreachable_target_names_the_closest():
    graph = trace(_tiny("mobilenet_v2"), torch.zeros(1, 3, 32, 32))
    units = {n: u for n, u in prunable_units(graph, "internal").items() if n == "features.2.conv.0.0"}
    scores = {n: torch.rand(graph.modules[n].out_channels) for n in unit_convs(units)}
    with pytest.raises(ValueError, match=r"cannot remove 30.00% of MACs.*closest reachable: \d"):
        select("cdp", scores, graph=graph, flops_reduction=0.3, units=units)


def test_every_torchvision_cnn_is_a_model_name_and_unknown_ones_list_them():
    model = build_model("shufflenet_v2_x0_5", "imagenet")
    assert isinstance(model, torchvision.models.ShuffleNetV2)
    with pytest.raises(ValueError, match="expected one of .*'mobilenet_v2'.*'resnext50_32x4d'"):
        build_model("not_a_net", "imagenet")
    cifar = build_model("mobilenet_v2", "cifar10")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every op of the CIFAR MobileNetV2 is understood
        units = prunable_units(trace(cifar, torch.zeros(1, 3, 32, 32)), "internal")
    # 16 expansions, the stem (the first block has none), the two projections no residual adds to, the last conv
    assert len(units) == 20 and {"features.0.0", "features.1.conv.1", "features.17.conv.2", "features.18.0"} <= set(units)


def test_googlenet_loads_torchvision_weights_without_its_auxiliary_heads_and_trains_slim(tmp_path):
    from cdp_gfi.files.pretrained import load_pretrained

    torch.manual_seed(0)
    published = torchvision.models.googlenet(weights=None, aux_logits=True, transform_input=True,
                                             init_weights=True, num_classes=10).eval()
    torch.save(published.state_dict(), tmp_path / "googlenet.pth")  # torchvision's layout: aux1, aux2 included
    model = build_model("googlenet", "imagenet", 10)
    with pytest.warns(UserWarning, match="left out the auxiliary classifiers aux1, aux2"):
        load_pretrained(model, tmp_path / "googlenet.pth")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), published(x))  # same input transform, same weights
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the input transform touches only the image's channels: nothing to pin
        graph = trace(model, x[:1])
        units = prunable_units(graph, "internal")
    scores = {n: torch.rand(graph.modules[n].out_channels) for n in unit_convs(units)}
    keep, _ = select("cdp", scores, graph=graph, flops_reduction=0.3, units=units)
    slim(model, to_nni_masks(model, keep), x[:1])
    model.train()(x).sum().backward()  # fine-tuning: no auxiliary head left to fail on the slimmed channels

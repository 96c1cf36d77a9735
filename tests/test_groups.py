"""Coupled channel groups (scope "all"): groups from the graph, slimmed residual streams, rounding."""
import copy

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from cdp_gfi import CDPPruner, GFIPruner, apply_masks, build_model, count_flops, slim
from cdp_gfi.graph.trace import TraceError, trace
from cdp_gfi.graph.groups import coupled_units
from nets import randomized_bn


def test_cifar_option_a_stream_is_one_unit_with_shifted_groups():
    units = coupled_units(trace(build_model("resnet20", "cifar10"), torch.zeros(1, 3, 32, 32)))
    stream = units["conv1"]
    assert stream.convs == ["conv1"] + [f"layer{s}.{b}.conv2" for s in (1, 2, 3) for b in range(3)]
    assert len(stream.groups) == 16 + 16 + 32  # stage 1 channels reach stages 2 and 3 through the padding
    g = next(g for g in stream.groups if ("conv1", 5) in g)
    assert ("layer1.2.conv2", 5) in g and ("layer2.0.conv2", 8 + 5) in g and ("layer3.2.conv2", 16 + 8 + 5) in g
    assert units["layer1.0.conv1"].convs == ["layer1.0.conv1"]  # block-internal convs stay alone


def test_torchvision_downsample_joins_its_stream():
    units = coupled_units(trace(build_model("resnet18", "imagenet"), torch.zeros(1, 3, 64, 64)))
    assert units["layer2.0.conv2"].convs == ["layer2.0.conv2", "layer2.0.downsample.0", "layer2.1.conv2"]
    assert units["conv1"].convs == ["conv1", "layer1.0.conv2", "layer1.1.conv2"]


@pytest.mark.parametrize("name,dataset,size,cls", [("resnet20", "cifar10", 32, GFIPruner),
                                                   ("resnet18", "imagenet", 32, GFIPruner),
                                                   ("resnet20", "cifar10", 32, CDPPruner)])
def test_scope_all_shrinks_the_residual_stream(name, dataset, size, cls):
    torch.manual_seed(0)
    model = randomized_bn(build_model(name, dataset, num_classes=10))
    x, y = torch.randn(20, 3, size, size), torch.arange(20) % 10
    pruner = cls(model, [{"op_types": ["Conv2d"], "sparse_ratio": 0.5}], DataLoader(TensorDataset(x, y), 10),
                 scope="all", progress=False)
    _, masks = pruner.compress()
    pruner.unwrap_model()
    stream = {c: int(k.sum()) for c, k in pruner.keep.items() if c in pruner.units["conv1"].convs}
    masked = apply_masks(copy.deepcopy(model), masks, trace(model, x[:1]))(x)
    expected = count_flops(model, (3, size, size), masks=masks)
    slim(model, masks, x[:1])
    assert (model(x) - masked).abs().max().item() <= 1e-4
    assert count_flops(model, (3, size, size)) == expected
    assert model.conv1.out_channels == model.layer1[0].conv2.out_channels == stream["conv1"]
    if cls is GFIPruner:  # GFI-AP ranks these stream groups low on random nets: the stream really narrows
        assert stream["conv1"] < (64 if dataset == "imagenet" else 16)


def test_round_to_keeps_multiples():
    torch.manual_seed(1)
    model = build_model("resnet20", "cifar10").eval()
    loader = DataLoader(TensorDataset(torch.randn(20, 3, 32, 32), torch.arange(20) % 10), 10)
    config = [{"op_types": ["Conv2d"], "sparse_ratio": 0.4}]
    pruner = CDPPruner(model, config, loader, scope="all", round_to=4, progress=False)
    pruner.compress()
    pruner.unwrap_model()
    for conv, k in pruner.keep.items():  # every conv, residual-stream ones included
        assert int(k.sum()) % 4 == 0 or int(k.sum()) == k.numel(), conv
    assert any(int(k.sum()) < k.numel() for k in pruner.keep.values())
    with pytest.raises(ValueError, match="round_to"):
        CDPPruner(model, config, loader, round_to=0, progress=False).compress()


class _Branchy(nn.Module):
    def forward(self, x):
        return x if x.sum() > 0 else -x  # data-dependent control flow


def test_untraceable_model_names_the_module():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Sequential(nn.ReLU(), _Branchy()), nn.Conv2d(4, 4, 3))
    with pytest.raises(TraceError, match=r"'1\.1 \(_Branchy\)'"):
        trace(model, torch.zeros(1, 3, 8, 8))

"""Any CNN from any library: layer subclasses, defaulted forward arguments, tied scores, timm when installed."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from cdp_gfi import CDPPruner, GFIPruner, apply_masks, count_flops, select, slim
from cdp_gfi.graph.scope import prunable_units, unit_convs
from cdp_gfi.graph.trace import TraceError, trace
from cdp_gfi.masks.select import select_by_threshold
from cdp_gfi.models import build_model
from nets import randomized_bn

torch.manual_seed(0)


class PadSameConv(nn.Conv2d):
    """TF-style 'same' padding computed at run time, as timm's Conv2dSame / efficientnet-pytorch's do."""

    def forward(self, x):
        ih, iw = x.shape[-2:]
        kh, kw = self.kernel_size
        ph = max((math.ceil(ih / self.stride[0]) - 1) * self.stride[0] + kh - ih, 0)
        pw = max((math.ceil(iw / self.stride[1]) - 1) * self.stride[1] + kw - iw, 0)
        x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class StdConv(nn.Conv2d):
    """Weight standardisation over each filter's input channels (BiT's StdConv2d)."""

    def forward(self, x):
        w = self.weight
        w = (w - w.mean(dim=(1, 2, 3), keepdim=True)) / (w.std(dim=(1, 2, 3), keepdim=True) + 1e-5)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class BNAct(nn.BatchNorm2d):
    """BatchNorm with its activation fused in (timm's BatchNormAct2d)."""

    def __init__(self, n):
        super().__init__(n)
        self.act = nn.SiLU()

    def forward(self, x):
        return self.act(F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                                     False, 0.0, self.eps))


class Net(nn.Module):
    """conv -> BNAct -> conv -> BNAct -> pool -> linear, convs of class ``conv``; ``forward`` with extra arguments."""

    def __init__(self, conv=PadSameConv, width=16):
        super().__init__()
        self.c1, self.b1 = conv(3, width, 3, stride=2, bias=False), BNAct(width)
        self.c2, self.b2 = conv(width, width * 2, 3, bias=False), BNAct(width * 2)
        self.c3, self.b3 = conv(width * 2, width * 2, 1, bias=False), BNAct(width * 2)
        self.fc = nn.Linear(width * 2, 10)

    def forward(self, x, return_features=False, labels=None):
        x = self.b3(self.c3(self.b2(self.c2(self.b1(self.c1(x))))))
        feats = x.mean((2, 3))
        if return_features:
            return self.fc(feats), feats
        return self.fc(feats)


def loader(size=32, n=40):
    return DataLoader(TensorDataset(torch.randn(n, 3, size, size), torch.arange(n) % 10), batch_size=20)


def prune_and_slim(model, pruner_cls, size=32, **kwargs):
    """Prune through the README's API, then slim; returns (masked output, slim output, pruner, mask-counted MACs)."""
    x = torch.randn(4, 3, size, size)
    pruner = pruner_cls(model, [{"op_types": ["Conv2d"], "sparse_ratio": 0.5}], loader(size), progress=False,
                        **kwargs)
    _, masks = pruner.compress()
    pruner.unwrap_model()
    with torch.no_grad():
        masked = apply_masks(copy.deepcopy(model), masks, pruner.graph)(x)
    counted = count_flops(model, (3, size, size), masks=masks)[0]
    slim(model, masks, torch.randn(1, 3, size, size))
    with torch.no_grad():
        return masked, model(x), pruner, counted


@pytest.mark.parametrize("pruner_cls", [CDPPruner, GFIPruner])
def test_padding_conv_and_fused_bn_subclasses_prune_and_slim_exactly(pruner_cls):
    model = randomized_bn(Net())
    masked, out, pruner, counted = prune_and_slim(model, pruner_cls)
    assert set(unit_convs(pruner.units)) == {"c1", "c2", "c3"}  # the subclasses are ranked like torch's Conv2d
    assert (out - masked).abs().max() <= 1e-5 * masked.abs().max()
    assert type(model.c1) is PadSameConv and type(model.b1) is BNAct  # their own forward stays
    assert model.c1.out_channels < 16 and model.b1.num_features == model.c1.out_channels
    assert count_flops(model, (3, 32, 32))[0] == counted


def test_count_flops_of_a_padding_subclass_is_the_hand_count():
    model = Net()
    # 'same' padding at run time: c1 3->16, 3x3, stride 2 on 32x32 -> 16x16; c2 16->32, 3x3 -> 16x16 (its
    # padding attribute says 0: NNI's counter took 14x14); c3 32->32, 1x1; fc 32->10
    hand = 16 * 16 * 9 * 3 * 16 + 16 * 16 * 9 * 16 * 32 + 16 * 16 * 32 * 32 + 32 * 10
    assert count_flops(model, (3, 32, 32))[0] == hand


def test_weight_standardised_convs_are_pinned_and_named():
    model = randomized_bn(Net(conv=StdConv))
    with pytest.warns(UserWarning, match="StdConv .its own forward does not slice"):
        units = prunable_units(trace(model, torch.zeros(1, 3, 32, 32)), "internal")
    assert units == {}
    with pytest.raises(ValueError, match="no conv is prunable in this model .channels are pinned by StdConv"):
        CDPPruner(model, [{"op_types": ["Conv2d"], "sparse_ratio": 0.5}], loader(), progress=False)


@pytest.mark.parametrize("scope", ["internal", "all"])
@pytest.mark.parametrize("pruner_cls", [CDPPruner, GFIPruner])
def test_resnet_whose_forward_takes_return_features_prunes(pruner_cls, scope):
    class FeatResNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = randomized_bn(build_model("resnet20", "cifar10"))

        def forward(self, x, return_features=False):
            out = self.net(x)
            return (out, out) if return_features else out

    model = FeatResNet().eval()
    masked, out, *_ = prune_and_slim(model, pruner_cls, scope=scope, flops_reduction=0.3)
    assert (out - masked).abs().max() <= 1e-5 * masked.abs().max()
    assert model(torch.randn(2, 3, 32, 32), return_features=True)[1].shape == (2, 10)


def test_a_trace_error_names_the_line_and_the_way_out():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow
                return self.conv(x)
            return self.conv(-x)

    with pytest.raises(TraceError, match=r"test_any_library.py:\d+ `if x.sum\(\) > 0:.*leaf_modules"):
        trace(Branchy(), torch.zeros(1, 3, 8, 8))


class ConvHead(nn.Module):
    """timm's ConvMlp: a 7x7 conv head that pools smaller maps up to 7x7 first (control flow on a shape)."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 32, 3, 2, 1), nn.BatchNorm2d(32), nn.ReLU(),
                                      nn.Conv2d(32, 32, 3, 2, 1), nn.BatchNorm2d(32), nn.ReLU())
        self.head = nn.Conv2d(32, 24, 7)
        self.fc = nn.Linear(24, 10)

    def forward(self, x):
        x = self.features(x)
        if x.shape[-2] < 7 or x.shape[-1] < 7:
            x = F.adaptive_avg_pool2d(x, (max(7, x.shape[-2]), max(7, x.shape[-1])))
        return self.fc(self.head(x).mean((2, 3)))


@pytest.mark.parametrize("size", [16, 32])  # feature maps 4x4 (pooled up to 7x7) and 8x8 (not pooled)
def test_control_flow_on_shapes_takes_the_dummy_inputs_branch(size):
    torch.manual_seed(0)
    model = randomized_bn(ConvHead()).eval()
    with pytest.warns(UserWarning, match=r"decided for an input of shape \(1, 3, %d, %d\).*"
                                         r"test_any_library.py:\d+ `if x.shape\[-2\] < 7" % (size, size)):
        masked, out, pruner, _ = prune_and_slim(model, CDPPruner, size=size, flops_reduction=0.3)
    assert set(unit_convs(pruner.units)) == {"features.0", "features.3", "head"}
    assert model.features[3].out_channels < 32 and model.head.in_channels == model.features[3].out_channels
    assert (out - masked).abs().max() <= 1e-5 * masked.abs().max()


class LayerNorm2d(nn.LayerNorm):
    """timm's channels-first LayerNorm: its weight and bias are read by the traced forward."""

    def forward(self, x):
        x = F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class MiniNeXt(nn.Module):
    """A ConvNeXt stem and block: LayerNorm2d and a layer scale, parameters the graph reads."""

    def __init__(self):
        super().__init__()
        self.stem, self.stem_norm = nn.Conv2d(3, 16, 2, 2), LayerNorm2d(16)
        self.dw, self.norm = nn.Conv2d(16, 16, 7, padding=3, groups=16), LayerNorm2d(16)
        self.fc1, self.fc2 = nn.Conv2d(16, 64, 1), nn.Conv2d(64, 16, 1)
        self.gamma = nn.Parameter(torch.rand(16) + 0.5)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        x = self.stem_norm(self.stem(x))
        y = self.fc2(F.gelu(self.fc1(self.norm(self.dw(x)))))
        return self.head((x + y.mul(self.gamma.reshape(1, -1, 1, 1))).mean((2, 3)))


@pytest.mark.parametrize("pruner_cls", [CDPPruner, GFIPruner])
def test_parameters_read_in_the_forward_are_not_taken_for_a_batch(pruner_cls):
    # NNI took the 16-element LayerNorm weight and layer scale for batches of 8 and emptied the network
    torch.manual_seed(0)
    model = MiniNeXt().eval()
    masked, out, pruner, counted = prune_and_slim(model, pruner_cls, flops_reduction=0.3)
    assert model.fc1.out_channels < 64 and model.fc2.in_channels == model.fc1.out_channels
    assert (out - masked).abs().max() <= 1e-5 * masked.abs().max()
    assert count_flops(model, (3, 32, 32))[0] == counted


class MixedDepthwise(nn.Module):
    """timm's MixedConv2d: channels split in unequal parts held as ``self.splits``, one kernel size per part."""

    def __init__(self, splits):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(c, c, 2 * i + 3, padding=i + 1, groups=c) for i, c in enumerate(splits))
        self.splits = splits

    def forward(self, x):
        parts = torch.split(x, self.splits, 1)
        return torch.cat([conv(parts[i]) for i, conv in enumerate(self.convs)], 1)


class MixNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.expand, self.bn = nn.Conv2d(3, 48, 1), nn.BatchNorm2d(48)
        self.mixed = MixedDepthwise([24, 16, 8])
        self.project = nn.Conv2d(48, 16, 1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = self.mixed(F.relu(self.bn(self.expand(x))))
        return self.fc(self.project(x).mean((2, 3)))


@pytest.mark.parametrize("pruner_cls", [CDPPruner, GFIPruner])
def test_unequal_splits_held_by_their_module_are_resized(pruner_cls):
    torch.manual_seed(0)
    model = randomized_bn(MixNet())
    masked, out, pruner, counted = prune_and_slim(model, pruner_cls)  # half of the filters
    kept = [conv.out_channels for conv in model.mixed.convs]
    assert model.mixed.splits == kept and sum(kept) == model.expand.out_channels < 48
    assert isinstance(model.mixed.splits, list)
    assert (out - masked).abs().max() <= 1e-5 * masked.abs().max()
    assert count_flops(model, (3, 32, 32))[0] == counted


def test_a_split_whose_sizes_no_module_holds_pins_its_channels():
    class Literal(MixedDepthwise):
        def forward(self, x):
            parts = torch.split(x, [24, 16, 8], 1)
            return torch.cat([conv(parts[i]) for i, conv in enumerate(self.convs)], 1)

    model = MixNet()
    model.mixed = Literal([24, 16, 8])
    del model.mixed.splits  # the sizes are in the code only
    with pytest.warns(UserWarning, match="through split"):
        units = prunable_units(trace(model, torch.zeros(1, 3, 32, 32)), "all")
    assert "expand" not in unit_convs(units) and "project" in unit_convs(units)


def test_leaf_modules_get_past_an_untraceable_block():
    class Gate(nn.Module):
        def forward(self, x):
            return x if x.sum() > 0 else -x

    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3), Gate(),
                          nn.Conv2d(8, 4, 1)).eval()
    graph = trace(model, torch.zeros(1, 3, 16, 16), leaf_modules=[Gate])
    assert [n.target for n in graph.gm.graph.nodes if n.op == "call_module"][-2] == "4"


def tied_model():
    """A conv net in which a third of the filters are dead (all-zero), so their scores tie at 0."""
    model = randomized_bn(build_model("resnet20", "cifar10"))
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, nn.Conv2d) and name.endswith("conv1") and "layer" in name:
                m.weight[: m.out_channels // 3] = 0
    return model


@pytest.mark.parametrize("target", [0.1, 0.3, 0.5])
@pytest.mark.parametrize("method", ["cdp", "gfi"])
def test_targets_are_met_whatever_the_ties(method, target):
    model = tied_model()
    pruner_cls = CDPPruner if method == "cdp" else GFIPruner
    pruner = pruner_cls(model, [{"op_types": ["Conv2d"], "sparse_ratio": 0.5}], loader(), flops_reduction=target,
                        progress=False)
    _, masks = pruner.compress()
    pruner.unwrap_model()
    dense = count_flops(build_model("resnet20", "cifar10"), (3, 32, 32))[0]
    assert abs(1 - count_flops(model, (3, 32, 32), masks=masks)[0] / dense - target) <= 0.005


@pytest.mark.parametrize("rule", ["global", "adaptive"])
def test_the_sparsity_asked_is_the_sparsity_removed(rule):
    graph = trace(tied_model(), torch.zeros(1, 3, 32, 32))
    layers = unit_convs(prunable_units(graph, "internal"))
    scores = {n: torch.rand(graph.modules[n].out_channels) for n in layers}
    for n in layers:
        scores[n][: len(scores[n]) // 3] = 0  # ties
    total = sum(s.numel() for s in scores.values())
    for p in (0.3, 0.5, 0.7):
        keep, _ = select("gfi", scores, sparsity=p, rule=rule, graph=graph)
        removed = sum(int((~k).sum()) for k in keep.values()) / total
        assert abs(removed - p) <= max(0.005, 1 / total), (p, removed)


def test_a_cap_that_blocks_the_sparsity_says_how_far_it_got():
    scores = {"a": torch.rand(10), "b": torch.rand(10)}
    with pytest.raises(ValueError, match=r"cannot remove 80.00% of the ranked filters .*closest reachable: 60.00% below it"):
        select("cdp", scores, sparsity=0.8, rule="adaptive", max_layer_sparsity=0.6)


def test_published_gfi_keeps_the_papers_ties():
    scores = {"a": torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0, 2.0]), "b": torch.tensor([3.0, 4.0, 5.0, 6.0])}
    # threshold at sorted[floor(0.1 x 10)] = 0: every tied zero goes (then the cap (1 + p) / 2 = 55%: 3 of 6)
    keep = select_by_threshold(scores, 0.1)
    assert int((~keep["a"]).sum()) == 3 and bool(keep["b"].all())


def test_a_model_without_a_linear_head_takes_its_classes_from_the_output():
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 16, 3),
                          nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 10, 1), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten())
    masked, out, pruner, _ = prune_and_slim(randomized_bn(model), GFIPruner)
    assert pruner.statistics.num_classes == 10
    assert (out - masked).abs().max() <= 1e-5 * masked.abs().max()


TIMM_FAST = ("efficientnet_b0", "mobilenetv3_small_050", "regnetx_002", "tf_mobilenetv3_small_minimal_100")


@pytest.mark.parametrize("name", TIMM_FAST)
def test_timm_models_prune_and_slim(name):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)  # weights and images independent of the tests run before
    model = randomized_bn(timm.create_model(name, pretrained=False, num_classes=10))
    masked, out, *_ = prune_and_slim(model, CDPPruner, size=64, flops_reduction=0.3)
    assert (out - masked).abs().max() <= 1e-5 * masked.abs().max()


def test_a_ghost_module_trimming_its_concatenation_prunes_exactly():
    class Ghost(nn.Module):
        """GhostNet's module: a primary conv, a cheap depthwise conv on it, both concatenated and trimmed."""

        def __init__(self, cin, cout):
            super().__init__()
            self.out = cout
            self.primary = nn.Sequential(nn.Conv2d(cin, cout // 2, 1, bias=False), nn.BatchNorm2d(cout // 2),
                                         nn.ReLU())
            self.cheap = nn.Sequential(nn.Conv2d(cout // 2, cout // 2, 3, padding=1, groups=cout // 2, bias=False),
                                       nn.BatchNorm2d(cout // 2), nn.ReLU())

        def forward(self, x):
            a = self.primary(x)
            return torch.cat([a, self.cheap(a)], 1)[:, :self.out, :, :]

    model = randomized_bn(nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), Ghost(16, 32), nn.Conv2d(32, 16, 3),
                                     nn.BatchNorm2d(16), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                     nn.Linear(16, 10)))
    masked, out, pruner, counted = prune_and_slim(model, CDPPruner)
    assert "1.primary.0" in pruner.layers
    assert (out - masked).abs().max() <= 1e-5 * masked.abs().max()
    assert count_flops(model, (3, 32, 32))[0] == counted


def test_a_pinned_conv_subclass_is_never_ranked_in_either_scope():
    graph = trace(randomized_bn(Net(conv=StdConv)), torch.zeros(1, 3, 32, 32))
    with pytest.warns(UserWarning, match="StdConv"):
        assert prunable_units(graph, "all") == {} and prunable_units(graph, "internal") == {}

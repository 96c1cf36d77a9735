"""Published checkpoint layouts load onto our models, strictly; anything else fails with a message that says why."""
import re
from pathlib import Path

import pytest
import torch

from cdp_gfi import build_model, load_pretrained
from cdp_gfi.files.checkpoint import CheckpointError, CheckpointMismatchError

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def _seeded(name: str, dataset: str = "cifar10", num_classes=None):
    torch.manual_seed(0)
    model = build_model(name, dataset, num_classes).eval()
    with torch.no_grad():  # non-trivial BN statistics, so a wrong mapping shows in the outputs
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model


def _renamed(state, rules, drop_counters=True):
    out = {}
    for key, value in state.items():
        if drop_counters and key.endswith("num_batches_tracked"):
            continue
        for pattern, repl in rules:
            key = re.sub(pattern, repl, key)
        out[key] = value
    return out


def _cdp_vgg_rules(model):
    """Our features.<i> -> the CDP authors' feature.conv_<j> / feature.bn_<j>."""
    rules, j = [], 0
    for name, m in model.features.named_children():
        if isinstance(m, torch.nn.Conv2d):
            j += 1
            rules.append((rf"^features\.{name}\.", f"feature.conv_{j}."))
        elif isinstance(m, torch.nn.BatchNorm2d):
            rules.append((rf"^features\.{name}\.", f"feature.bn_{j}."))
    return rules


LAYOUTS = {
    # name: (model, dataset, how the file wraps the renamed tensors, renaming rules)
    "pytorch_resnet_cifar10": ("resnet20", "cifar10", lambda sd: {"best_prec1": 91.7, "state_dict": {
        f"module.{k}": v for k, v in sd.items()}}, [(r"^fc\.", "linear.")]),
    "cdp-resnet-cifar": ("resnet20", "cifar10", lambda sd: {"state_dict": {f"module.{k}": v for k, v in sd.items()}},
                         [(r"^conv1\.", "conv_bn.conv."), (r"^bn1\.", "conv_bn.bn."),
                          (r"^(layer\d)\.(\d+)\.conv(\d)\.", r"\1.block_\2.conv_bn\3.conv."),
                          (r"^(layer\d)\.(\d+)\.bn(\d)\.", r"\1.block_\2.conv_bn\3.bn."), (r"^fc\.", "linear.")]),
    "cdp-vgg-cifar": ("vgg16_cdp", "cifar10", lambda sd: {"net": sd}, None),
    "cdp_gfi": ("resnet18", "imagenet", lambda sd: sd, []),  # a torchvision weights file: a bare state dict
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_known_layout_loads_and_gives_our_outputs(layout, tmp_path):
    name, dataset, wrap, rules = LAYOUTS[layout]
    ours = _seeded(name, dataset, num_classes=10)
    rules = _cdp_vgg_rules(ours) if rules is None else rules
    path = tmp_path / "published.pth"
    torch.save(wrap(_renamed(ours.state_dict(), rules, drop_counters=layout != "cdp_gfi")), path)
    fresh = build_model(name, dataset, 10).eval()
    assert load_pretrained(fresh, path) == layout
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(fresh(x), ours(x))


def test_wrong_width_names_the_layout_and_the_shapes(tmp_path):
    path = tmp_path / "r20_100.pth"
    other = build_model("resnet20", "cifar100").state_dict()
    torch.save({"state_dict": {f"module.{k}": v for k, v in _renamed(other, [(r"^fc\.", "linear.")]).items()}}, path)
    model = build_model("resnet20", "cifar10")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointMismatchError) as err:
        load_pretrained(model, path)
    message = str(err.value)
    assert str(path) in message and "pytorch_resnet_cifar10" in message
    assert "fc.weight (100, 64) in file vs (10, 64) in model" in message
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing half-loaded


def test_a_renamed_key_is_reported_unused_and_missing(tmp_path):
    state = _renamed(build_model("resnet20", "cifar10").state_dict(), [(r"^layer2\.0\.conv2\.", "layer2.0.convX.")])
    with pytest.raises(CheckpointMismatchError, match=r"1 unused in file: layer2\.0\.convX\.weight.*"
                                                      r"1 missing from file: layer2\.0\.conv2\.weight"):
        load_pretrained(build_model("resnet20", "cifar10"), state)


def test_a_file_that_is_no_checkpoint_fails_clearly(tmp_path):
    path = tmp_path / "notes.pth"
    path.write_bytes(b"these are not weights")
    with pytest.raises(CheckpointError, match="corrupt or not a torch checkpoint"):
        load_pretrained(build_model("resnet20", "cifar10"), path)


@pytest.mark.skipif(not (SHARED / "pretrained").is_dir(), reason="../shared/data is not here")
@pytest.mark.parametrize("depth, stem", [(20, "resnet20-12fca82f"), (32, "resnet32-d509ac18")])
def test_the_published_cifar_resnets_load(depth, stem):
    model = build_model(f"resnet{depth}", "cifar10").eval()
    assert load_pretrained(model, SHARED / "pretrained" / f"{stem}.th") == "pytorch_resnet_cifar10"
    from cdp_gfi.data.datasets import cifar_datasets
    test = cifar_datasets(SHARED / "cifar10-real-subset", check_integrity=False)[2]
    x, y = zip(*(test[i] for i in range(128)))
    with torch.no_grad():
        top1 = (model(torch.stack(x)).argmax(1) == torch.tensor(y)).float().mean()
    assert top1 > 0.9  # the real weights classify real images: the mapping is right

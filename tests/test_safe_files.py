"""Loading runs no code: a pickle that would run code is refused wherever a file is read; slim and masks
files round-trip through their code-free formats."""
import importlib.util
import os
from pathlib import Path

import pytest
import torch

from cdp_gfi import build_model, load_slim, select, slim, to_nni_masks
from cdp_gfi.files.checkpoint import UnsafeCheckpointError
from cdp_gfi.graph.trace import trace
from cdp_gfi.files.mask_files import compact_masks, expand_masks
from cdp_gfi.runs.imagenet_stage2 import save_masks_checkpoint
from cdp_gfi.graph.scope import default_scope, prunable_units, unit_convs
from cdp_gfi.slimming.slim_files import save_slim_checkpoint
from cdp_gfi.statistics.store import Statistics
from cdp_gfi.train.optim import build_optimizer, build_scheduler
from cdp_gfi.train.loop import fit

SCRIPT = Path(__file__).resolve().parents[1] / "prune_cifar.py"
_spec = importlib.util.spec_from_file_location("prune_cifar", SCRIPT)
prune_cifar = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(prune_cifar)


class RunsCode:
    """Unpickling this would create `marker` (as a downloaded 'checkpoint' could do anything)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def evil(tmp_path):
    """(a torch file whose unpickling would create the marker, the marker's path)."""
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": RunsCode(marker), "epoch": 1}, path)
    return path, marker


def test_pickle_with_code_as_pretrained_weights_is_refused(evil, tmp_path, capsys):
    path, marker = evil
    status = prune_cifar.main(["--dataset", "digits", "--pretrained_dir", str(path), "--save_dir",
                               str(tmp_path / "run")])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1 and err[0].startswith("error: ")
    assert str(path) in err[0] and "refused" in err[0] and "posix.system" in err[0]
    assert not marker.exists()


def test_pickle_with_code_as_resume_checkpoint_is_refused(evil):
    path, marker = evil
    model = build_model("resnet20", "digits")
    optimizer = build_optimizer(model, 0.1, 0.9, 5e-4)
    run_dir = path.parent / "run"
    run_dir.mkdir()
    os.replace(path, run_dir / "last.pth")
    with pytest.raises(UnsafeCheckpointError, match="last.pth"):
        fit(model, [], [], epochs=1, optimizer=optimizer, scheduler=build_scheduler(optimizer, "cosine", 1, 1),
            device="cpu", run_dir=run_dir, resume=True)
    assert not marker.exists()


def test_pickle_with_code_as_statistics_file_is_refused(evil):
    path, marker = evil
    with pytest.raises(UnsafeCheckpointError, match="evil.pth"):
        Statistics.load(str(path))
    assert not marker.exists()


@pytest.fixture(scope="module")
def pruned_resnet20():
    """A ResNet-20 with 40% of its block filters masked by random scores: (dense model, NNI masks)."""
    torch.manual_seed(0)
    dense = build_model("resnet20", "cifar10").eval()
    graph = trace(dense, torch.zeros(1, 3, 32, 32))
    scores = {n: torch.rand(graph.modules[n].out_channels) for n in default_scope(graph)}
    return dense, to_nni_masks(dense, select("cdp", scores, sparsity=0.4)[0])


def test_slim_checkpoint_round_trips_through_load_slim(pruned_resnet20, tmp_path):
    dense, masks = pruned_resnet20
    model = slim(build_model("resnet20", "cifar10").eval(), masks, torch.zeros(1, 3, 32, 32))
    with torch.no_grad():  # weights no fresh build has, so a load that kept the init would show
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    save_slim_checkpoint(tmp_path / "slim.pth", "resnet20", model, masks, 10, dataset="cifar10")
    back = load_slim(tmp_path / "slim.pth")
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(back(x), model.eval()(x))
    assert back.state_dict().keys() == model.state_dict().keys()


def test_masks_checkpoint_round_trips_to_identical_masks_and_slim_network(pruned_resnet20, tmp_path):
    dense, masks = pruned_resnet20
    save_masks_checkpoint(tmp_path / "masks.pth", "resnet20", 10, masks, dense.state_dict())
    stored = torch.load(tmp_path / "masks.pth", weights_only=True)
    assert stored["masks"].keys() == masks.keys()
    assert all(m["kept"].dtype == torch.int64 for m in stored["masks"].values())
    back = expand_masks(dense, stored["masks"])
    for name, entry in masks.items():
        assert torch.equal(back[name]["weight"], entry["weight"]) and back[name]["bias"] is entry["bias"] is None
    x = torch.randn(2, 3, 32, 32)
    one, two = (slim(build_model("resnet20", "cifar10").eval(), m, torch.zeros(1, 3, 32, 32)) for m in (masks, back))
    two.load_state_dict(one.state_dict())
    with torch.no_grad():
        assert torch.equal(one(x), two(x))
    assert compact_masks(back).keys() == stored["masks"].keys()


def test_slim_leaves_the_masks_it_is_given_untouched():
    """NNI's ModelSpeedup writes into its masks; the masks saved after slimming must still be the chosen ones."""
    torch.manual_seed(0)
    model = build_model("resnet20", "cifar10").eval()
    graph = trace(model, torch.zeros(1, 3, 32, 32))
    units = prunable_units(graph, "all")
    scores = {n: torch.rand(graph.modules[n].out_channels) for n in unit_convs(units)}
    masks = to_nni_masks(model, select("gfi", scores, sparsity=0.5, graph=graph, units=units, round_to=2)[0])
    before = {n: m["weight"].clone() for n, m in masks.items()}
    slim(model, masks, torch.zeros(1, 3, 32, 32))
    assert all(torch.equal(masks[n]["weight"], w) for n, w in before.items())

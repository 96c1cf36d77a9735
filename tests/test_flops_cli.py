"""python -m cdp_gfi.flops: model names and every checkpoint kind, before and after pruning; bad input."""
import subprocess
import sys

import pytest
import torch

from cdp_gfi import build_model, count_flops, select, slim, to_nni_masks
from cdp_gfi.flops import main
from cdp_gfi.graph.trace import trace
from cdp_gfi.runs.imagenet_stage2 import save_masks_checkpoint
from cdp_gfi.slimming.slim_files import save_slim_checkpoint
from cdp_gfi.graph.scope import default_scope


def test_module_command_prints_resnet56_conv_linear_macs():
    done = subprocess.run([sys.executable, "-m", "cdp_gfi.flops", "resnet56", "--dataset", "cifar10"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    conv_linear = next(line for line in done.stdout.splitlines() if line.strip().startswith("conv-linear"))
    assert "125.49M" in conv_linear and done.stderr == ""


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    """A ResNet-20 with 40% of its block filters masked: (masks checkpoint, slim checkpoint, slim model)."""
    torch.manual_seed(0)
    dense = build_model("resnet20", "cifar10").eval()
    graph = trace(dense, torch.zeros(1, 3, 32, 32))
    scores = {n: torch.rand(graph.modules[n].out_channels) for n in default_scope(graph)}
    masks = to_nni_masks(dense, select("cdp", scores, sparsity=0.4)[0])
    folder = tmp_path_factory.mktemp("flops_cli")
    save_masks_checkpoint(folder / "masks.pth", "resnet20", 10, masks, dense.state_dict(), {"dataset": "cifar10"})
    model = slim(build_model("resnet20", "cifar10").eval(), masks, torch.zeros(1, 3, 32, 32))
    save_slim_checkpoint(folder / "slim.pth", "resnet20", model, masks, 10, {"dataset": "cifar10"}, dataset="cifar10")
    return folder / "masks.pth", folder / "slim.pth", model


def totals(out: str) -> dict:
    """{convention: [MACs before, MACs after, ..., params after, ...]} from --exact output."""
    rows = [line.split() for line in out.splitlines() if line.split()[:1] in (["conv-linear"], ["ptflops"])]
    return {row[0]: [float(v) for v in row[1:]] for row in rows}


@pytest.mark.parametrize("kind", [0, 1])
def test_checkpoint_before_and_after_equal_the_slim_models_counts(pruned, kind, capsys):
    assert main([str(pruned[kind]), "--exact"]) == 0
    out = capsys.readouterr().out
    assert "MACs before" in out and "MACs after" in out
    for convention, row in totals(out).items():
        macs, params = count_flops(pruned[2], (3, 32, 32), convention)
        dense_macs, dense_params = count_flops(build_model("resnet20", "cifar10"), (3, 32, 32), convention)
        assert row[:2] == [dense_macs, macs] and row[3:5] == [dense_params, params], convention


def test_per_layer_table(pruned, capsys):
    assert main([str(pruned[0]), "--per-layer"]) == 0
    out = capsys.readouterr().out
    line = next(line.split() for line in out.splitlines() if line.strip().startswith("layer1.0.conv1 "))
    assert int(line[2]) == 32 * 32 * 9 * 16 * 16 and int(line[4]) < int(line[2])


BAD = {
    "unknown model": (["resnet57"], "neither a checkpoint file nor a model name"),
    "missing file": (["{tmp}/absent.pth"], "no checkpoint file"),
    "not a checkpoint": (["{tmp}/notes.txt"], "is corrupt or not a torch checkpoint"),
    "bare tensor": (["{tmp}/tensor.pth"], "holds a Tensor, not a checkpoint"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_one_error_line_exit_2(case, tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("hello")
    torch.save(torch.zeros(3), tmp_path / "tensor.pth")
    argv, message = BAD[case]
    assert main([a.format(tmp=tmp_path) for a in argv]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert captured.out == ""

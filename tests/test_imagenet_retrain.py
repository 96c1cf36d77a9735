"""Stage 2 (imagenet/imagenet.py) end to end on the tiny image folder: masks route, slim route, resume, bad input."""
import copy
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from cdp_gfi import load_slim
from cdp_gfi.runs import imagenet_stage2 as retrain
from cdp_gfi.files.checkpoint import load_checkpoint
from cdp_gfi.flops import count_flops, keep_vectors
from cdp_gfi.graph.trace import trace
from cdp_gfi.masks.select import apply_masks, select, to_nni_masks
from cdp_gfi.models import build_model
from cdp_gfi.graph.scope import default_scope
from cdp_gfi.slimming.speedup import slim

REPO = Path(__file__).resolve().parents[1]
FAST = ["--epochs", "1", "--batch-size", "20", "--input-size", "32", "-j", "0", "--lr", "0.01", "--device", "cpu"]


@pytest.fixture(scope="module")
def stage1(tmp_path_factory) -> dict:
    """A masks checkpoint and a slim checkpoint of a 10-class resnet18 pruned by random scores."""
    root = tmp_path_factory.mktemp("stage1")
    torch.manual_seed(0)
    model = build_model("resnet18", "imagenet", num_classes=10).eval()
    dummy = torch.randn(1, 3, 64, 64)
    graph = trace(model, dummy)
    modules = dict(model.named_modules())
    gen = torch.Generator().manual_seed(0)
    scores = {n: torch.rand(modules[n].out_channels, generator=gen) for n in default_scope(graph)}
    keep, _ = select("cdp", scores, sparsity=0.5)
    masks = to_nni_masks(model, keep)
    retrain.save_masks_checkpoint(root / "masks.pth", "resnet18", 10, masks, model.state_dict(), {"sparsity": 0.5})
    slimmed = slim(apply_masks(copy.deepcopy(model), masks, graph), masks, dummy)
    retrain.save_slim_checkpoint(root / "slim.pth", "resnet18", slimmed, masks, 10)
    return {"masks": root / "masks.pth", "slim": root / "slim.pth", "mask_dict": masks}


def _run(imagefolder_root: Path, out: Path, *extra: str) -> int:
    return retrain.main(["--dataroot", str(imagefolder_root), "--results_dir", str(out), *FAST, *extra])


def _error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_masks_route_keeps_pruned_weights_zero_and_slims(stage1, imagefolder_root, tmp_path, capsys):
    out = tmp_path / "out"
    assert _run(imagefolder_root, out, "--resume", str(stage1["masks"]), "--make-mask") == 0
    ckpt = load_checkpoint(out / retrain.CHECKPOINT_NAME)
    assert ckpt["kind"] == "retrain" and ckpt["route"] == "masked" and ckpt["epoch"] == 1
    state = ckpt["state_dict"]
    dense = build_model("resnet18", "imagenet", num_classes=10)
    dense.load_state_dict(state)
    graph = trace(dense, torch.randn(1, 3, 64, 64))
    changed = False
    for name, keep in keep_vectors(stage1["mask_dict"]).items():
        assert state[f"{name}.weight"][~keep].abs().max() == 0
        bn = name.replace("conv", "bn")
        assert state[f"{bn}.weight"][~keep].abs().max() == 0 and state[f"{bn}.bias"][~keep].abs().max() == 0
        changed |= bool(state[f"{bn}.bias"][keep].abs().max() > 0)
    assert changed, "the kept channels should have trained"
    final = load_checkpoint(out / retrain.SLIM_FINAL_NAME)
    assert final["kind"] == "slim" and final["model_name"] == "resnet18"
    slim_net = load_slim(out / retrain.SLIM_FINAL_NAME)
    assert sum(p.numel() for p in slim_net.parameters()) < sum(p.numel() for p in dense.parameters())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(slim_net(x), apply_masks(dense.eval(), stage1["mask_dict"], graph)(x),
                                   atol=1e-4, rtol=1e-4)
    assert (out / retrain.BEST_NAME).exists() and len(pd.read_csv(out / "log.csv")) == 1
    summary = json.loads((out / "summary.json").read_text())  # stage 2 ends with the final slim network's figures
    assert (summary["macs"], summary["params"]) == count_flops(slim_net, (3, summary["input_size"], summary["input_size"]))
    assert summary["final_top1"] == pd.read_csv(out / "log.csv")["test_top1"].iloc[-1]
    assert f"top-1 {summary['final_top1']:.2f}%" in capsys.readouterr().out


def test_slim_route_trains_the_slimmed_model(stage1, imagefolder_root, tmp_path):
    out = tmp_path / "out"
    assert _run(imagefolder_root, out, "--resume", str(stage1["slim"]), "--warmup", "0.5", "--warm_lr", "0.001") == 0
    ckpt = load_checkpoint(out / retrain.CHECKPOINT_NAME)
    assert ckpt["route"] == "slim" and not (out / retrain.SLIM_FINAL_NAME).exists()
    stored = load_checkpoint(stage1["slim"])
    assert all(torch.equal(ckpt["masks"][n]["kept"], m["kept"]) for n, m in stored["masks"].items())
    slimmed = stored["state_dict"]
    assert {k: v.shape for k, v in ckpt["state_dict"].items()} == {k: v.shape for k, v in slimmed.items()}
    log = pd.read_csv(out / "log.csv")
    assert list(log["epoch"]) == [1] and 0 <= log["test_top1"].iloc[0] <= log["test_top5"].iloc[0] <= 100


def test_resume_continues_from_the_saved_epoch(stage1, imagefolder_root, tmp_path, monkeypatch):
    args = ("--resume", str(stage1["slim"]), "--epochs", "2")
    assert _run(imagefolder_root, tmp_path / "full", *args) == 0
    real_fit = retrain.fit

    def interrupted_fit(*a, **kw):
        def stop(epoch, row):
            raise KeyboardInterrupt
        return real_fit(*a, on_epoch_end=stop, **kw)

    monkeypatch.setattr(retrain, "fit", interrupted_fit)
    with pytest.raises(KeyboardInterrupt):
        _run(imagefolder_root, tmp_path / "cut", *args)
    monkeypatch.setattr(retrain, "fit", real_fit)
    cut = tmp_path / "cut" / retrain.CHECKPOINT_NAME
    assert load_checkpoint(cut)["epoch"] == 1
    assert _run(imagefolder_root, tmp_path / "moved", "--resume", str(cut), "--epochs", "2", "--start-epoch", "5") == 0
    full, resumed = (load_checkpoint(tmp_path / d / retrain.CHECKPOINT_NAME) for d in ("full", "moved"))
    assert resumed["epoch"] == 2 and len(resumed["log"]) == 2
    for key, value in full["state_dict"].items():
        torch.testing.assert_close(resumed["state_dict"][key], value, atol=1e-6, rtol=1e-6)


def test_evaluate_writes_nothing(stage1, imagefolder_root, tmp_path, capsys):
    assert _run(imagefolder_root, tmp_path / "out", "--resume", str(stage1["slim"]), "-e") == 0
    assert "top1=" in capsys.readouterr().out and not (tmp_path / "out").exists()


def _tree(tmp_path: Path, imagefolder_root: Path, splits=("train", "val")) -> Path:
    root = tmp_path / "data"
    for split in splits:
        shutil.copytree(imagefolder_root / split, root / split)
    return root


def test_bad_data_roots(stage1, imagefolder_root, tmp_path, capsys):
    resume = ("--resume", str(stage1["slim"]))
    no_val = _tree(tmp_path / "a", imagefolder_root, ("train",))
    assert _run(no_val, tmp_path / "out", *resume) == 2
    assert "val" in _error_line(capsys)
    differ = _tree(tmp_path / "b", imagefolder_root)
    (differ / "val" / "digit_3").rename(differ / "val" / "digit_x")
    assert _run(differ, tmp_path / "out", *resume) == 2
    assert "class folders differ" in _error_line(capsys)
    assert not (tmp_path / "out").exists()


def test_unreadable_images_fail_or_are_skipped(stage1, imagefolder_root, tmp_path, capsys):
    root = _tree(tmp_path, imagefolder_root)
    (root / "val" / "digit_0" / "6.png").write_bytes(b"not a png")
    assert _run(root, tmp_path / "out", "--resume", str(stage1["slim"]), "-e") == 2
    assert "cannot decode image" in _error_line(capsys)
    with pytest.warns(RuntimeWarning, match="1 skipped so far"):
        assert _run(root, tmp_path / "out", "--resume", str(stage1["slim"]), "-e", "--skip-unreadable") == 0
    assert not (tmp_path / "out").exists()


def test_bad_checkpoints(stage1, imagefolder_root, tmp_path, capsys):
    out = tmp_path / "out"
    assert _run(imagefolder_root, out, "--resume", str(stage1["masks"])) == 2
    assert "add --make-mask" in _error_line(capsys)
    assert _run(imagefolder_root, out, "--resume", str(stage1["slim"]), "--make-mask") == 2
    assert "already slimmed resnet18" in _error_line(capsys)
    assert _run(imagefolder_root, out, "--resume", str(stage1["masks"]), "--make-mask", "--model", "resnet34") == 2
    line = _error_line(capsys)
    assert "does not match ResNet" in line and "missing keys" in line and "layer1.2" in line
    masks = load_checkpoint(stage1["masks"])
    bad = {"layer9.conv1" if n == "layer1.0.conv1" else n: m for n, m in masks["masks"].items()}
    bad["layer2.0.conv1"] = {"kept": torch.arange(3), "filters": 3}
    torch.save({**masks, "masks": bad}, tmp_path / "bad.pth")
    assert _run(imagefolder_root, out, "--resume", str(tmp_path / "bad.pth"), "--make-mask") == 2
    line = _error_line(capsys)
    assert "layer9.conv1: not a Conv2d" in line and "layer2.0.conv1: 3 filters in the masks, 128 in the model" in line
    assert not out.exists()


def test_script_reports_one_error_line_and_exit_status_2(imagefolder_root, tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "imagenet" / "imagenet.py"), "--dataroot", str(tmp_path),
                           "--model", "resnet18"], capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "train" in proc.stderr

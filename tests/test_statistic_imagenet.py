"""statistic_imagenet.py (stage 1) end to end on the tiny image folder, into stage 2; sweeps, reuse, DDP, bad input."""
import importlib.util
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import pandas as pd
import pytest
import torch

import cdp_gfi.runs.imagenet_stage1 as stage1
import cdp_gfi.runs.cifar_steps as stage1_steps
import cdp_gfi.statistics.collect as statistics
from cdp_gfi.runs import imagenet_stage2 as retrain
from cdp_gfi.files.checkpoint import load_checkpoint
from cdp_gfi import load_slim
from cdp_gfi.data.datasets import imagenet_datasets
from cdp_gfi.data.samplers import make_loader
from cdp_gfi.files.mask_files import expand_masks, kept_vectors
from cdp_gfi.graph.trace import trace
from cdp_gfi.masks.select import apply_masks
from cdp_gfi.models import build_model
from cdp_gfi.train.recalibrate import recalibrate_batchnorm
from cdp_gfi.scores.importance import cdp_scores
from cdp_gfi.statistics.store import Statistics
from cdp_gfi.train.loop import seed_everything
from nets import MacTimer

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "statistic_imagenet.py"
_spec = importlib.util.spec_from_file_location("statistic_imagenet", SCRIPT)
script = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(script)

FILES = ("masks.pth", "slim.pth", "layers.csv", "costs.csv")
STAGE2 = ["--epochs", "1", "--batch-size", "20", "--input-size", "32", "-j", "0", "--lr", "0.01", "--device", "cpu"]


def args(root: Path, out: Path, *extra: str, device: str = "cpu") -> List[str]:
    """Tiny stage-1 settings: resnet18 at 32x32, 5 batches of 8 of the 60 training digits."""
    return ["--model", "resnet18", "--dataroot", str(root), "--input_size", "32", "--stop_batch", "5",
            "--batch_size", "8", "-j", "0", "--save_model_path", str(out), *extra,
            *(["--device", device] if device else [])]


def keep_of(path: Path) -> Dict[str, torch.Tensor]:
    return kept_vectors(load_checkpoint(path)["masks"])


def assert_same_keep(a: Path, b: Path) -> None:
    ka, kb = keep_of(a), keep_of(b)
    assert ka.keys() == kb.keys() and all(torch.equal(ka[n], kb[n]) for n in ka)


class Counter:
    """Wraps a function and counts its calls (and remembers what it returned)."""

    def __init__(self, fn):
        self.fn, self.calls, self.results = fn, 0, []

    def __call__(self, *a, **kw):
        self.calls += 1
        self.results.append(self.fn(*a, **kw))
        return self.results[-1]


def counted_run(argv: List[str], module, name: str) -> Counter:
    """Run stage 1 with ``module.name`` counted; asserts success."""
    counter = Counter(getattr(module, name))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(module, name, counter)
        assert script.main(argv) == 0
    return counter


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: on a small shared machine extra threads mostly wait for each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def cdp_dir(imagefolder_root, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cdp")
    assert script.main(args(imagefolder_root, out, "--allow_random_init", "--sparsity", "0.5")) == 0
    return out


@pytest.fixture(scope="module")
def gfi_sweep(imagefolder_root, tmp_path_factory):
    """A GFI-AP sweep of two sparsities: (output folder, calls of collect_statistics)."""
    out = tmp_path_factory.mktemp("gfi")
    calls = counted_run(args(imagefolder_root, out, "--allow_random_init", "--method", "gfi", "--sparsity",
                             "0.3,0.5"), stage1, "collect_statistics").calls
    return out, calls


def test_cdp_run_writes_every_file_and_the_slim_net_equals_the_masked_one(cdp_dir, imagefolder_root):
    for name in ("statistics.pth", "results.csv", *FILES):
        assert (cdp_dir / name).is_file(), name
    masks_ckpt, slim_ckpt = load_checkpoint(cdp_dir / "masks.pth"), load_checkpoint(cdp_dir / "slim.pth")
    assert masks_ckpt["kind"] == "masks" and masks_ckpt["model"] == "resnet18" and masks_ckpt["num_classes"] == 10
    assert slim_ckpt["kind"] == "slim" and slim_ckpt["model_name"] == "resnet18"
    dense = build_model("resnet18", "imagenet", num_classes=10)
    dense.load_state_dict(masks_ckpt["state_dict"])
    graph = trace(dense, torch.zeros(1, 3, 32, 32))
    masked = apply_masks(dense.eval(), expand_masks(dense, masks_ckpt["masks"]), graph)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        slim_net = load_slim(cdp_dir / "slim.pth")
        assert not torch.allclose(slim_net(x), masked(x), atol=1e-3)  # its BN was re-estimated ...
    # ... on the same 8 batches (the default 20, capped by 60 images / batch 8) that re-estimate the masked one
    plain = imagenet_datasets(imagefolder_root, 32)[1]
    recalibrate_batchnorm(masked, make_loader(plain, 8, shuffle=True, seed=0), 8, progress=False)
    with torch.no_grad():
        torch.testing.assert_close(slim_net(x), masked(x), atol=1e-4, rtol=1e-4)
    results = pd.read_csv(cdp_dir / "results.csv")
    assert results["macs_after"].iloc[0] < results["macs_before"].iloc[0]
    assert (results[["dense_latency_ms_b1", "slim_latency_ms_b1", "dense_latency_ms_b8", "slim_latency_ms_b8"]] > 0
            ).all(axis=None) and results["latency_device"].iloc[0].startswith("cpu")
    assert results["ptflops_macs_after"].iloc[0] < results["ptflops_macs_before"].iloc[0]
    costs = pd.read_csv(cdp_dir / "costs.csv")
    assert list(costs["convention"]) == ["conv-linear", "ptflops"]
    layers = pd.read_csv(cdp_dir / "layers.csv")
    assert (layers["kept"] < layers["total"]).any() and (layers["kept"] > 0).all()
    # the default CDP: adaptive threshold at p = 0.5, no layer losing more than 60% of its filters
    removed = 1 - layers["kept"].sum() / layers["total"].sum()
    assert len(results) == 1 and results["achieved_sparsity"].iloc[0] == pytest.approx(removed)
    assert 0.3 < removed <= 0.51 and ((layers["total"] - layers["kept"]) <= 0.6 * layers["total"]).all()


@pytest.mark.parametrize("route", ["masks", "slim"])
def test_stage2_accepts_stage1_checkpoints(cdp_dir, imagefolder_root, tmp_path, route):
    extra = ["--resume", str(cdp_dir / f"{route}.pth")] + (["--make-mask"] if route == "masks" else [])
    out = tmp_path / "stage2"
    assert retrain.main(["--dataroot", str(imagefolder_root), "--results_dir", str(out), *STAGE2, *extra]) == 0
    ckpt = load_checkpoint(out / retrain.CHECKPOINT_NAME)
    assert ckpt["epoch"] == 1 and ckpt["route"] == ("masked" if route == "masks" else "slim")


def test_pretrained_file_gives_the_masks_of_the_same_seeded_weights(cdp_dir, imagefolder_root, tmp_path):
    seed_everything(0)
    weights = tmp_path / "resnet18.pth"
    torch.save({"state_dict": build_model("resnet18", "imagenet", num_classes=10).state_dict()}, weights)
    out = tmp_path / "out"
    assert script.main(args(imagefolder_root, out, "--pretrained_dir", str(weights), "--sparsity", "0.5")) == 0
    assert_same_keep(out / "masks.pth", cdp_dir / "masks.pth")


def test_statistics_are_reused_unless_recomputation_is_asked(cdp_dir, imagefolder_root, tmp_path, capsys):
    (tmp_path / "stats").mkdir()
    shutil.copy(cdp_dir / "statistics.pth", tmp_path / "stats" / "statistics.pth")
    common = args(imagefolder_root, tmp_path / "again", "--allow_random_init", "--sparsity", "0.5",
                  "--save_statistic_path", str(tmp_path / "stats"))
    capsys.readouterr()
    assert counted_run(common, stage1, "collect_statistics").calls == 0
    assert "statistics: reusing" in capsys.readouterr().out
    assert_same_keep(tmp_path / "again" / "masks.pth", cdp_dir / "masks.pth")
    common[common.index(str(tmp_path / "again"))] = str(tmp_path / "recomputed")  # "again" holds a run now
    assert counted_run([*common, "--recompute_statistics"], stage1, "collect_statistics").calls == 1


def run_on_saved_statistics(cdp_dir, imagefolder_root, out, *flags) -> pd.DataFrame:
    """Stage 1 into ``out`` with ``flags``, reusing the CDP run's statistics; its results.csv."""
    stats = out.parent / "stats"
    stats.mkdir(exist_ok=True)
    shutil.copy(cdp_dir / "statistics.pth", stats / "statistics.pth")
    assert script.main(args(imagefolder_root, out, "--allow_random_init", *flags,
                            "--save_statistic_path", str(stats))) == 0
    return pd.read_csv(out / "results.csv")


def test_flops_target_is_met_in_the_slim_network(cdp_dir, imagefolder_root, tmp_path):
    results = run_on_saved_statistics(cdp_dir, imagefolder_root, tmp_path / "flops", "--flops_reduction", "0.3")
    assert results["target"].iloc[0] == "flops_reduction"
    assert results["macs_reduction_pct"].iloc[0] == pytest.approx(30.0, abs=0.5)


def test_latency_target_is_met_and_reported(cdp_dir, imagefolder_root, tmp_path, monkeypatch):
    monkeypatch.setenv("CDP_GFI_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(stage1_steps, "latency_timer", lambda config: MacTimer())
    out = tmp_path / "latency"
    results = run_on_saved_statistics(cdp_dir, imagefolder_root, out, "--latency_reduction", "0.3")
    assert results["target"].iloc[0] == "latency_reduction" and results["target_value"].iloc[0] == 0.3
    assert results["latency_measured_reduction_pct"].iloc[0] == pytest.approx(30.0, abs=2.0)
    x = torch.zeros(1, 3, 32, 32)
    dense = build_model("resnet18", "imagenet", num_classes=10).eval()
    assert 1 - MacTimer()(load_slim(out / "slim.pth"), x) / MacTimer()(dense, x) == pytest.approx(0.3, abs=0.02)


def test_sweep_scores_every_point_from_one_statistics_pass(gfi_sweep):
    out, calls = gfi_sweep
    assert calls == 1
    results = pd.read_csv(out / "results.csv")
    assert list(results["target_value"]) == [0.3, 0.5] and set(results["target"]) == {"sparsity"}
    assert results["achieved_sparsity"].iloc[0] < results["achieved_sparsity"].iloc[1]
    assert (results["macs_reduction_pct"] > 0).all() and (results["params_reduction_pct"] > 0).all()
    for point in ("sparsity_0.3", "sparsity_0.5"):
        assert all((out / point / name).is_file() for name in FILES)
    assert not (out / "masks.pth").exists()


def test_gfi_statistics_read_class_by_class_in_one_pass(gfi_sweep, imagefolder_root, tmp_path):
    out = tmp_path / "ordered"
    plans = counted_run(args(imagefolder_root, out, "--allow_random_init", "--method", "gfi", "--sparsity", "0.3"),
                        statistics, "plan_gfi_passes")
    assert plans.calls == 0  # class-ordered: one class's maps at a time, no passes to plan
    assert_same_keep(out / "masks.pth", gfi_sweep[0] / "sparsity_0.3" / "masks.pth")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_process_torchrun_gives_the_single_process_masks(cdp_dir, imagefolder_root, tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(_free_port()), str(SCRIPT),
                           *args(imagefolder_root, out, "--allow_random_init", "--sparsity", "0.5")],
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("statistics: sampling 40 images") == 1  # rank 0 alone speaks
    assert_same_keep(out / "masks.pth", cdp_dir / "masks.pth")
    ddp, one = Statistics.load(str(out / "statistics.pth")), Statistics.load(str(cdp_dir / "statistics.pth"))
    assert ddp.num_images == one.num_images == 40 and torch.equal(ddp.class_counts, one.class_counts)
    ddp_scores, one_scores = cdp_scores(ddp, "sample")[0], cdp_scores(one, "sample")[0]  # the default documents
    for name in one.layers:
        torch.testing.assert_close(ddp_scores[name], one_scores[name], atol=1e-5, rtol=1e-5)


def _status(argv: List[str]) -> int:
    """Exit status of the script's main (argparse's own errors exit)."""
    try:
        return script.main(argv)
    except SystemExit as exit_:
        return exit_.code


def _error(capsys, argv: List[str]) -> str:
    capsys.readouterr()
    assert _status(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


BAD = [
    (["--sparsity", "1.5"], "strictly between 0 and 1"),
    (["--sparsity", "0.3,0"], "strictly between 0 and 1"),
    (["--sparsity", "0.3,x"], "comma-separated numbers"),
    (["--flops_reduction", "0.4,1"], "strictly between 0 and 1"),
    (["--sparsity", "0.3", "--flops_reduction", "0.4"], "exactly one of"),
    ([], "exactly one of"),
    (["--sparsity", "0.3", "--model", "resnet20"], "unknown model 'resnet20' for dataset 'imagenet'"),
    (["--sparsity", "0.3", "--dist_timeout", "0"], "--dist_timeout"),
    (["--sparsity", "0.3", "--input_size", "8"], "--input_size"),
    (["--sparsity", "0.3", "--latency_reduction", "0.3"], "give --latency_reduction or --sparsity, not both"),
    (["--flops_reduction", "0.3", "--latency_reduction", "0.3,0.4"], "--latency_reduction or --flops_reduction"),
    (["--latency_reduction", "0.3", "--latency_batch", "0"], "--latency_batch must be an integer >= 1"),
    (["--latency_reduction", "0.3", "--latency_device", "cuda:99" if torch.cuda.is_available() else "cuda"],
     "is not there"),
]


@pytest.mark.parametrize("extra, message", BAD)
def test_bad_flags_get_one_error_line(imagefolder_root, tmp_path, capsys, extra, message):
    argv = args(imagefolder_root, tmp_path / "out", "--allow_random_init", *extra)
    assert message in _error(capsys, argv)
    assert not (tmp_path / "out").exists()


def test_bad_paths_and_inputs_get_one_error_line(imagefolder_root, cdp_dir, tmp_path, capsys):
    out = tmp_path / "out"
    line = _error(capsys, args(imagefolder_root, out, "--allow_random_init", "--sparsity", "0.3", "--gpus",
                               str(torch.cuda.device_count()), device=None))
    assert f"only {torch.cuda.device_count()} CUDA devices" in line
    assert "train" in _error(capsys, args(tmp_path / "nowhere", out, "--allow_random_init", "--sparsity", "0.3"))
    assert "untrained" in _error(capsys, args(imagefolder_root, out, "--sparsity", "0.3"))
    assert "--bn_recalibrate 9 asks for more batches than the training set gives (8" in _error(capsys, args(
        imagefolder_root, out, "--allow_random_init", "--sparsity", "0.3", "--bn_recalibrate", "9"))
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert "cannot write" in _error(capsys, args(imagefolder_root, blocker / "x", "--allow_random_init",
                                                 "--sparsity", "0.3"))
    resnet34 = tmp_path / "resnet34.pth"
    torch.save(build_model("resnet34", "imagenet", num_classes=10).state_dict(), resnet34)
    assert "does not fit" in _error(capsys, args(imagefolder_root, out, "--pretrained_dir", str(resnet34),
                                                   "--sparsity", "0.3"))
    stats = Statistics.load(str(cdp_dir / "statistics.pth"))
    stats.layers = {name: [s + 1 for s in shape] for name, shape in stats.layers.items()}
    stats.save(str(tmp_path / "other.pth"))
    assert "does not match this model" in _error(capsys, args(
        imagefolder_root, out, "--allow_random_init", "--sparsity", "0.3", "--save_statistic_path", str(tmp_path),
        "--save_statistic_file", "other.pth"))
    line = _error(capsys, args(imagefolder_root, out, "--allow_random_init", "--sparsity", "0.3",
                               "--save_statistic_path", str(cdp_dir), "--stop_batch", "4"))
    assert "stop_batch 5 in file, 4 now" in line and "--recompute_statistics" in line
    seed_everything(1)
    other = tmp_path / "other_weights.pth"
    torch.save(build_model("resnet18", "imagenet", num_classes=10).state_dict(), other)
    line = _error(capsys, args(imagefolder_root, out, "--pretrained_dir", str(other), "--sparsity", "0.3",
                               "--save_statistic_path", str(cdp_dir)))
    assert "from other weights: weights_sha256" in line and "--recompute_statistics" in line
    assert "--recompute_statistics" in _error(capsys, args(
        imagefolder_root, out, "--allow_random_init", "--sparsity", "0.3", "--save_statistic_path", str(cdp_dir),
        "--method", "gfi"))
    assert not any(out.rglob("*"))


def test_nan_weights_name_the_layer_and_write_nothing(imagefolder_root, tmp_path, capsys):
    seed_everything(0)
    state = build_model("resnet18", "imagenet", num_classes=10).state_dict()
    state["layer1.0.conv1.weight"][0] = float("nan")
    weights = tmp_path / "nan.pth"
    torch.save(state, weights)
    out = tmp_path / "out"
    line = _error(capsys, args(imagefolder_root, out, "--pretrained_dir", str(weights), "--sparsity", "0.3",
                               "--stop_batch", "1"))
    assert "non-finite" in line and "layer1.0.conv1" in line
    assert not any(out.rglob("*"))

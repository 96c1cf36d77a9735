"""prune_cifar.py end to end: tiny CIFAR and digits runs, resume after Ctrl-C, statistics reuse, bad input."""
import importlib.util
import json
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest
import torch
from torch.utils.data import Subset

from cdp_gfi.runs import cifar, cifar_config, cifar_steps
from cdp_gfi import build_model, load_slim, slim
from cdp_gfi.files.checkpoint import load_checkpoint, load_state_dict_strict
from cdp_gfi.data.datasets import cifar_datasets, digits_datasets
from cdp_gfi.data.samplers import make_loader
from cdp_gfi.statistics.fingerprint import FingerprintMismatchError
from cdp_gfi.flops import keep_vectors
from cdp_gfi.files.mask_files import expand_masks
from cdp_gfi.train.loop import evaluate
from nets import MacTimer

SCRIPT = Path(__file__).resolve().parents[1] / "prune_cifar.py"
_spec = importlib.util.spec_from_file_location("prune_cifar", SCRIPT)
prune_cifar = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(prune_cifar)

LOGGED = ["epoch", "lr", "train_loss", "train_top1", "test_loss", "test_top1", "test_top5"]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    """A ResNet-20 checkpoint as DataParallel saves it: {'state_dict': {'module.conv1.weight': ...}}."""
    torch.manual_seed(0)
    state = build_model("resnet20", "cifar10").state_dict()
    path = tmp_path_factory.mktemp("pretrained") / "resnet20.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 160}, path)
    return path


def cifar_args(root: Path, pretrained: Path, save_dir: Path, *extra: str) -> list:
    """Tiny settings on the 150-image CIFAR fixture."""
    return ["--dataroot", str(root), "--no_integrity_check", "--pretrained_dir", str(pretrained),
            "--sparsity", "0.3", "--stop_batch", "2", "--batch_size", "32", "--epochs", "3", "--workers", "0",
            "--save_dir", str(save_dir), *extra]


def config_of(argv: list) -> cifar_config.PruneConfig:
    return cifar_config.PruneConfig(**vars(prune_cifar.build_parser().parse_args(argv)))


@pytest.fixture(scope="module")
def cifar_run(tmp_path_factory, cifar_root, pretrained):
    """One uninterrupted tiny CIFAR run that also writes its statistics file: (save_dir, stats file, argv)."""
    save_dir = tmp_path_factory.mktemp("cifar_run")
    stats = save_dir.parent / "cifar_run_stats.pth"
    argv = cifar_args(cifar_root, pretrained, save_dir, "--statistics_file", str(stats))
    assert prune_cifar.main(argv) == 0
    return save_dir, stats, argv


def test_cifar_run_writes_reports_checkpoints_and_summary(cifar_run, cifar_root):
    save_dir, stats, _ = cifar_run
    for name in ("args.json", "pruned.pth", "layers.csv", "costs.csv", "log.csv", "last.pth", "best.pth",
                 "summary.json", "summary.csv"):
        assert (save_dir / name).is_file(), name
    assert stats.is_file()
    assert not list(save_dir.glob("*.tmp")) and not list(save_dir.glob(".*.tmp"))
    layers = pd.read_csv(save_dir / "layers.csv")
    assert list(layers["layer"]) == [f"layer{s}.{b}.conv1" for s in (1, 2, 3) for b in range(3)]
    assert (layers["kept"] <= layers["total"]).all() and layers["kept"].min() >= 1
    removed = (layers["total"] - layers["kept"]).sum() / layers["total"].sum()
    assert removed == pytest.approx(0.3, abs=0.01)
    costs = pd.read_csv(save_dir / "costs.csv")
    assert list(costs["convention"]) == ["conv-linear", "ptflops"]
    assert costs.loc[0, "macs_before"] == 40_551_040  # ResNet-20 conv + linear MACs
    assert (costs["macs_after"] < costs["macs_before"]).all()
    summary = json.loads((save_dir / "summary.json").read_text())
    row = pd.read_csv(save_dir / "summary.csv")
    assert len(row) == 1 and row.loc[0, "macs_after"] == summary["macs_after"]
    log = pd.read_csv(save_dir / "log.csv")
    assert list(log["epoch"]) == [1, 2, 3] and summary["pruned_top1"] == pytest.approx(log["test_top1"].iloc[-1])
    assert summary["macs_reduction_pct"] == pytest.approx(costs.loc[0, "macs_reduction_pct"])
    assert summary["method"] == "cdp" and summary["sparsity"] == 0.3 and summary["wall_time_s"] > 0
    assert summary["bn_recalibrate"] == 5  # the default 20 batches, capped by the 150-image training set
    assert 0 <= summary["pruned_top1_before_finetune"] <= 100 and 0 <= summary["pruned_top1_recalibrated"] <= 100
    for b in (1, 32):  # batch 1 and the run's, on the run's device (real timings: only their presence is sure)
        assert summary[f"dense_latency_ms_b{b}"] > 0 and summary[f"slim_latency_ms_b{b}"] > 0
        assert summary[f"slim_latency_iqr_ms_b{b}"] >= 0 and f"latency_reduction_pct_b{b}" in summary
    assert summary["latency_device"].startswith("cpu") and summary["latency_threads"] >= 1
    assert summary["latency_reduction"] is None and "latency_tries" not in summary


def test_checkpoint_reloads_with_load_slim(cifar_run, cifar_root):
    save_dir, _, _ = cifar_run
    ckpt = torch.load(save_dir / "last.pth", weights_only=True)  # tensors and plain containers only
    net = load_slim(save_dir / "last.pth")
    assert ckpt["epoch"] == 3 and ckpt["args"]["sparsity"] == 0.3 and "optimizer" in ckpt and "scheduler" in ckpt
    rebuilt = build_model("resnet20", "cifar10").eval()  # architecture from the masks, weights from the state_dict
    slim(rebuilt, expand_masks(rebuilt, ckpt["masks"]), torch.zeros(1, 3, 32, 32))
    load_state_dict_strict(rebuilt, ckpt["state_dict"])
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(net(x), rebuilt(x))
    test = make_loader(cifar_datasets(cifar_root, check_integrity=False)[2], 32, shuffle=False)
    summary = json.loads((save_dir / "summary.json").read_text())
    assert evaluate(net, test, "cpu")["top1"] == pytest.approx(summary["pruned_top1"])


def test_statistics_file_is_reused_and_gives_the_same_masks(cifar_run, tmp_path, monkeypatch):
    save_dir, _, argv = cifar_run

    def must_not_run(*args, **kwargs):
        raise AssertionError("statistics were gathered again")

    monkeypatch.setattr(cifar_steps, "collect_statistics", must_not_run)
    argv = [a if a != str(save_dir) else str(tmp_path) for a in argv] + ["--epochs", "1"]
    assert prune_cifar.main(argv) == 0
    first = torch.load(save_dir / "pruned.pth", weights_only=True)["masks"]
    again = torch.load(tmp_path / "pruned.pth", weights_only=True)["masks"]
    assert first.keys() == again.keys()
    assert all(torch.equal(first[n]["kept"], again[n]["kept"]) for n in first)


def test_statistics_file_of_other_weights_or_settings_is_refused(cifar_run):
    _, stats, argv = cifar_run
    config = cifar_config.resolve(config_of(argv))
    torch.manual_seed(1)
    other = build_model("resnet20", "cifar10")  # the same architecture, other weights
    with pytest.raises(FingerprintMismatchError, match="other weights: weights_sha256"):
        cifar_steps.load_statistics(config, other)
    trained = build_model("resnet20", "cifar10")
    load_state_dict_strict(trained, argv[argv.index("--pretrained_dir") + 1])
    assert cifar_steps.load_statistics(config, trained).meta["fingerprint"]["stop_batch"] == 2
    with pytest.raises(FingerprintMismatchError, match="stop_batch 2 in file, 3 now"):
        cifar_steps.load_statistics(replace(config, stop_batch=3), trained)


def interrupt_after_epoch_2(epoch, row):
    if epoch == 2:
        raise KeyboardInterrupt


def test_resume_after_interrupt_matches_uninterrupted_run(cifar_run, cifar_root, pretrained, tmp_path):
    reference, _, _ = cifar_run
    argv = cifar_args(cifar_root, pretrained, tmp_path)
    with pytest.raises(KeyboardInterrupt):
        cifar.run(config_of(argv), on_epoch_end=interrupt_after_epoch_2)
    assert torch.load(tmp_path / "last.pth", weights_only=True)["epoch"] == 2
    assert not (tmp_path / "summary.json").exists()
    assert prune_cifar.main(argv + ["--resume"]) == 0
    resumed = torch.load(tmp_path / "last.pth", weights_only=True)
    expected = torch.load(reference / "last.pth", weights_only=True)
    for key, value in expected["state_dict"].items():
        assert torch.equal(resumed["state_dict"][key], value), key
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "log.csv")[LOGGED], pd.read_csv(reference / "log.csv")[LOGGED])


def test_sigint_keeps_the_last_complete_checkpoint(cifar_root, pretrained, tmp_path):
    argv = cifar_args(cifar_root, pretrained, tmp_path) + ["--epochs", "60"]
    # SIGINT as a terminal sends it, even where the tests run in a background job (which starts with it ignored,
    # and Python then installs no KeyboardInterrupt handler)
    proc = subprocess.Popen([sys.executable, str(SCRIPT), *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while not (tmp_path / "last.pth").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-2000:]
    assert "interrupted" in err and "Traceback" not in err
    assert 1 <= torch.load(tmp_path / "last.pth", weights_only=True)["epoch"] < 60
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """The digits demo with tiny settings (one baseline epoch, one fine-tuning epoch): (save_dir, baseline_dir)."""
    save_dir, base_dir = tmp_path_factory.mktemp("digits_run"), tmp_path_factory.mktemp("digits_base")
    argv = ["--dataset", "digits", "--baseline_epochs", "1", "--epochs", "1", "--batch_size", "128",
            "--save_dir", str(save_dir), "--baseline_dir", str(base_dir)]
    assert prune_cifar.main(argv) == 0
    return save_dir, base_dir


def test_digits_demo_trains_caches_and_prunes_its_baseline(digits_run):
    save_dir, base_dir = digits_run
    cached = list(base_dir.iterdir())
    config = cifar_config.resolve(config_of(["--dataset", "digits", "--baseline_epochs", "1", "--batch_size", "128",
                                         "--baseline_dir", str(base_dir)]))
    assert [p.name for p in cached] == [cifar_steps.baseline_path(config).name]
    assert cached[0].name.startswith("resnet20_digits_seed0_e1_")
    assert load_checkpoint(cached[0])["recipe"] == cifar_steps.baseline_recipe(config)
    other_recipes = [replace(config, wd=1e-4), replace(config, batch_size=64), replace(config, baseline_epochs=2)]
    assert len({cifar_steps.baseline_path(c) for c in [config, *other_recipes]}) == 4  # each would train its own
    assert pd.read_csv(save_dir / "baseline" / "log.csv")["epoch"].tolist() == [1]
    summary = json.loads((save_dir / "summary.json").read_text())
    assert summary["flops_reduction"] == cifar_config.DIGITS_FLOPS_REDUCTION
    assert summary["macs_reduction_pct"] == pytest.approx(45.0, abs=0.5)
    assert 0 <= summary["pruned_top1"] <= 100 and summary["baseline_top1"] > 10  # one epoch learns something


@pytest.fixture
def small_digits(monkeypatch):
    """Digits cut to 256 training and 64 test images, so per-layer retraining takes seconds."""
    def small(seed=0):
        train_aug, train_plain, test = digits_datasets(seed)
        return Subset(train_aug, range(256)), Subset(train_plain, range(256)), Subset(test, range(64))

    monkeypatch.setattr(cifar_steps, "digits_datasets", small)


def test_layerwise_retrain_holds_masks_and_keeps_one_shot_masks(digits_run, small_digits, tmp_path, monkeypatch,
                                                                capsys):
    _, base_dir = digits_run  # reuses the cached baseline
    common = ["--dataset", "digits", "--method", "gfi", "--sparsity", "0.2", "--epochs", "1", "--batch_size", "64",
              "--baseline_dir", str(base_dir)]
    assert prune_cifar.main(common + ["--save_dir", str(tmp_path / "oneshot")]) == 0
    held = []

    def checking_slim(model, masks, dummy):
        modules = dict(model.named_modules())
        held.append(all(not modules[n].weight[~k].any() for n, k in keep_vectors(masks).items()))
        return slim(model, masks, dummy)

    monkeypatch.setattr(cifar_steps, "slim", checking_slim)
    capsys.readouterr()
    assert prune_cifar.main(common + ["--save_dir", str(tmp_path / "layerwise"), "--layerwise_retrain", "1"]) == 0
    assert held == [True]  # pruned filters were still zero after retraining
    out = capsys.readouterr().out
    assert "baseline: reusing" in out
    retrained = [line.split()[1] for line in out.splitlines() if line.startswith("layerwise:")]
    oneshot = torch.load(tmp_path / "oneshot" / "pruned.pth", weights_only=True)
    layerwise = torch.load(tmp_path / "layerwise" / "pruned.pth", weights_only=True)
    pruned_layers = [n for n, m in oneshot["masks"].items() if len(m["kept"]) < m["filters"]]
    assert retrained == pruned_layers and retrained  # one layer at a time, in model order
    for name, mask in oneshot["masks"].items():
        assert torch.equal(mask["kept"], layerwise["masks"][name]["kept"])  # the masks stay one-shot
    assert any(not torch.equal(v, layerwise["state_dict"][k]) for k, v in oneshot["state_dict"].items()
               if v.is_floating_point())  # the weights did train


def test_help_explains_every_flag(capsys):
    with pytest.raises(SystemExit) as done:
        prune_cifar.main(["--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--model", "--pretrained_dir", "--dataroot", "--gpus", "--workers", "--stop_batch", "--sparsity",
                 "--coe", "--method", "--cdp_mode", "--flops_reduction", "--dataset", "--batch_size", "--epochs",
                 "--lr", "--momentum", "--wd", "--schedule", "--seed", "--save_dir", "--resume",
                 "--statistics_file", "--device", "--train_baseline", "--layerwise_retrain", "--no_integrity_check"):
        assert flag in out, flag


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _empty_dir(path: Path) -> Path:
    path.mkdir()
    return path


def _wrong_model(path: Path) -> Path:
    torch.save(build_model("resnet32", "cifar10").state_dict(), path)
    return path


GPU = "99" if torch.cuda.is_available() else "0"
BAD_INPUT = {
    "missing dataroot": (lambda t, a: a + ["--dataroot", str(t / "nowhere")], "does not exist"),
    "empty dataroot": (lambda t, a: a + ["--dataroot", str(_empty_dir(t / "empty"))],
                       "has no cifar-10-batches-py/ folder"),
    "mismatched checkpoint": (lambda t, a: a + ["--pretrained_dir", str(_wrong_model(t / "r32.pth"))],
                              "unused in file: layer1.3.conv1.weight"),
    "negative BN re-estimation": (lambda t, a: a + ["--bn_recalibrate", "-1"], "--bn_recalibrate must be an integer >= 0"),
    "no reconstruction sample": (lambda t, a: a + ["--reconstruct_batches", "0"],
                                 "--reconstruct_batches must be an integer >= 1"),
    "BN re-estimation beyond the data": (lambda t, a: a + ["--bn_recalibrate", "6"],
                                         "--bn_recalibrate 6 asks for more batches than the training set gives (5"),
    "corrupt checkpoint": (lambda t, a: a + ["--pretrained_dir", str(_write(t / "bad.pth", b"\x80not a zip"))],
                           "is corrupt or not a torch checkpoint"),
    "negative weight power": (lambda t, a: a + ["--weight_power", "-1"], "--weight_power must be >= 0, got -1"),
    "both targets": (lambda t, a: a + ["--flops_reduction", "0.4"], "exactly one of --sparsity and --flops_reduction"),
    "sparsity out of range": (lambda t, a: a + ["--sparsity", "1.5"], "--sparsity must lie strictly between 0 and 1"),
    "save_dir not writable": (lambda t, a: a + ["--save_dir", str(_write(t / "file", b"") / "run")],
                              "cannot write to directory"),
    "absent GPU": (lambda t, a: a + ["--gpus", GPU], f"--gpus {GPU}: only"),
    "resume of nothing": (lambda t, a: a + ["--resume"], "holds no run to continue"),
}


@pytest.mark.parametrize("case", BAD_INPUT)
def test_bad_input_is_one_error_line_exit_2_and_writes_nothing(case, cifar_root, pretrained, tmp_path, capsys):
    edit, message = BAD_INPUT[case]
    save_dir = tmp_path / "run"
    argv = edit(tmp_path, cifar_args(cifar_root, pretrained, save_dir))
    assert prune_cifar.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and message in err[-1], err[-1]
    assert not any("Traceback" in line for line in err)
    assert not save_dir.exists() or not any(save_dir.iterdir())


def test_flops_target_required_for_cifar(cifar_root, pretrained, tmp_path, capsys):
    argv = [a for a in cifar_args(cifar_root, pretrained, tmp_path / "run") if a not in ("--sparsity", "0.3")]
    assert prune_cifar.main(argv) == 2
    assert "exactly one of --sparsity and --flops_reduction" in capsys.readouterr().err


def test_resume_with_other_arguments_is_refused(cifar_run, capsys):
    save_dir, _, argv = cifar_run
    before = (save_dir / "last.pth").stat().st_mtime_ns
    assert prune_cifar.main(argv + ["--epochs", "5", "--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: --resume: the run in") and "--epochs 3 -> 5" in err
    assert (save_dir / "last.pth").stat().st_mtime_ns == before


def test_sparsity_that_empties_a_layer(cifar_root, pretrained, tmp_path, capsys):
    # the paper's one global ranking has no per-layer cap (the default variant caps layers at 60%)
    argv = cifar_args(cifar_root, pretrained, tmp_path / "run", "--sparsity", "0.99", "--published")
    assert prune_cifar.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: this sparsity would remove every filter of")
    assert not (tmp_path / "run" / "pruned.pth").exists()


def test_statistics_file_of_another_method_is_refused_before_any_work(cifar_run, tmp_path, capsys):
    _, _, argv = cifar_run
    argv = [a if a != str(cifar_run[0]) else str(tmp_path / "run") for a in argv] + ["--method", "gfi"]
    assert prune_cifar.main(argv) == 2
    assert "hold no 'gfi' data" in capsys.readouterr().err.strip().splitlines()[-1]
    assert not (tmp_path / "run").exists()


def test_scope_all_prunes_the_residual_stream(cifar_root, pretrained, tmp_path):
    save_dir = tmp_path / "all"
    argv = cifar_args(cifar_root, pretrained, save_dir, "--scope", "all", "--round_to", "2", "--epochs", "1",
                      "--method", "gfi")
    argv[argv.index("--sparsity") + 1] = "0.5"
    assert prune_cifar.main(argv) == 0
    model = load_slim(save_dir / "last.pth")
    layers = pd.read_csv(save_dir / "layers.csv")
    assert "layer1.0.conv2" in set(layers["layer"])  # stream convs are in the ranking
    assert model.conv1.out_channels == model.layer1[0].conv2.out_channels == model.layer1[2].conv2.out_channels
    assert model.conv1.out_channels % 2 == 0 and model.conv1.out_channels < 16  # the stream is narrower
    assert prune_cifar.main(cifar_args(cifar_root, pretrained, tmp_path / "bad", "--round_to", "0")) == 2


def test_variant_flags_resolve_to_the_published_or_default_criterion(cifar_root, pretrained, tmp_path):
    from cdp_gfi.masks.variants import DEFAULTS, PUBLISHED
    base = cifar_args(cifar_root, pretrained, tmp_path)
    default = cifar_config.resolve(config_of(base))
    assert default.variant() == DEFAULTS["cdp"]
    published = cifar_config.resolve(config_of(base + ["--published", "--method", "gfi"]))
    assert published.variant() == PUBLISHED["gfi"]
    mixed = cifar_config.resolve(config_of(base + ["--published", "--site", "input", "--cost_power", "0.5",
                                                   "--weight_power", "2"]))
    assert (mixed.site, mixed.normalize, mixed.cost_power, mixed.rule, mixed.cdp_mode, mixed.weight_power) == \
        ("input", "none", 0.5, "global", "classwise", 2.0)


@pytest.fixture
def mac_timer(tmp_path, monkeypatch):
    """Latency targets timed by ``MacTimer``, their tables cached under tmp_path."""
    monkeypatch.setenv("CDP_GFI_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(cifar_steps, "latency_timer", lambda config: MacTimer())


def latency_args(root: Path, pretrained: Path, save_dir: Path, target: str, *extra: str) -> list:
    argv = cifar_args(root, pretrained, save_dir, "--epochs", "1", *extra)
    argv[argv.index("--sparsity"):argv.index("--sparsity") + 2] = ["--latency_reduction", target]
    return argv


def test_latency_target_is_met_and_reported(cifar_root, pretrained, tmp_path, mac_timer):
    save_dir = tmp_path / "run"
    assert prune_cifar.main(latency_args(cifar_root, pretrained, save_dir, "0.3", "--latency_channels_last")) == 0
    summary = json.loads((save_dir / "summary.json").read_text())
    assert summary["latency_reduction"] == 0.3 and summary["sparsity"] is None
    assert summary["latency_measured_reduction_pct"] == pytest.approx(30.0, abs=2.0) and summary["latency_tries"] >= 1
    assert summary["latency_round_to"] == 1  # no --round_to: the CPU's multiple
    assert summary["latency_order_used"] == "ranking"  # auto: latency follows MACs here, the ranking gets there
    assert summary["latency_timer"] == "torch.utils.benchmark+channels_last"  # the report's timer
    model = load_slim(save_dir / "pruned.pth")
    dense = build_model("resnet20", "cifar10").eval()
    x = torch.zeros(1, 3, 32, 32)
    assert 1 - MacTimer()(model, x) / MacTimer()(dense, x) == pytest.approx(0.3, abs=0.02)  # what was measured
    assert list(tmp_path.glob("cache/latency/*.json"))


def test_unreachable_latency_target_names_the_closest(cifar_root, pretrained, tmp_path, mac_timer, capsys):
    argv = latency_args(cifar_root, pretrained, tmp_path / "run", "0.9")
    assert prune_cifar.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: cannot cut the measured latency by 90.00%") and "closest reachable" in err
    assert not (tmp_path / "run" / "pruned.pth").exists()


NO_GPU = "cuda:99" if torch.cuda.is_available() else "cuda"
LATENCY_BAD_INPUT = {
    "latency and sparsity": (["--sparsity", "0.3", "--latency_reduction", "0.3"],
                             "give --latency_reduction or --sparsity, not both"),
    "latency and flops": (["--flops_reduction", "0.3", "--latency_reduction", "0.3"],
                          "give --latency_reduction or --flops_reduction, not both"),
    "latency out of range": (["--latency_reduction", "1.2"], "--latency_reduction must lie strictly between 0 and 1"),
    "latency batch": (["--sparsity", "0.3", "--latency_batch", "0"], "--latency_batch must be a positive integer"),
    "absent latency device": (["--sparsity", "0.3", "--latency_device", NO_GPU],
                              f"latency device '{NO_GPU}' is not there"),
    "unknown latency device": (["--sparsity", "0.3", "--latency_device", "tpu"], "unknown latency device 'tpu'"),
}


def test_unknown_latency_order_is_one_error_line(cifar_root, pretrained, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        prune_cifar.main(latency_args(cifar_root, pretrained, tmp_path / "run", "0.3", "--latency_order", "fastest"))
    assert exit_.value.code == 2 and not (tmp_path / "run").exists()
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "--latency_order" in err[-1] and "'fastest'" in err[-1]


def test_unknown_reconstruct_layers_is_one_error_line(cifar_root, pretrained, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        prune_cifar.main(latency_args(cifar_root, pretrained, tmp_path / "run", "0.3", "--reconstruct_layers", "all"))
    assert exit_.value.code == 2 and not (tmp_path / "run").exists()
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "--reconstruct_layers" in err[-1] and "'all'" in err[-1]


def test_the_reconstruction_sample_is_the_batches_asked_for(cifar_root, pretrained, tmp_path, capsys):
    assert prune_cifar.main(cifar_args(cifar_root, pretrained, tmp_path / "run", "--reconstruct_batches", "2")) == 0
    out = capsys.readouterr().out
    assert "refitted by least squares on 2 batches" in out
    assert json.loads((tmp_path / "run" / "args.json").read_text())["reconstruct_batches"] == 2


@pytest.mark.parametrize("case", LATENCY_BAD_INPUT)
def test_bad_latency_input_is_one_error_line_and_writes_nothing(case, cifar_root, pretrained, tmp_path, capsys):
    extra, message = LATENCY_BAD_INPUT[case]
    save_dir = tmp_path / "run"
    argv = [a for a in cifar_args(cifar_root, pretrained, save_dir) if a not in ("--sparsity", "0.3")] + extra
    assert prune_cifar.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and message in err[-1], err[-1]
    assert not save_dir.exists()

"""prune_cifar.py sweeps: one statistics pass for every point, a directory per point, sweep.csv, resume."""
import importlib.util
import json
from pathlib import Path

import pandas as pd
import pytest
from torch.utils.data import Subset

from cdp_gfi.runs import cifar_steps
from cdp_gfi.data.datasets import digits_datasets

SCRIPT = Path(__file__).resolve().parents[1] / "prune_cifar.py"
_spec = importlib.util.spec_from_file_location("prune_cifar", SCRIPT)
prune_cifar = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(prune_cifar)


def small_digits(seed=0):
    """Digits cut to 128 training and 64 test images."""
    train_aug, train_plain, test = digits_datasets(seed)
    return Subset(train_aug, range(128)), Subset(train_plain, range(128)), Subset(test, range(64))


def sweep_args(tmp_path: Path, *extra: str) -> list:
    return ["--dataset", "digits", "--baseline_epochs", "1", "--epochs", "1", "--batch_size", "64", "--stop_batch",
            "2", "--method", "gfi", "--save_dir", str(tmp_path / "sweep"), "--baseline_dir", str(tmp_path / "base"),
            *extra]


@pytest.fixture(scope="module")
def sweep_run(tmp_path_factory):
    """A two-point GFI-AP sweep on tiny digits, counting statistics passes: (argv, save_dir, passes)."""
    tmp_path, passes = tmp_path_factory.mktemp("sweep"), []
    collect = cifar_steps.collect_statistics

    def counting(*args, **kwargs):
        passes.append(1)
        return collect(*args, **kwargs)

    argv = sweep_args(tmp_path, "--sparsity", "0.2,0.4")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cifar_steps, "digits_datasets", small_digits)
        patch.setattr(cifar_steps, "collect_statistics", counting)
        assert prune_cifar.main(argv) == 0
    return argv, tmp_path / "sweep", passes


def test_sweep_gathers_statistics_once_and_writes_a_row_per_point(sweep_run):
    _, save_dir, passes = sweep_run
    assert len(passes) == 1
    for point in ("point_0.2", "point_0.4"):
        for name in ("args.json", "pruned.pth", "layers.csv", "costs.csv", "log.csv", "summary.json", "layers.png"):
            assert (save_dir / point / name).is_file(), (point, name)
    frame = pd.read_csv(save_dir / "sweep.csv")
    assert list(frame["sparsity"]) == [0.2, 0.4] and len(frame) == 2
    assert frame["filters_removed_pct"].is_monotonic_increasing and frame["macs_after"].is_monotonic_decreasing
    assert (frame["point_time_s"] > 0).all()
    assert frame["threshold"].isna().all()  # the default GFI-AP ranks mean-normalised scores: no raw threshold
    summary = json.loads((save_dir / "point_0.4" / "summary.json").read_text())
    assert frame.loc[1, "pruned_top1"] == pytest.approx(summary["pruned_top1"])
    assert frame.loc[1, "filters_removed_pct"] == pytest.approx(summary["filters_removed_pct"])
    assert (save_dir / "sweep.png").stat().st_size > 0
    assert json.loads((save_dir / "args.json").read_text())["sparsity"] == [0.2, 0.4]


def test_resumed_sweep_skips_finished_points_and_refuses_other_targets(sweep_run, monkeypatch, capsys):
    argv, save_dir, _ = sweep_run
    monkeypatch.setattr(cifar_steps, "digits_datasets", small_digits)
    (save_dir / "point_0.4" / "summary.json").unlink()
    before = (save_dir / "point_0.2" / "last.pth").stat().st_mtime_ns
    rows = pd.read_csv(save_dir / "sweep.csv")
    capsys.readouterr()
    assert prune_cifar.main(argv + ["--resume"]) == 0
    assert "point_0.2 already finished" in capsys.readouterr().out
    assert (save_dir / "point_0.2" / "last.pth").stat().st_mtime_ns == before
    again = pd.read_csv(save_dir / "sweep.csv")
    assert (save_dir / "point_0.4" / "summary.json").is_file()
    pd.testing.assert_series_equal(again["pruned_top1"], rows["pruned_top1"])
    assert prune_cifar.main(argv + ["--sparsity", "0.2,0.3", "--resume"]) == 2
    assert "other arguments" in capsys.readouterr().err


def test_bad_sweep_list_is_refused(tmp_path, capsys):
    assert prune_cifar.main(sweep_args(tmp_path, "--sparsity", "0.2,1.2")) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error: --sparsity must lie strictly")
    with pytest.raises(SystemExit):
        prune_cifar.main(sweep_args(tmp_path, "--sparsity", "0.2,x"))

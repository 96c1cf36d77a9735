"""cdp_gfi.plots: each figure has the expected panels, labels and data, and is written as a non-empty PNG."""
import pandas as pd
import pytest

from cdp_gfi.runs.plots import EFFECT_PANELS, TARGET_LABELS, plot_accuracy_vs_macs, plot_kept_filters, plot_pruning_effect

PNG = b"\x89PNG"


@pytest.fixture
def sweep_frame() -> pd.DataFrame:
    return pd.DataFrame({"sparsity": [0.5, 0.3], "filters_removed_pct": [40.0, 20.0], "threshold": [0.9, 0.5],
                         "macs_reduction_pct": [45.0, 25.0], "params_reduction_pct": [30.0, 12.0],
                         "pruned_top1_before_finetune": [60.0, 80.0], "pruned_top1_recalibrated": [70.0, 85.0],
                         "pruned_top1": [90.0, 94.0],
                         "point_time_s": [12.0, 11.0]})


def test_pruning_effect(sweep_frame, tmp_path):
    path = tmp_path / "readme" / "effect.png"
    figure = plot_pruning_effect(sweep_frame, path, "gfi on resnet20")
    assert path.read_bytes()[:4] == PNG
    assert figure._suptitle.get_text() == "gfi on resnet20"
    axes = figure.axes
    assert [ax.get_ylabel() for ax in axes] == [label for _, label in EFFECT_PANELS]
    assert all(ax.get_xlabel() == TARGET_LABELS["sparsity"] for ax in axes)
    x, y = axes[1].lines[0].get_data()
    assert list(x) == [0.3, 0.5] and list(y) == [75.0, 55.0]  # MACs retained against the requested sparsity


def test_pruning_effect_leaves_out_constant_panels(sweep_frame):
    frame = sweep_frame.assign(threshold=[float("nan")] * 2, pruned_top1=[94.0, 94.0]).rename(
        columns={"sparsity": "flops_reduction"})
    axes = plot_pruning_effect(frame, target="flops_reduction").axes
    assert [ax.get_ylabel() for ax in axes] == ["MACs retained (%)", "parameters retained (%)",
                                                "top-1 after pruning (%)", "top-1 after BN re-estimation (%)",
                                                "time per point (s)"]
    assert axes[0].get_xlabel() == TARGET_LABELS["flops_reduction"]


def test_kept_filters(tmp_path):
    layers = pd.DataFrame({"layer": ["a.conv1", "b.conv1"], "kept": [5, 30], "total": [16, 32],
                           "removed_pct": [68.75, 6.25]})
    path = tmp_path / "layers.png"
    figure = plot_kept_filters(layers, path, "run x")
    assert path.read_bytes()[:4] == PNG
    ax = figure.axes[0]
    assert (ax.get_title(), ax.get_xlabel(), ax.get_ylabel()) == ("run x", "layer", "filters")
    assert [t.get_text() for t in ax.get_xticklabels()] == ["a.conv1", "b.conv1"]
    assert [p.get_height() for p in ax.patches] == [16, 32, 5, 30]


def test_accuracy_vs_macs(tmp_path):
    results = pd.DataFrame({"method": ["cdp", "cdp", "random", "random"], "macs_m": [24.0, 16.0, 24.0, 16.0],
                            "top1": [95.0, 93.0, 90.0, 85.0], "top1_std": [0.5, 0.4, 1.0, 2.0]})
    path = tmp_path / "acc.png"
    figure = plot_accuracy_vs_macs(results, path, "digits", baseline=97.0)
    assert path.stat().st_size > 0 and path.read_bytes()[:4] == PNG
    ax = figure.axes[0]
    assert (ax.get_xlabel(), ax.get_ylabel(), ax.get_title()) == ("MACs (M, conv + linear)", "top-1 (%)", "digits")
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["baseline", "cdp", "random"]
    assert list(ax.lines[0].get_xdata()) == [16.0, 24.0]

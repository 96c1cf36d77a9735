"""cdp_gfi.runs.trial: parameters from the tuner over command-line defaults, shared statistics, NNI reports, bad input."""
import argparse
import re

import pytest
import torch

import cdp_gfi.runs.trial as trial
from cdp_gfi import build_model
from cdp_gfi.masks.variants import DEFAULTS


def args_of(*argv: str) -> argparse.Namespace:
    return trial.build_parser().parse_args(list(argv))


@pytest.fixture
def reports(monkeypatch):
    """Capture what the trial sends to NNI, and feed it ``params`` as the tuner would."""
    sent = {"params": {}, "intermediate": [], "final": []}
    monkeypatch.setattr(trial.nni, "get_next_parameter", lambda: sent["params"])
    monkeypatch.setattr(trial.nni, "report_intermediate_result", sent["intermediate"].append)
    monkeypatch.setattr(trial.nni, "report_final_result", sent["final"].append)
    return sent


def test_flatten_nested_choices():
    params = {"method": {"_name": "cdp", "coe": 1, "cdp_mode": {"_name": "sample"}}, "sparsity": 0.5}
    assert trial.flatten(params) == {"method": "cdp", "coe": 1, "cdp_mode": "sample", "sparsity": 0.5}
    assert trial.flatten({"method": {"_name": "gfi"}}) == {"method": "gfi"}


def test_coerce_types():
    assert trial.coerce("epochs", 3.0) == 3 and trial.coerce("coe", 1) == 1.0 and trial.coerce("coe", None) is None
    with pytest.raises(ValueError, match="epochs must be an integer, got 2.5"):
        trial.coerce("epochs", 2.5)
    with pytest.raises(ValueError, match="sparsity must be a number, got True"):
        trial.coerce("sparsity", True)
    with pytest.raises(ValueError, match="unknown trial parameter 'sparse_ratio'"):
        trial.coerce("sparse_ratio", 0.5)


def test_tuner_overrides_command_line_and_keys_statistics(tmp_path, monkeypatch):
    monkeypatch.delenv("NNI_OUTPUT_DIR", raising=False)
    args = args_of("--flops_reduction", "0.4", "--epochs", "5", "--lr", "0.02", "--statistics_dir", str(tmp_path))
    config = trial.trial_config(args, {"method": {"_name": "cdp", "coe": 1}, "sparsity": 0.3, "epochs": 2.0})
    assert (config.method, config.coe, config.sparsity, config.flops_reduction) == ("cdp", 1.0, 0.3, None)
    assert (config.epochs, config.lr, config.dataset, config.model) == (2, 0.02, "digits", "resnet20")
    cdp = DEFAULTS["cdp"]  # statistics of other documents or read at another feature site are another file
    assert config.statistics_file == str(tmp_path / f"stats_digits_resnet20_seed0_b200_cdp_{cdp.cdp_mode}_{cdp.site}.pt")
    gfi = trial.trial_config(args, {"method": "gfi", "stop_batch": 4})
    assert gfi.statistics_file == str(tmp_path / f"stats_digits_resnet20_seed0_b4_gfi_{DEFAULTS['gfi'].site}.pt")
    assert gfi.flops_reduction == 0.4 and gfi.sparsity is None
    standalone = trial.trial_config(args_of(), {})
    assert standalone.flops_reduction == 0.45 and standalone.save_dir.startswith("runs/")
    monkeypatch.setenv("NNI_OUTPUT_DIR", str(tmp_path / "trial"))
    assert trial.trial_config(args, {}).save_dir == str(tmp_path / "trial" / "prune")


@pytest.mark.parametrize("params,message", [
    ({"sparsity": 1.5}, r"trial parameters \{'sparsity': 1.5\}: --sparsity must lie strictly between 0 and 1"),
    ({"method": "apoz"}, "unknown method 'apoz'"),
    ({"coe": -1}, "--coe must be >= 0"),
    ({"sparsity": 0.3, "flops_reduction": 0.3}, "exactly one of --sparsity and --flops_reduction"),
    ({"epochs": 0}, "--epochs must be an integer >= 1"),
])
def test_bad_parameters_fail_with_one_error_line(reports, capsys, params, message):
    reports["params"] = params
    assert trial.main([]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ")
    assert re.search(message, err[-1]), err[-1]
    assert reports["final"] == [] and reports["intermediate"] == []


def test_final_result_carries_macs_and_params():
    summary = {"pruned_top1": 91.5, "best_top1": 92.0, "baseline_top1": 93.0, "macs_after": 10, "params_after": 20,
               "macs_reduction_pct": 45.0, "params_reduction_pct": 40.0, "filters_removed_pct": 50.0, "seed": 0}
    result = trial.final_result(summary)
    assert result["default"] == 91.5 and result["macs_after"] == 10.0 and result["params_after"] == 20.0
    assert all(isinstance(v, float) for v in result.values()) and "seed" not in result


def test_standalone_run_reports_each_epoch_and_shares_statistics(tmp_path, reports, monkeypatch):
    monkeypatch.delenv("NNI_OUTPUT_DIR", raising=False)
    torch.manual_seed(0)
    weights = tmp_path / "base.pth"
    torch.save(build_model("resnet20", "digits").state_dict(), weights)
    reports["params"] = {"method": {"_name": "gfi"}, "sparsity": 0.4}
    argv = ["--pretrained_dir", str(weights), "--epochs", "1", "--stop_batch", "1", "--batch_size", "256",
            "--statistics_dir", str(tmp_path / "stats"), "--save_dir", str(tmp_path / "run")]
    assert trial.main(argv) == 0
    assert len(reports["intermediate"]) == 1 and isinstance(reports["intermediate"][0], float)
    (final,) = reports["final"]
    assert final["default"] == reports["intermediate"][0]
    assert 0 < final["macs_after"] < 40_551_040 and 0 < final["params_after"] < 269_722
    assert [p.name for p in (tmp_path / "stats").iterdir()] == [f"stats_digits_resnet20_seed0_b1_gfi_{DEFAULTS['gfi'].site}.pt"]
    assert (tmp_path / "run" / "summary.json").is_file()

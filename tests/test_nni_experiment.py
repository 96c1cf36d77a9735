"""A real local NNI experiment over cdp_gfi.runs.trial (loopback, free port), and the example's config.yml."""
import importlib.util
import json
import shlex
import socket
import sys
from pathlib import Path

import pytest
import torch

import cdp_gfi.runs.trial as trial
from cdp_gfi import build_model
from cdp_gfi.masks.variants import DEFAULTS

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "nni_experiment"
_spec = importlib.util.spec_from_file_location("run_experiment", EXAMPLE / "run_experiment.py")
run_experiment = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(run_experiment)

DENSE_MACS, DENSE_PARAMS = 40_551_040, 269_722  # ResNet-20, conv + linear MACs


def listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """Three tiny CDP trials (sparsity 0.3, 0.5 and the out-of-range 1.5) run to the end, then stopped."""
    root = tmp_path_factory.mktemp("nni")
    torch.manual_seed(0)
    torch.save(build_model("resnet20", "digits").state_dict(), root / "base.pth")
    trial_args = ["--pretrained_dir", str(root / "base.pth"), "--epochs", "1", "--stop_batch", "1",
                  "--batch_size", "256", "--statistics_dir", str(root / "stats")]
    space = {"sparsity": {"_type": "choice", "_value": [0.3, 0.5, 1.5]}}
    experiment = run_experiment.build_experiment(space, trial_args, root / "experiments", max_trial_number=3)
    port = run_experiment.free_port()
    try:
        experiment.start(port)
        status = run_experiment.wait(experiment, timeout_s=900)
        out = dict(status=status, stats=experiment.get_job_statistics(), table=run_experiment.results_table(experiment),
                   metrics=experiment.get_job_metrics(), failed=run_experiment.failed_trials(experiment),
                   logs={j.trialJobId: run_experiment.trial_log(j, "log") for j in experiment.list_trial_jobs()})
    finally:
        experiment.stop()
    return dict(out, root=root, port=port, experiment=experiment)


def test_experiment_runs_to_the_end_with_one_failed_trial(finished):
    assert finished["status"] == "DONE"
    counts = {s["trialJobStatus"]: s["trialJobNumber"] for s in finished["stats"]}
    assert counts == {"SUCCEEDED": 2, "FAILED": 1}


def test_both_final_results_read_back(finished):
    table = finished["table"]
    assert sorted(table["sparsity"]) == [0.3, 0.5] and len(table) == 2
    assert table["top1"].between(0, 100).all()
    assert ((0 < table["macs_after"]) & (table["macs_after"] < DENSE_MACS)).all()
    assert ((0 < table["params_after"]) & (table["params_after"] < DENSE_PARAMS)).all()
    by_sparsity = table.set_index("sparsity")
    assert by_sparsity.loc[0.5, "params_after"] < by_sparsity.loc[0.3, "params_after"]
    for trial_id in table["trial"]:
        kinds = [m.type for m in finished["metrics"][trial_id]]
        assert kinds.count("PERIODICAL") == 1 and kinds.count("FINAL") == 1


def test_bad_value_fails_its_trial_with_a_clear_message(finished):
    (message,) = finished["failed"].values()
    assert message == ("error: trial parameters {'sparsity': 1.5}: --sparsity must lie strictly between 0 and 1, "
                       "got 1.5")


def test_trials_share_one_statistics_file(finished):
    names = [p.name for p in (finished["root"] / "stats").iterdir()]
    cdp = DEFAULTS["cdp"]  # the default CDP's documents and feature site name the file
    assert names == [f"stats_digits_resnet20_seed0_b1_cdp_{cdp.cdp_mode}_{cdp.site}.pt"]
    succeeded = [finished["logs"][t] for t in finished["table"]["trial"]]  # trial.log holds what trials print
    assert sorted("statistics: reusing" in log for log in succeeded) == [False, True]


def test_stopped_cleanly(finished):
    experiment = finished["experiment"]
    assert experiment.port is None and experiment._proc is None
    assert not listening(finished["port"])


def test_config_yml_is_the_python_experiment():
    from nni.experiment.config import ExperimentConfig

    config = ExperimentConfig.load(str(EXAMPLE / "config.yml")).canonical_copy()
    assert Path(config.trial_code_directory) == EXAMPLE.parents[1]
    assert config.search_space == json.loads((EXAMPLE / "search_space.json").read_text())
    assert config.tuner.name == "GridSearch" and config.training_service.platform == "local"
    assert config.max_trial_number == 6  # the whole grid: cdp x coe {0, 1} + gfi, x sparsity {0.3, 0.5}
    command = shlex.split(config.trial_command)
    assert command[1:3] == ["-m", "cdp_gfi.runs.trial"]
    args = trial.build_parser().parse_args(command[3:])
    defaults = run_experiment.build_parser().parse_args([])
    assert (args.epochs, args.baseline_epochs) == (defaults.epochs, defaults.baseline_epochs)


def test_trial_command_uses_this_interpreter():
    command = shlex.split(run_experiment.trial_command(["--epochs", "1"]))
    assert command == [sys.executable, "-m", "cdp_gfi.runs.trial", "--epochs", "1"]

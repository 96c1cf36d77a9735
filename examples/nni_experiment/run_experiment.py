"""CDP and GFI-AP as NNI trials: a grid over method x sparsity x coe on the digits demo.

    python examples/nni_experiment/run_experiment.py               # 6 trials; prints the result table
    python examples/nni_experiment/run_experiment.py --keep_open   # then keep the web portal up until Ctrl-C
    nnictl create --config examples/nni_experiment/config.yml      # the same experiment from the command line

Every trial runs ``python -m cdp_gfi.runs.trial``; they share one baseline and one
statistics file per method under ``--workdir``.
"""
from __future__ import annotations

import argparse
import json
import shlex
import socket
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import pandas as pd
from nni.experiment import Experiment
from nni.experiment.data import TrialJob

from cdp_gfi.runs.trial import flatten

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
FINISHED = ("DONE", "STOPPED", "ERROR")
RESULT_COLUMNS = ("default", "macs_after", "params_after", "macs_reduction_pct", "params_reduction_pct")


def free_port() -> int:
    """A TCP port on the loopback interface that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def trial_command(trial_args: Sequence[str]) -> str:
    """The shell command of every trial: this interpreter running ``cdp_gfi.runs.trial``."""
    return shlex.join([sys.executable, "-m", "cdp_gfi.runs.trial", *trial_args])


def build_experiment(search_space: Dict[str, Any], trial_args: Sequence[str], working_dir: Path,
                     max_trial_number: int, concurrency: int = 1, tuner: str = "GridSearch") -> Experiment:
    """A local experiment over ``search_space`` whose files live under ``working_dir``."""
    experiment = Experiment("local")
    config = experiment.config
    config.experiment_name = "cdp_gfi_digits"
    config.search_space = search_space
    config.trial_command = trial_command(trial_args)
    config.trial_code_directory = str(REPO)
    config.trial_concurrency = concurrency
    config.max_trial_number = max_trial_number
    config.experiment_working_directory = str(working_dir)
    config.tuner.name = tuner
    return experiment


def wait(experiment: Experiment, timeout_s: Optional[float] = None, poll_s: float = 1.0) -> str:
    """Poll until the experiment is DONE, STOPPED or in ERROR (or ``timeout_s`` passes); its last status."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        status = experiment.get_status()
        if status in FINISHED or (deadline is not None and time.monotonic() > deadline):
            return status
        time.sleep(poll_s)


def results_table(experiment: Experiment) -> pd.DataFrame:
    """One row per finished trial: its parameters, top-1 (``default``), MACs and params; best first."""
    rows: List[Dict[str, Any]] = []
    for result in experiment.export_data():
        value = result.value if isinstance(result.value, dict) else {"default": result.value}
        rows.append({"trial": result.trialJobId, **flatten(result.parameter),
                     **{k: value.get(k) for k in RESULT_COLUMNS}})
    table = pd.DataFrame(rows).rename(columns={"default": "top1"})
    if not rows:
        return table
    table = table.astype({"macs_after": "int64", "params_after": "int64"})
    return table.sort_values("top1", ascending=False, ignore_index=True)


def trial_log(job: TrialJob, name: str = "stderr") -> str:
    """A trial's ``trial.stderr`` or ``trial.log`` (its printed lines, via NNI's logger) from the local service."""
    path = Path(job.logPath) / f"trial.{name}"
    return path.read_text() if path.exists() else ""


def failed_trials(experiment: Experiment) -> Dict[str, str]:
    """Trial id -> last ``error:`` line of its stderr, for every trial that failed."""
    out = {}
    for job in experiment.list_trial_jobs():
        if job.status == "FAILED":
            errors = [line for line in trial_log(job).splitlines() if line.startswith("error:")]
            out[job.trialJobId] = errors[-1] if errors else f"(no error line; see {job.logPath})"
    return out


def build_parser() -> argparse.ArgumentParser:
    """Options of the example: where files go, the port, trial length."""
    p = argparse.ArgumentParser(description="Grid over CDP/GFI-AP x sparsity x coe on the digits demo, in NNI.")
    p.add_argument("--workdir", default=str(REPO / "runs" / "nni"), help="experiments, shared baseline, statistics")
    p.add_argument("--port", type=int, help="web portal port (default: a free one)")
    p.add_argument("--search_space", default=str(HERE / "search_space.json"))
    p.add_argument("--max_trials", type=int, default=6)
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--epochs", type=int, default=3, help="fine-tuning epochs per trial")
    p.add_argument("--baseline_epochs", type=int, default=6, help="epochs of the shared baseline (trained once)")
    p.add_argument("--keep_open", action="store_true", help="keep the web portal up after the last trial")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the experiment to the end, print its result table and failures, stop it; 0 if it ended DONE."""
    args = build_parser().parse_args(argv)
    workdir = Path(args.workdir).resolve()
    trial_args = ["--dataset", "digits", "--epochs", str(args.epochs), "--baseline_epochs", str(args.baseline_epochs),
                  "--baseline_dir", str(workdir / "base"), "--statistics_dir", str(workdir / "statistics")]
    search_space = json.loads(Path(args.search_space).read_text())
    experiment = build_experiment(search_space, trial_args, workdir / "experiments", args.max_trials,
                                  args.concurrency)
    port = args.port or free_port()
    try:
        experiment.start(port)
        print(f"web portal: http://127.0.0.1:{port}  (experiment {experiment.id})", flush=True)
        status = wait(experiment)
        print(f"\nstatus {status}; trials {experiment.get_job_statistics()}")
        print(results_table(experiment).to_string(index=False, float_format=lambda v: f"{v:.2f}"))
        for trial, error in failed_trials(experiment).items():
            print(f"failed {trial}: {error}")
        if args.keep_open:
            print(f"web portal still at http://127.0.0.1:{port}; Ctrl-C to stop", flush=True)
            while True:
                time.sleep(3600)
    except KeyboardInterrupt:
        status = "STOPPED"
    finally:
        experiment.stop()
    return 0 if status == "DONE" else 1


if __name__ == "__main__":
    sys.exit(main())

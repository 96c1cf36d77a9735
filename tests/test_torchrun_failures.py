"""Two-process jobs (gloo, CPU) fail as one: bad input stops every rank with one error line, a killed or stalled
rank stops the others within the timeout. Ranks are launched as a cluster launcher (srun) would, with
RANK/WORLD_SIZE set by hand, so no torchrun agent cleans up for us."""
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import List, Sequence, Tuple

import pytest

REPO = Path(__file__).resolve().parents[1]
STAGE1 = str(REPO / "statistic_imagenet.py")
STAGE2 = str(REPO / "imagenet" / "imagenet.py")
LIMIT_S = 60  # the bound for a failed two-process job to end

# Runs a script as __main__ after arming a forward pre-hook that sends `signal` to this process on the model's
# second forward (stage 1: the first statistics batch, after the dummy pass; stage 2: the second training step).
SABOTAGE = '''
import os, runpy, signal, sys
script, target, sig = sys.argv[1], sys.argv[2], getattr(signal, sys.argv[3])
sys.argv = [script] + sys.argv[4:]
module, name = target.rsplit(".", 1)
module = __import__(module, fromlist=[name])
real = getattr(module, name)

def sabotaged(*args, **kwargs):
    model = next(a for a in args if hasattr(a, "register_forward_pre_hook"))
    calls = []

    def hook(*_):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), sig)

    model.register_forward_pre_hook(hook)
    return real(*args, **kwargs)

setattr(module, name, sabotaged)
runpy.run_path(script, run_name="__main__")
'''


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(commands: Sequence[List[str]], cwd: Path, grace: float = 30) -> Tuple[List[int], List[str], float]:
    """Start one process per command as ranks 0..n-1 of one job; their exit codes, stderr texts and the seconds
    until the last surviving rank ended. A rank still running ``grace`` seconds after rank 0 ended (a stopped
    one) is killed. A port taken
    between choosing it and binding it (another job on the machine) is a reason to launch again."""
    for _ in range(3):
        codes, errs, seconds = _launch_once(commands, cwd, grace)
        if "EADDRINUSE" not in errs[0]:
            break
    return codes, errs, seconds


def _launch_once(commands: Sequence[List[str]], cwd: Path, grace: float) -> Tuple[List[int], List[str], float]:
    port, started = _free_port(), time.monotonic()
    procs = []
    for rank, command in enumerate(commands):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port), "WORLD_SIZE": str(len(commands)), "RANK": str(rank),
               "LOCAL_RANK": str(rank)}
        procs.append(subprocess.Popen([sys.executable, *command], cwd=cwd, env=env, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.PIPE, text=True))
    try:
        codes, errs, ended = [], [], 0.0
        for rank, proc in enumerate(procs):
            deadline = LIMIT_S + 30 if rank == 0 else grace
            try:
                _, err = proc.communicate(timeout=max(1.0, deadline - (time.monotonic() - started) * (rank == 0)))
                ended = max(ended, time.monotonic() - started)
            except subprocess.TimeoutExpired:
                proc.kill()
                _, err = proc.communicate()
            codes.append(proc.returncode)
            errs.append(err)
        return codes, errs, ended
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def stage1_args(root: Path, out: Path, *extra: str) -> List[str]:
    """Tiny stage-1 settings (resnet18 at 32x32, 5 batches of 8 digits) on the CPU."""
    return [STAGE1, "--model", "resnet18", "--dataroot", str(root), "--input_size", "32", "--stop_batch", "5",
            "--batch_size", "8", "-j", "0", "--device", "cpu", "--sparsity", "0.5", "--bn_recalibrate", "0",
            "--save_model_path", str(out), *extra]


def error_lines(errs: Sequence[str]) -> List[str]:
    return [line for err in errs for line in err.splitlines() if line.startswith("error: ")]


def written(out: Path) -> List[Path]:
    return [p for p in out.rglob("*") if p.is_file()] if out.exists() else []


def test_bad_input_on_one_rank_stops_both_with_one_error_line(imagefolder_root, tmp_path):
    out = tmp_path / "out"
    missing = tmp_path / "only_on_rank0.pth"
    codes, errs, seconds = launch([stage1_args(imagefolder_root, out, "--allow_random_init"),
                                   stage1_args(imagefolder_root, out, "--pretrained_dir", str(missing))], tmp_path)
    assert codes == [2, 2], errs
    lines = error_lines(errs)
    assert len(lines) == 1 and lines[0].startswith("error: rank 1: ") and missing.name in lines[0], errs
    assert lines[0] in errs[0].splitlines() and "Traceback" not in "".join(errs)
    assert seconds < LIMIT_S and not written(out)


# Rank 1 finds bad input; every rank must stop with the agreement made and the group left, since a group left to the
# process exit can abort it ("terminate called without an active exception": exit -6, not 2) as the other rank exits.
AGREE = '''
import sys
import torch.distributed as dist
from cdp_gfi.distributed import RankError, init_distributed, on_every_rank

info = init_distributed("cpu")

def check():
    if info.rank == 1:
        raise ValueError("bad on rank 1")

try:
    on_every_rank(check)
except RankError as err:
    print(f"{err} report={err.report} joined={dist.is_initialized()}", file=sys.stderr)
'''


def test_an_agreed_error_leaves_the_group_on_every_rank(tmp_path):
    script = tmp_path / "agree.py"
    script.write_text(AGREE)
    codes, errs, _ = launch([[str(script)], [str(script)]], tmp_path)
    assert codes == [0, 0], errs
    assert [err.strip() for err in errs] == ["rank 1: bad on rank 1 report=True joined=False",
                                             "rank 1: bad on rank 1 report=False joined=False"], errs

EVERY_RANK_BAD = {
    "path": ("--dataroot", "nowhere"),       # found after joining the group, on every rank
    "range": ("--sparsity", "1.5"),          # found before joining
    "argparse": ("--method", "nope"),        # argparse's own error
}


@pytest.mark.parametrize("flag, value", EVERY_RANK_BAD.values(), ids=EVERY_RANK_BAD.keys())
def test_bad_input_on_every_rank_is_reported_once(imagefolder_root, tmp_path, flag, value):
    out = tmp_path / "out"
    argv = stage1_args(imagefolder_root, out, "--allow_random_init", flag, value)
    codes, errs, seconds = launch([argv, argv], tmp_path)
    assert codes == [2, 2], errs
    lines = error_lines(errs)
    assert len(lines) == 1 and lines[0] in errs[0].splitlines() and "rank" not in lines[0], errs
    assert seconds < LIMIT_S and not written(out)


def test_ranks_with_different_weights_are_refused(imagefolder_root, tmp_path):
    out = tmp_path / "out"
    codes, errs, _ = launch([stage1_args(imagefolder_root, out, "--allow_random_init", "--seed", "0"),
                             stage1_args(imagefolder_root, out, "--allow_random_init", "--seed", "1")], tmp_path)
    assert codes == [2, 2], errs
    lines = error_lines(errs)
    assert len(lines) == 1 and "ranks disagree on the weights' hash" in lines[0], errs


@pytest.mark.parametrize("sig, extra", [("SIGKILL", []), ("SIGSTOP", ["--dist_timeout", "5"])])
def test_a_rank_killed_or_stalled_mid_pass_stops_the_other(imagefolder_root, tmp_path, sig, extra):
    script = tmp_path / "sabotage.py"
    script.write_text(SABOTAGE)
    out = tmp_path / "out"
    argv = stage1_args(imagefolder_root, out, "--allow_random_init", *extra)
    codes, errs, seconds = launch(
        [argv, [str(script), argv[0], "cdp_gfi.runs.imagenet_stage1.gather_statistics", sig, *argv[1:]]], tmp_path,
        grace=2)
    assert codes[0] == 1 and codes[1] == -signal.SIGKILL, errs
    lines = error_lines(errs[:1])
    assert len(lines) == 1 and lines[0].startswith("error: rank 0: another process of the job stopped"), errs
    assert seconds < LIMIT_S and not written(out / "masks.pth") and "Traceback" not in errs[0]


def test_stage2_bad_checkpoint_on_one_rank_stops_both(imagefolder_root, tmp_path):
    out = tmp_path / "out"
    common = ["--dataroot", str(imagefolder_root), "--epochs", "1", "--batch-size", "10", "--input-size", "32",
              "-j", "0", "--device", "cpu", "--results_dir", str(out)]
    codes, errs, seconds = launch([[STAGE2, "--model", "resnet18", *common],
                                   [STAGE2, "--resume", str(tmp_path / "gone.pth"), *common]], tmp_path)
    assert codes == [2, 2], errs
    lines = error_lines(errs)
    assert len(lines) == 1 and lines[0].startswith("error: rank 1: ") and "gone.pth" in lines[0], errs
    assert seconds < LIMIT_S and not written(out)


def test_stage2_rank_killed_mid_training_stops_the_other(imagefolder_root, tmp_path):
    script = tmp_path / "sabotage.py"
    script.write_text(SABOTAGE)
    out = tmp_path / "out"
    argv = [STAGE2, "--model", "resnet18", "--dataroot", str(imagefolder_root), "--epochs", "2", "--batch-size",
            "10", "--input-size", "32", "-j", "0", "--device", "cpu", "--results_dir", str(out)]
    codes, errs, seconds = launch(
        [argv, [str(script), argv[0], "cdp_gfi.runs.imagenet_stage2.fit", "SIGKILL", *argv[1:]]], tmp_path)
    assert codes[0] == 1 and codes[1] == -signal.SIGKILL, errs
    lines = error_lines(errs[:1])
    assert len(lines) == 1 and "another process of the job stopped" in lines[0], errs
    assert seconds < LIMIT_S and "Traceback" not in errs[0]

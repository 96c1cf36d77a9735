"""No run removes or mixes another's files; flags parse in both spellings; every run ends in one result line."""
import argparse
import importlib.util
from pathlib import Path

import pytest
import torch
from torch.utils.data import Subset

import cdp_gfi.runs.imagenet_stage1 as stage1
from cdp_gfi import load_slim
from cdp_gfi.data.datasets import digits_datasets
from cdp_gfi.distributed import DistInfo
from cdp_gfi.runs import cifar_steps
from cdp_gfi.runs import imagenet_stage2 as stage2
from cdp_gfi.runs.cifar_config import RUN_FILES
from cdp_gfi.runs.folders import claim, next_free

REPO = Path(__file__).resolve().parents[1]


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name.replace("/", "_"), REPO / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


prune_cifar, statistic_imagenet = _script("prune_cifar.py"), _script("statistic_imagenet.py")
ONE_PROCESS = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), is_main=True)


def small_digits(seed=0):
    """Digits cut to 128 training and 64 test images."""
    train_aug, train_plain, test = digits_datasets(seed)
    return Subset(train_aug, range(128)), Subset(train_plain, range(128)), Subset(test, range(64))


def snapshot(folder: Path) -> dict:
    """Every file under ``folder`` with its size and modification time."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


def test_the_next_free_name_is_deterministic(tmp_path):
    base = tmp_path / "runs" / "digits_resnet20_cdp_seed0"
    assert next_free(base, RUN_FILES) == base  # nothing there
    base.mkdir(parents=True)
    (base / "notes.txt").write_text("the user's own file")
    assert next_free(base, RUN_FILES) == base  # holds no run
    (base / "args.json").write_text("{}")
    second = base.with_name(base.name + "-2")
    assert next_free(base, RUN_FILES) == next_free(base, RUN_FILES) == second
    second.mkdir()
    (second / "point_0.3").mkdir()
    assert next_free(base, RUN_FILES) == base.with_name(base.name + "-3")
    assert claim(base, RUN_FILES, default=True, flag="--save_dir", to_continue="-") == base.with_name(
        base.name + "-3")
    assert not base.with_name(base.name + "-3").exists()  # choosing creates nothing
    with pytest.raises(ValueError, match=r"--save_dir .* holds another run \(args.json\): continue .* another "
                                         "--save_dir"):
        claim(base, RUN_FILES, default=False, flag="--save_dir", to_continue="continue it with --resume")


def test_a_run_into_an_occupied_folder_is_refused_and_writes_nothing(tmp_path, capsys):
    occupied = tmp_path / "run"
    occupied.mkdir()
    for name in ("args.json", "last.pth", "summary.json"):
        (occupied / name).write_text("an earlier run")
    before = snapshot(occupied)
    assert prune_cifar.main(["--dataset", "digits", "--save_dir", str(occupied)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --save_dir") and "--resume" in err[0], err
    assert snapshot(occupied) == before and len(list(tmp_path.iterdir())) == 1


def test_demo_twice_then_a_sweep_keeps_all_three_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cifar_steps, "digits_datasets", small_digits)
    demo = ["--dataset", "digits", "--baseline_epochs", "1", "--epochs", "1", "--stop_batch", "2"]
    assert prune_cifar.main(demo) == 0
    first = Path("runs/digits_resnet20_cdp_seed0")
    kept = snapshot(first)
    assert prune_cifar.main(demo) == 0
    assert prune_cifar.main(demo + ["--sparsity", "0.3,0.5"]) == 0
    out = capsys.readouterr().out
    second, third = (first.with_name(f"{first.name}-{n}") for n in (2, 3))
    assert f"{first} holds another run (args.json): this run writes to {second}" in out
    assert f"{first} holds another run (args.json): this run writes to {third}" in out
    assert snapshot(first) == kept  # untouched by the two later runs
    assert sorted(p.name for p in Path("runs").iterdir()) == [first.name, second.name, third.name]
    for path in (first / "last.pth", second / "last.pth", third / "point_0.3" / "last.pth",
                 third / "point_0.5" / "last.pth"):
        assert isinstance(load_slim(path), torch.nn.Module), path
    for folder in (first, second, third / "point_0.3"):
        assert (folder / "layers.png").stat().st_size > 0
    results = [line for line in out.splitlines() if line.startswith("result")]
    assert results[0].startswith("result: top-1 ") and results[0].endswith(f"files in {first}")
    assert "MACs 40.55M -> " in results[0] and "params 269.72K -> " in results[0]
    assert results[-1].startswith("result at --sparsity 0.3,0.5: top-1 ") and results[-1].endswith(str(third))
    assert out.rstrip().splitlines()[-1] == results[-1]  # the sweep ends with its line


def test_stage1_refuses_an_occupied_folder_and_picks_the_next_default(imagefolder_root, tmp_path, monkeypatch,
                                                                      capsys):
    occupied = tmp_path / "out"
    occupied.mkdir()
    (occupied / "masks.pth").write_text("an earlier run")
    argv = ["--model", "resnet18", "--dataroot", str(imagefolder_root), "--allow_random_init", "--sparsity", "0.3",
            "--device", "cpu", "--save_model_path", str(occupied)]
    assert statistic_imagenet.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --save_model_path") and "--save_statistic_path" in err
    assert [p.name for p in occupied.iterdir()] == ["masks.pth"]
    monkeypatch.chdir(tmp_path)
    default = Path("ckpt/imagenet_resnet18_cdp")
    default.mkdir(parents=True)
    (default / "results.csv").write_text("an earlier run")
    config = stage1.claim_output(stage1.Stage1Config(model="resnet18"), ONE_PROCESS)
    assert config.save_model_path == f"{default}-2"


def test_stage2_refuses_an_occupied_results_dir_unless_continuing_it(imagefolder_root, tmp_path, monkeypatch,
                                                                     capsys):
    results = tmp_path / "results"
    results.mkdir()
    (results / stage2.CHECKPOINT_NAME).write_text("an earlier run")
    assert stage2.main(["--dataroot", str(imagefolder_root), "--model", "resnet18", "--results-dir",
                        str(results)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --results_dir") and f"--resume {results / stage2.CHECKPOINT_NAME}" in err
    monkeypatch.chdir(tmp_path)
    fresh = argparse.Namespace(results_dir=None, resume=None)
    assert stage2.claim_results_dir(fresh, ONE_PROCESS) == "results-2"
    continuing = argparse.Namespace(results_dir=None, resume=f"results/{stage2.CHECKPOINT_NAME}")
    assert stage2.claim_results_dir(continuing, ONE_PROCESS) == "results"


PARSERS = {"prune_cifar.py": prune_cifar.build_parser, "statistic_imagenet.py": statistic_imagenet.build_parser,
           "imagenet/imagenet.py": stage2.build_parser}


@pytest.mark.parametrize("script", PARSERS)
def test_every_multi_word_flag_parses_in_both_spellings(script):
    parser = PARSERS[script]()
    flags = {s for action in parser._actions for s in action.option_strings if s.startswith("--")}
    for flag in flags:
        other = "--" + flag[2:].translate(str.maketrans("_-", "-_"))
        assert parser._option_string_actions[other] is parser._option_string_actions[flag], (flag, other)
    declared = "--batch-size" if script == "imagenet/imagenet.py" else "--batch_size"
    alias = "--batch_size" if declared == "--batch-size" else "--batch-size"
    shown = parser.format_help()
    assert f"{declared} BATCH_SIZE" in shown and f"{alias} BATCH_SIZE" not in shown  # the declared spelling only
    assert "Every multi-word flag takes either spelling" in shown


def test_both_spellings_give_the_same_arguments():
    stage1_argv = ["--dataroot", "d", "--sparsity", "0.3", "--batch_size", "16", "--input_size", "64",
                   "--save_model_path", "out", "--stop_batch", "2"]
    stage2_argv = ["--dataroot", "d", "--batch-size", "16", "--input-size", "64", "--make-mask", "--results_dir",
                   "r", "--label-smoothing", "0.1", "--warm_lr", "0.01"]
    swap = str.maketrans("_-", "-_")
    for parser, argv in ((statistic_imagenet.build_parser(), stage1_argv), (stage2.build_parser(), stage2_argv)):
        other = [a if not a.startswith("--") else "--" + a[2:].translate(swap) for a in argv]
        assert parser.parse_args(argv) == parser.parse_args(other)
    assert stage2.build_parser().parse_args(["--dataroot", "d", "--batch", "8"]).batch_size == 8  # a prefix of both

"""The held-out quality bench's inputs: the adapted-network cache and bad input, on tiny real data."""
import dataclasses
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import adaptation  # noqa: E402
import bench_quality  # noqa: E402
import bench_latency_quality  # noqa: E402
from cdp_gfi import build_model  # noqa: E402
from cdp_gfi.masks.variants import DEFAULTS  # noqa: E402
from cdp_gfi.data.datasets import cifar_datasets  # noqa: E402
from cdp_gfi.data.samplers import make_loader  # noqa: E402


@pytest.fixture()
def checkpoint(tmp_path) -> Path:
    torch.manual_seed(0)
    path = tmp_path / "resnet20.th"
    torch.save({"state_dict": build_model("resnet20", "cifar10").state_dict()}, path)
    return path


def test_the_adapted_network_cache_reuses_one_recipe_and_rebuilds_for_another(cifar_root, checkpoint, tmp_path,
                                                                              monkeypatch, capsys):
    calls = []

    def fine_tune(model, name, splits, test, epochs, *rest, **kw):  # stands in for the epochs of training
        calls.append(epochs)
        with torch.no_grad():
            next(model.parameters()).add_(float(epochs))
        return 50.0

    monkeypatch.setattr(adaptation, "fine_tune", fine_tune)
    splits = cifar_datasets(cifar_root, check_integrity=False)
    test = make_loader(splits[2], 64, shuffle=False)
    cache = tmp_path / "cache"
    first, recipe = adaptation.adapted("resnet20", checkpoint, splits, test, 1, cifar_root, cache)
    again, same = adaptation.adapted("resnet20", checkpoint, splits, test, 1, cifar_root, cache)
    assert calls == [1] and same == recipe
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in first.state_dict().items())
    adaptation.adapted("resnet20", checkpoint, splits, test, 2, cifar_root, cache)  # another recipe: rebuilt
    assert calls == [1, 2] and len(list(cache.iterdir())) == 2
    stored = torch.load(recipe["path"], weights_only=True)  # a file whose recipe is not its name's: rebuilt
    torch.save({**stored, "recipe": {**stored["recipe"], "lr": 0.5}}, recipe["path"])
    adaptation.adapted("resnet20", checkpoint, splits, test, 1, cifar_root, cache)
    assert calls == [1, 2, 1] and "another recipe; rebuilding" in capsys.readouterr().err


def test_fine_tuning_trains_without_a_teacher_and_with_one(cifar_root, checkpoint):
    """The bench's recipe is plain SGD unless a row asks for distillation (recovery defaults do not leak in)."""
    splits = cifar_datasets(cifar_root, check_integrity=False)
    test = make_loader(splits[2], 64, shuffle=False)
    student = build_model("resnet20", "cifar10")
    before = [p.detach().clone() for p in student.parameters()]
    top1 = adaptation.fine_tune(student, "resnet20", splits, test, 1, 0.01, 0)
    assert 0.0 <= top1 <= 100.0
    assert any(not torch.equal(a, b) for a, b in zip(before, student.parameters()))
    teacher = build_model("resnet20", "cifar10").eval()
    assert 0.0 <= adaptation.fine_tune(build_model("resnet20", "cifar10"), "resnet20", splits, test, 1, 0.01, 0,
                                       teacher=teacher, distill=(4.0, 0.5)) <= 100.0


def test_a_data_root_without_the_layout_names_to_pickle(tmp_path, checkpoint, capsys):
    assert bench_quality.main(["--dataroot", str(tmp_path), "--nets", f"resnet20={checkpoint}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "to_pickle.py" in err[0]


@pytest.mark.parametrize("flag", ["--adapt_epochs", "--epochs"])
def test_negative_epochs_are_one_error_line(cifar_root, checkpoint, capsys, flag):
    assert bench_quality.main(["--dataroot", str(cifar_root), "--nets", f"resnet20={checkpoint}", flag, "-1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "must be >= 0" in err[0]


@pytest.mark.parametrize("flags", [["--seeds", "0"], ["--first_seed", "-1"], ["--jobs", "0"],
                                   ["--reconstruct_batches", "0"]])
def test_no_seeds_or_a_negative_first_seed_are_one_error_line(cifar_root, checkpoint, capsys, flags):
    assert bench_quality.main(["--dataroot", str(cifar_root), "--nets", f"resnet20={checkpoint}", *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and flags[0] in err[0]


def test_unknown_rows_and_recovery_on_rows_without_masks_are_refused():
    assert bench_quality.parse_method("cdp+rec+kd") == ("cdp", ("rec", "kd"))
    assert bench_quality.parse_method("nni-fpgm+rec-readers") == ("nni-fpgm", ("rec-readers",))
    for bad in ("cdp+foo", "nope", "dense+rec", "tp-global+kd", "cdp{cost=1}", "l1{cost_power=1}", "cdp{rule=}",
                "cdp+rec+rec-readers"):
        with pytest.raises(ValueError):
            bench_quality.parse_method(bad)


def test_a_variant_row_changes_the_default_by_its_options():
    kind, variant = bench_quality.ours("cdp{cost_power=0.5;max_layer_sparsity=none;cdp_mode=classwise}")
    want = dataclasses.replace(DEFAULTS["cdp"], cost_power=0.5, max_layer_sparsity=None, cdp_mode="classwise")
    assert kind == "cdp" and variant == want != DEFAULTS["cdp"]
    assert bench_quality.ours("gfi-ap{site=conv}") == ("gfi", dataclasses.replace(DEFAULTS["gfi"], site="conv"))
    assert bench_quality.parse_method("gfi-ap{site=conv}+rec") == ("gfi-ap{site=conv}", ("rec",))


@pytest.mark.parametrize("flags, named", [(["--methods", "nni-l1"], "nni-l1"), (["--target", "1.5"], "--target")])
def test_the_equal_latency_bench_refuses_bad_input_in_one_line(cifar_root, checkpoint, tmp_path, capsys, flags, named):
    code = bench_latency_quality.main(["--dataroot", str(cifar_root), "--nets", f"resnet20={checkpoint}",
                                       "--out", str(tmp_path / "out"), *flags])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error:") and named in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_the_macs_target_is_matched_side_by_side_with_the_latency_targeted_network():
    """Equal latency is one ratio of the two slim networks timed in alternation; one selection is one network."""
    class Width:  # deterministic seconds: a network's parameter count
        name = "params"

        def __init__(self):
            self.calls = 0

        def __call__(self, module, x):
            self.calls += 1
            return float(sum(p.numel() for p in module.parameters()))

    fast, slow = torch.nn.Conv2d(3, 4, 3), torch.nn.Conv2d(3, 8, 3)   # 112 and 224 parameters
    keep = {"conv": torch.tensor([True, False])}
    timer, x = Width(), torch.zeros(1, 3, 8, 8)
    same = bench_latency_quality.matched_try(0.3, {"conv": keep["conv"].clone()}, keep, fast, slow, 0.25, x, timer)
    assert same.measured == 0.25 and timer.calls == 0
    other = bench_latency_quality.matched_try(0.3, {"conv": torch.tensor([True, True])}, keep, fast, slow, 0.25, x,
                                              timer)
    assert other.measured == pytest.approx(1 - 0.75 * 2) and timer.calls == 6   # twice as slow: 3 rounds of 2
    assert other.asked == 0.3 and torch.equal(other.keep["conv"], torch.tensor([True, True]))


def test_resume_takes_a_row_as_done_only_with_the_same_recovery_settings():
    import pandas as pd

    rows = pd.DataFrame({"net": ["resnet20"] * 3, "method": ["cdp+rec+kd", "cdp", "gfi-ap+kd"],
                         "target_pct": [30.0] * 3, "seed": [0] * 3, "distill": ["T=4,W=0.9", "none", "T=4,W=1"],
                         "rec_batches": [4, 0, 0], "top1_b": [86.0, float("nan"), 85.0]})
    runs = [("resnet20", 0, 0.3, "cdp+rec+kd"), ("resnet20", 0, 0.3, "cdp"), ("resnet20", 0, 0.3, "gfi-ap+kd")]
    assert bench_quality.pending(rows, runs, (4.0, 0.9), need_b=True, rec_batches=4) == runs[1:]  # (b) to do
    assert bench_quality.pending(rows, runs, (4.0, 0.9), need_b=False, rec_batches=4) == runs[2:]
    assert bench_quality.pending(rows, runs, (4.0, 1.0), need_b=True, rec_batches=4) == [runs[0], runs[1]]
    assert bench_quality.pending(rows, runs, (4.0, 0.9), need_b=False, rec_batches=16) == [runs[0], runs[2]]
    unrecorded = bench_quality.with_settings(rows.drop(columns=["distill", "rec_batches"]))  # a CSV from before
    assert list(unrecorded["distill"]) == ["unknown", "none", "unknown"]
    assert list(unrecorded["rec_batches"]) == [4, 0, 0]
    assert bench_quality.pending(unrecorded, runs, (4.0, 0.9), need_b=False, rec_batches=4) == [runs[0], runs[2]]
    summary = bench_quality.summarize(pd.concat([rows, rows.assign(distill="T=2,W=0.9", seed=1),
                                                 rows.iloc[:1].assign(rec_batches=16, seed=2)]).assign(
        macs_removed_pct=30.0, top1_a=50.0, total_s=1.0, load_1min=1.0))
    assert len(summary) == 7 and set(summary["distill"]) == {"T=4,W=0.9", "none", "T=4,W=1", "T=2,W=0.9"}
    assert sorted(summary.loc[summary["method"] == "cdp+rec+kd", "rec_batches"]) == [4, 4, 16]


def test_runs_sharing_an_out_folder_keep_each_others_rows(tmp_path):
    """Two runs appending in turn (each with only its own rows in memory) lose nothing; a re-run row replaces its
    own key only."""
    import pandas as pd

    csv = tmp_path / "bench_quality.csv"
    row = dict(net="resnet20", method="cdp", target_pct=30.0, seed=0, distill="none", rec_batches=0, top1_a=70.0,
               top1_b=85.0)
    bench_quality.add_row(csv, row)                                        # run 1
    bench_quality.add_row(csv, {**row, "net": "resnet32"})                 # run 2, started before run 1 wrote
    bench_quality.add_row(csv, {**row, "seed": 1})                         # run 1 again
    rows = bench_quality.add_row(csv, {**row, "top1_b": 86.0})             # run 2 re-measures run 1's first row
    assert rows.equals(pd.read_csv(csv)) and len(rows) == 3
    assert sorted(zip(rows["net"], rows["seed"], rows["top1_b"])) == [("resnet20", 0, 86.0), ("resnet20", 1, 85.0),
                                                                      ("resnet32", 0, 85.0)]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".bench_quality.csv.lock", "bench_quality.csv"]


def test_rows_run_in_two_worker_processes_equal_the_rows_run_in_one(cifar_root_2600, checkpoint, tmp_path):
    import pandas as pd

    common = ["--dataroot", str(cifar_root_2600), "--nets", f"resnet20={checkpoint}", "--adapt_epochs", "0",
              "--epochs", "0", "--targets", "0.3", "--seeds", "1", "--methods", "gfi-ap,l1-layernorm"]
    assert bench_quality.main([*common, "--out", str(tmp_path / "one")]) == 0
    assert bench_quality.main([*common, "--jobs", "2", "--out", str(tmp_path / "two")]) == 0
    one, two = (pd.read_csv(tmp_path / name / "bench_quality.csv").set_index("method").sort_index()
                for name in ("one", "two"))
    assert len(one) == 2 and one["top1_a"].notna().all()
    pd.testing.assert_frame_equal(one[["macs_removed_pct", "top1_a"]], two[["macs_removed_pct", "top1_a"]])

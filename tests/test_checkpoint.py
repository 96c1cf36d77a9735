import os

import pytest
import torch
from torch import nn

from cdp_gfi.files.checkpoint import CheckpointError, CheckpointMismatchError, ensure_writable_dir, extract_state_dict, load_checkpoint, load_state_dict_strict, save_atomic


class Explodes:
    """Pickling this raises, simulating a crash (or Ctrl-C) halfway through torch.save."""

    def __init__(self, error: BaseException):
        self.error = error

    def __reduce__(self):
        raise self.error


def conv_net(width: int = 4) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(3, width, 3), nn.BatchNorm2d(width), nn.ReLU())


def test_save_atomic_round_trip_creates_parent_dirs(tmp_path):
    path = tmp_path / "a" / "b" / "ckpt.pth"
    save_atomic({"x": torch.arange(3)}, path)
    assert torch.equal(load_checkpoint(path)["x"], torch.arange(3))
    assert os.listdir(path.parent) == ["ckpt.pth"]


@pytest.mark.parametrize("error", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_save_atomic_failure_leaves_target_untouched(tmp_path, error):
    path = tmp_path / "last.pth"
    save_atomic({"epoch": 1}, path)
    before = path.read_bytes()
    with pytest.raises(type(error)):
        save_atomic({"weights": torch.zeros(1000), "bad": Explodes(error)}, path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["last.pth"], "temp file left behind"


def test_unwritable_directory_is_named(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(OSError, match="cannot write to directory") as info:
        ensure_writable_dir(blocker / "run")
    assert str(blocker / "run") in str(info.value)
    with pytest.raises(OSError, match=str(blocker)):
        save_atomic({}, blocker / "run" / "last.pth")


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_directory_raises_permission_error(tmp_path):
    tmp_path.chmod(0o500)
    try:
        with pytest.raises(PermissionError, match=str(tmp_path)):
            ensure_writable_dir(tmp_path)
    finally:
        tmp_path.chmod(0o700)


def test_missing_checkpoint_names_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_checkpoint(tmp_path / "nope.pth")


@pytest.mark.parametrize("damage", ["truncate", "text", "empty"])
def test_corrupt_checkpoint_raises_checkpoint_error(tmp_path, damage):
    path = tmp_path / "broken.pth"
    save_atomic({"w": torch.randn(64, 64)}, path)
    data = path.read_bytes()
    path.write_bytes({"truncate": data[: len(data) // 2], "text": b"epoch,lr\n1,0.1\n", "empty": b""}[damage])
    with pytest.raises(CheckpointError, match="broken.pth.*corrupt or not a torch checkpoint"):
        load_checkpoint(path)


def test_extract_state_dict_strips_wrapper_prefixes():
    sd = conv_net().state_dict()
    ddp = {f"module.{k}": v for k, v in sd.items()}
    compiled_ddp = {f"_orig_mod.module.{k}": v for k, v in sd.items()}
    for obj in (ddp, compiled_ddp, {"state_dict": ddp}, {"model": ddp, "epoch": 3}, {"model": conv_net()}):
        assert list(extract_state_dict(obj)) == list(sd)


def test_extract_state_dict_keeps_a_real_submodule_named_module():
    sd = {"module.weight": torch.zeros(1), "head.weight": torch.zeros(1)}
    assert list(extract_state_dict(sd)) == ["module.weight", "head.weight"]


def test_extract_state_dict_rejects_unknown_layout():
    with pytest.raises(CheckpointError, match="'epoch'"):
        extract_state_dict({"epoch": 3, "args": {}})
    with pytest.raises(CheckpointError, match="list"):
        extract_state_dict([1, 2])


def test_strict_load_lists_missing_unexpected_and_shape_mismatches(tmp_path):
    source = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)).state_dict()
    source["extra.weight"] = torch.zeros(2)
    path = tmp_path / "pruned.pth"
    save_atomic({"state_dict": source}, path)
    model = conv_net(4)
    model[2] = nn.Conv2d(4, 4, 1)  # parameters the checkpoint lacks
    before = {k: v.clone() for k, v in model.state_dict().items()}

    with pytest.raises(CheckpointMismatchError) as info:
        load_state_dict_strict(model, path)
    message = str(info.value)
    assert "pruned.pth" in message
    assert "2 missing keys" in message and "2.weight" in message and "2.bias" in message
    assert "1 unexpected keys" in message and "extra.weight" in message
    assert "0.weight: checkpoint (8, 3, 3, 3) vs model (4, 3, 3, 3)" in message
    assert "1.running_mean: checkpoint (8,) vs model (4,)" in message
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "model changed by a failed load"


def test_strict_load_truncates_long_lists():
    model = nn.Sequential(*[nn.Linear(1, 1) for _ in range(15)])
    with pytest.raises(CheckpointMismatchError, match=r"30 missing keys(.|\n)*\.\.\. and 20 more"):
        load_state_dict_strict(model, {"state_dict": {}})


def test_strict_load_accepts_ddp_checkpoint_and_returns_it(tmp_path):
    trained = conv_net()
    nn.init.constant_(trained[0].weight, 0.5)
    path = tmp_path / "ddp.pth"
    save_atomic({"model": {f"module.{k}": v for k, v in trained.state_dict().items()}, "epoch": 7}, path)
    fresh = conv_net()
    loaded = load_state_dict_strict(fresh, path)
    assert loaded["epoch"] == 7
    assert torch.equal(fresh[0].weight, trained[0].weight)

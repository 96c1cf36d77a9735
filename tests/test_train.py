import math
import os
import socket

import pandas as pd
import pytest
import torch
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from cdp_gfi.files.checkpoint import load_checkpoint
from cdp_gfi.data.samplers import make_loader
from cdp_gfi.distributed import all_reduce_sum_, cleanup, init_distributed, parse_device
from cdp_gfi.train.loop import LOG_COLUMNS, evaluate, fit, seed_everything
from cdp_gfi.train.optim import build_optimizer, build_scheduler

EPOCHS = 3
STEPS_PER_EPOCH = 4


def eval_case() -> tuple[torch.Tensor, torch.Tensor]:
    """Four samples whose inputs are their own 6-class logits: top-1 25%, top-5 75%."""
    down, up = torch.arange(5.0, -1.0, -1.0), torch.arange(6.0)
    logits = torch.stack([down, down, down, up])
    labels = torch.tensor([0, 1, 5, 4])  # hit, 2nd place, last place, 2nd place
    return logits, labels


def test_evaluate_hand_checked():
    logits, labels = eval_case()
    result = evaluate(nn.Identity(), DataLoader(TensorDataset(logits, labels), batch_size=3), "cpu")
    log_sum_exp = math.log(sum(math.exp(k) for k in range(6)))
    assert result["top1"] == pytest.approx(25.0)
    assert result["top5"] == pytest.approx(75.0)
    assert result["loss"] == pytest.approx(log_sum_exp - (5 + 4 + 0 + 4) / 4)


def test_evaluate_omits_top5_below_five_classes():
    data = TensorDataset(torch.eye(3), torch.tensor([0, 1, 0]))
    result = evaluate(nn.Identity(), DataLoader(data, batch_size=2), "cpu")
    assert set(result) == {"loss", "top1"}
    assert result["top1"] == pytest.approx(200 / 3)


def lr_trace(scheduler_kwargs: dict, iterations: int, lr: float = 0.1) -> list[float]:
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=lr)
    scheduler = build_scheduler(optimizer, **scheduler_kwargs)
    trace = []
    for _ in range(iterations):
        trace.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return trace + [optimizer.param_groups[0]["lr"]]


def test_cosine_schedule_warms_up_linearly_then_anneals_to_zero():
    kwargs = dict(kind="cosine", epochs=4, steps_per_epoch=10, warmup_epochs=1, warmup_start_lr=0.01)
    trace = lr_trace(kwargs, 40)
    warmup = [0.01 + 0.09 * i / 10 for i in range(10)]
    cosine = [0.05 * (1 + math.cos(math.pi * i / 30)) for i in range(31)]
    assert trace == pytest.approx(warmup + cosine, abs=1e-9)


def test_cosine_schedule_without_warmup_starts_at_lr():
    trace = lr_trace(dict(kind="cosine", epochs=2, steps_per_epoch=5), 10)
    assert trace == pytest.approx([0.05 * (1 + math.cos(math.pi * i / 10)) for i in range(11)], abs=1e-9)


def test_step_schedule_divides_by_1_8_every_8_epochs():
    trace = lr_trace(dict(kind="step", epochs=20, steps_per_epoch=5), 100)
    assert trace == pytest.approx([0.1 / 1.8 ** (i // 40) for i in range(101)], rel=1e-9)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(kind="linear", epochs=2, steps_per_epoch=5), "unknown LR schedule 'linear'"),
        (dict(kind="cosine", epochs=2, steps_per_epoch=5, warmup_epochs=2), "warmup_epochs"),
        (dict(kind="cosine", epochs=2, steps_per_epoch=0), "steps_per_epoch"),
    ],
)
def test_build_scheduler_rejects_bad_input(kwargs, message):
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(ValueError, match=message):
        build_scheduler(optimizer, **kwargs)


def test_build_optimizer_can_exempt_bn_and_bias_from_weight_decay():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    plain = build_optimizer(model, lr=0.1)
    assert len(plain.param_groups) == 1 and plain.param_groups[0]["nesterov"]
    split = build_optimizer(model, lr=0.1, no_wd_on_bn=True)
    assert [len(g["params"]) for g in split.param_groups] == [1, 3]
    assert [g["weight_decay"] for g in split.param_groups] == [5e-4, 0.0]


def make_run(seed: int):
    """A tiny conv net with BN and dropout (so RNG state matters), its loaders, optimiser and scheduler."""
    seed_everything(seed)
    data = torch.Generator().manual_seed(123)
    images, labels = torch.randn(96, 3, 8, 8, generator=data), torch.randint(0, 5, (96,), generator=data)
    train_loader = DataLoader(TensorDataset(images[:64], labels[:64]), batch_size=64 // STEPS_PER_EPOCH, shuffle=True)
    test_loader = DataLoader(TensorDataset(images[64:], labels[64:]), batch_size=16)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout(0.3),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5),
    )
    optimizer = build_optimizer(model, lr=0.2)
    scheduler = build_scheduler(optimizer, "cosine", EPOCHS, len(train_loader), warmup_epochs=1)
    return model, train_loader, test_loader, optimizer, scheduler


def run_fit(run_dir, seed=0, **kwargs):
    model, train_loader, test_loader, optimizer, scheduler = make_run(seed)
    kwargs.setdefault("epochs", EPOCHS)
    frame = fit(
        model, train_loader, test_loader, optimizer=optimizer, scheduler=scheduler, device="cpu", run_dir=run_dir,
        **kwargs,
    )
    return model, frame


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    return run_fit(tmp_path_factory.mktemp("uninterrupted"))


def test_fit_writes_log_last_and_best(tmp_path, uninterrupted):
    model, frame = run_fit(tmp_path, make_checkpoint=lambda: {"args": {"lr": 0.2}, "masks": {"0": torch.ones(8)}})
    assert list(frame.columns) == LOG_COLUMNS and frame["epoch"].tolist() == [1, 2, 3]
    assert frame.attrs["final_top1"] == frame["test_top1"].iloc[-1]
    assert frame.attrs["best_top1"] == frame["test_top1"].max()
    assert frame.attrs["best_epoch"] == frame["test_top1"].idxmax() + 1
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "log.csv"), frame, check_dtype=False)

    last = load_checkpoint(tmp_path / "last.pth")
    assert last["epoch"] == EPOCHS and last["args"] == {"lr": 0.2} and len(last["log"]) == EPOCHS
    assert all(torch.equal(v, last["state_dict"][k]) for k, v in model.state_dict().items())
    best = load_checkpoint(tmp_path / "best.pth")
    assert best["epoch"] == frame.attrs["best_epoch"]
    assert sorted(os.listdir(tmp_path)) == ["best.pth", "last.pth", "log.csv"]


def test_fit_after_step_hook_keeps_pruned_filter_at_zero(tmp_path):
    def zero_first_filter(model: nn.Module) -> None:
        with torch.no_grad():
            model[0].weight[0].zero_()

    model, _ = run_fit(tmp_path, epochs=1, after_step=zero_first_filter)
    assert not model[0].weight[0].any() and model[0].weight[1].any()


def raise_after_epoch_2(epoch, row):
    if epoch == 2:
        raise KeyboardInterrupt


class RaiseMidEpoch2:
    """after_step hook that presses Ctrl-C halfway through epoch 2."""

    def __init__(self):
        self.steps = 0

    def __call__(self, model):
        self.steps += 1
        if self.steps == STEPS_PER_EPOCH + 2:
            raise KeyboardInterrupt


@pytest.mark.parametrize("interrupt", ["after_epoch_2", "mid_epoch_2"])
def test_resume_after_interrupt_matches_uninterrupted_run(tmp_path, uninterrupted, interrupt):
    hook = {"after_epoch_2": dict(on_epoch_end=raise_after_epoch_2), "mid_epoch_2": dict(after_step=RaiseMidEpoch2())}
    with pytest.raises(KeyboardInterrupt):
        run_fit(tmp_path, **hook[interrupt])
    completed = 2 if interrupt == "after_epoch_2" else 1
    assert load_checkpoint(tmp_path / "last.pth")["epoch"] == completed
    assert len(pd.read_csv(tmp_path / "log.csv")) == completed
    assert not [name for name in os.listdir(tmp_path) if name.endswith(".tmp")]

    # A fresh process would rebuild everything from a different state; resume must restore all of it.
    resumed_model, resumed = run_fit(tmp_path, seed=999, resume=True)
    model, frame = uninterrupted
    for key, value in model.state_dict().items():
        torch.testing.assert_close(resumed_model.state_dict()[key], value, rtol=0, atol=0)
    columns = [c for c in LOG_COLUMNS if c != "seconds"]
    pd.testing.assert_frame_equal(resumed[columns], frame[columns], rtol=0, atol=0)
    assert resumed.attrs == pytest.approx(frame.attrs)


def test_resume_with_different_epochs_is_refused(tmp_path):
    run_fit(tmp_path, epochs=1)
    with pytest.raises(ValueError, match="1-epoch run but epochs=3"):
        run_fit(tmp_path, resume=True)


def test_make_checkpoint_may_not_override_training_state(tmp_path):
    with pytest.raises(ValueError, match="reserved keys \\['epoch'\\]"):
        run_fit(tmp_path, epochs=1, make_checkpoint=lambda: {"epoch": 0})


def test_parse_device():
    assert parse_device("cpu") == torch.device("cpu")
    assert parse_device(None) == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    count = torch.cuda.device_count()
    with pytest.raises(ValueError, match=f"--gpus 99: only {count} CUDA devices"):
        parse_device(None, "0,99" if count else "99")
    with pytest.raises(ValueError, match="comma-separated GPU indices"):
        parse_device(None, "0,a")
    with pytest.raises(ValueError, match="conflicts"):
        parse_device("cpu", "0")
    for bad in ("tpu", "mps", "gpu0"):
        with pytest.raises(ValueError, match="expected cpu, cuda or cuda:N"):
            parse_device(bad)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_parse_device_cuda_unavailable():
    with pytest.raises(ValueError, match="CUDA is not available"):
        parse_device("cuda")


def test_init_distributed_single_process_and_bad_env(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    info = init_distributed("cpu")
    assert (info.rank, info.world_size, info.is_main, info.distributed) == (0, 1, True, False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="RANK is not set"):
        init_distributed("cpu")
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="WORLD_SIZE='two'"):
        init_distributed("cpu")


def distributed_worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    info = init_distributed("cpu")
    try:
        total = all_reduce_sum_(torch.tensor([rank + 1.0, 10.0]))
        logits, labels = eval_case()
        half = slice(2 * rank, 2 * rank + 2)  # each rank evaluates its own half
        result = evaluate(nn.Identity(), DataLoader(TensorDataset(logits[half], labels[half]), batch_size=1), "cpu")
        torch.save({"info": info, "total": total, "eval": result}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        cleanup()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_process_gloo_all_reduce_and_evaluate(tmp_path):
    mp.spawn(distributed_worker, args=(free_port(), str(tmp_path)), nprocs=2)
    single = evaluate(nn.Identity(), DataLoader(TensorDataset(*eval_case()), batch_size=4), "cpu")
    for rank in range(2):
        out = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        assert (out["info"].rank, out["info"].world_size, out["info"].is_main) == (rank, 2, rank == 0)
        assert out["total"].tolist() == [3.0, 20.0]
        assert out["eval"] == pytest.approx(single)


def test_resume_restores_a_seeded_loader_generator(tmp_path):
    """make_loader shuffles with its own generator: resume must put it back where the interrupted run left it."""
    def run(run_dir, **kwargs):
        seed_everything(0)
        data = torch.Generator().manual_seed(1)
        dataset = TensorDataset(torch.randn(64, 8, generator=data), torch.randint(0, 3, (64,), generator=data))
        model = nn.Linear(8, 3)
        train_loader = make_loader(dataset, 8, shuffle=True, seed=0)
        optimizer = build_optimizer(model, lr=0.1)
        scheduler = build_scheduler(optimizer, "cosine", EPOCHS, len(train_loader))
        fit(model, train_loader, make_loader(dataset, 64, shuffle=False), epochs=EPOCHS, optimizer=optimizer,
            scheduler=scheduler, device="cpu", run_dir=run_dir, **kwargs)
        return model

    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "resumed", on_epoch_end=raise_after_epoch_2)
    resumed = run(tmp_path / "resumed", resume=True)
    assert torch.equal(resumed.weight, run(tmp_path / "uninterrupted").weight)

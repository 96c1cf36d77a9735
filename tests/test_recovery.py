"""Recovery after pruning: least-squares reconstruction and distillation, on tiny real models."""
import copy
import warnings

import pytest
import torch
from torch import nn

from cdp_gfi import slim, to_nni_masks
from cdp_gfi.slimming.reconstruct import output_error, reconstruct
from cdp_gfi.train.distill import Distillation
from cdp_gfi.train.loop import seed_everything, train_one_epoch


def tiny() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    with torch.no_grad():  # BatchNorm statistics that are not the identity
        for bn in (model[1], model[4]):
            bn.running_mean.uniform_(-0.2, 0.2)
            bn.running_var.uniform_(0.5, 1.5)
    return model.eval()


def batches(n: int = 3, size: int = 8, count: int = 16):
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(count, 3, size, size, generator=gen), torch.randint(0, 4, (count,), generator=gen))
            for _ in range(n)]


def pruned(model: nn.Module, kept: int):
    keep = {"0": torch.arange(8) < kept}
    masks = to_nni_masks(model, keep)
    return slim(copy.deepcopy(model), masks, torch.zeros(1, 3, 8, 8)).eval(), masks


def test_reconstruction_lowers_the_next_layers_output_error():
    dense = tiny()
    model, masks = pruned(dense, kept=5)
    sample = batches()
    before = output_error(dense, model, "3", sample)
    assert reconstruct(dense, model, masks, sample, layers="readers") == ["3"]
    after = output_error(dense, model, "3", sample)
    assert after < 0.75 * before  # measured: 0.0148 -> 0.0083


def deeper() -> nn.Module:
    torch.manual_seed(0)
    layers = []
    for c_in in (3, 8, 8, 8):
        layers += [nn.Conv2d(c_in, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU()]
    model = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    with torch.no_grad():
        for bn in model[1::3][:4]:
            bn.running_mean.uniform_(-0.2, 0.2)
            bn.running_var.uniform_(0.5, 1.5)
    return model.eval()


def test_downstream_reconstruction_refits_every_layer_after_the_first_reader_and_beats_readers_only():
    dense, sample = deeper(), batches()
    masks = to_nni_masks(dense, {"3": torch.arange(8) < 4})  # the second conv loses half its filters
    readers, downstream = (slim(copy.deepcopy(dense), masks, torch.zeros(1, 3, 8, 8)).eval() for _ in range(2))

    def logits_error(model):
        with torch.no_grad():
            return sum(float((model(x) - dense(x)).pow(2).mean()) for x, _ in sample)

    before = logits_error(readers)
    assert reconstruct(dense, readers, masks, sample, layers="readers") == ["6"]
    assert reconstruct(dense, downstream, masks, sample) == ["6", "9", "14"]
    for name in ("0", "3"):  # before the first reader: as the pruning left them
        assert torch.equal(dict(downstream.named_modules())[name].weight, dict(readers.named_modules())[name].weight)
    assert logits_error(downstream) < logits_error(readers) < before


def test_downstream_reconstruction_passes_over_a_depthwise_conv_without_a_warning():
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.ReLU(), nn.Conv2d(8, 8, 1),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).eval()
    masks = to_nni_masks(dense, {"0": torch.arange(8) < 5})
    model = slim(copy.deepcopy(dense), masks, torch.zeros(1, 3, 8, 8)).eval()
    depthwise = model[4].weight.clone()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert reconstruct(dense, model, masks, batches()) == ["2", "6", "9"]
    assert torch.equal(model[4].weight, depthwise)


def test_reconstruction_refuses_an_unknown_choice_of_layers():
    dense = tiny()
    model, masks = pruned(dense, kept=5)
    with pytest.raises(ValueError, match="downstream, readers.*'all'"):
        reconstruct(dense, model, masks, batches(), layers="all")


def test_reconstruction_changes_nothing_when_nothing_was_pruned():
    dense = tiny()
    model, masks = pruned(dense, kept=8)
    state = copy.deepcopy(model.state_dict())
    assert reconstruct(dense, model, masks, batches()) == []
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


def test_a_layer_with_too_few_samples_is_left_as_it_was():
    dense = tiny()
    model, masks = pruned(dense, kept=5)
    weight = model[3].weight.clone()
    with pytest.warns(UserWarning, match="left as it was"):  # 1 image of 2x2: 4 rows for 45 unknowns
        assert reconstruct(dense, model, masks, batches(n=1, size=2, count=1)) == []
    assert torch.equal(model[3].weight, weight)


def _fine_tuned(distill):
    seed_everything(0)
    model = tiny()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)
    train_one_epoch(model, batches(), optimizer, scheduler, "cpu", criterion=nn.CrossEntropyLoss(),
                    disable_progress=True, distill=distill)
    return model.state_dict()


def test_distillation_with_weight_zero_is_plain_fine_tuning_bit_for_bit():
    teacher = copy.deepcopy(tiny())
    with torch.no_grad():
        teacher[-1].weight.mul_(3.0)  # a teacher that disagrees with the student
    plain, zero = _fine_tuned(None), _fine_tuned(Distillation(teacher, temperature=4.0, weight=0.0))
    assert all(torch.equal(plain[k], zero[k]) for k in plain)
    soft = _fine_tuned(Distillation(teacher, temperature=4.0, weight=0.9))
    assert not all(torch.equal(plain[k], soft[k]) for k in plain)


def test_distillation_refuses_bad_settings():
    with pytest.raises(ValueError, match="distill_weight"):
        Distillation(tiny(), weight=1.5)
    with pytest.raises(ValueError, match="distill_temperature"):
        Distillation(tiny(), temperature=0.0)


def test_a_layer_that_lost_outputs_too_is_fitted_to_the_outputs_it_kept():
    # scope "all": a stream conv loses filters and reads pruned channels at once
    dense = tiny()
    masks = to_nni_masks(dense, {"0": torch.arange(8) < 5, "3": torch.arange(8) % 2 == 0})
    model = slim(copy.deepcopy(dense), masks, torch.zeros(1, 3, 8, 8)).eval()
    sample = batches()

    def logits_error():
        with torch.no_grad():
            return sum(float((model(x) - dense(x)).pow(2).mean()) for x, _ in sample)

    before = logits_error()
    assert reconstruct(dense, model, masks, sample) == ["3", "8"]
    assert logits_error() < before

"""Feature-map statistics for CDP and GFI-AP, gathered in one streaming pass.

Forward hooks on the prunable convs see the raw conv output (before BN) of
each batch; they add it into running sums on the model's device and keep no
per-image maps. The model runs in eval mode under no_grad, so BatchNorm's
running statistics are untouched (the GFI-AP authors' code ran in train mode).

Kept per layer:
- ``cdp_class``: per-class sums of a_i = GAP(ReLU(F_i)), [K, C] (CDP class-wise);
- ``cdp_sample``: a_i for every sampled image, [N, C] (CDP per-sample: the
  per-filter mean that splits documents needs all of them);
- ``gfi``: S_c = mean_hw |class-mean map|, [K, C] (GFI-AP). A class-ordered
  loader (``data.sample_loader(class_ordered=True)``, ``data.ClassShardSampler``)
  needs one class's map sums [C, H, W] at a time: each class is reduced to its
  row of S as soon as its last image is in. A loader in any other order keeps
  per-class map sums [K, C, H, W] until all images are in: the one large buffer
  (11 GB for ResNet-50 on 1000 classes); ``memory_budget_gb`` splits the layers
  into passes."""
from __future__ import annotations

import math
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn
from tqdm.auto import tqdm

from ..data.samplers import is_class_ordered
from .accumulators import Accumulator, gather_rows
from .store import KINDS, Statistics, StatisticsError


def _split_batch(batch):
    """(inputs, labels or None) from a loader's batch: a tensor, or a (x, y, ...) sequence."""
    if torch.is_tensor(batch):
        return batch, None
    if isinstance(batch, (list, tuple)) and batch and torch.is_tensor(batch[0]):
        y = batch[1] if len(batch) > 1 and torch.is_tensor(batch[1]) else None
        return batch[0], y
    raise StatisticsError(f"cannot read inputs from a batch of type {type(batch).__name__}; "
                          "the loader must yield tensors or (inputs, labels) pairs")


def infer_num_classes(model: nn.Module, dummy_input: Optional[torch.Tensor] = None, data=None) -> int:
    """The model's number of classes: its last Linear layer's width, else its output's width on ``dummy_input``
    (or on the first batch of ``data``). A head of 1x1 convs and pooling, as in DLA, has no Linear layer."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if linears:
        return linears[-1].out_features
    if dummy_input is None and data is not None:
        dummy_input = _first_input(data)
    if dummy_input is not None:
        param = next(model.parameters(), None)
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                out = model(dummy_input[:1].to(param.device if param is not None else "cpu"))
        finally:
            model.train(was_training)
        if torch.is_tensor(out) and out.dim() == 2:
            return int(out.shape[1])
    raise StatisticsError("cannot infer the number of classes (no Linear layer, and no [N, classes] output on the "
                          "dummy input); pass num_classes")


def _first_input(data) -> Optional[torch.Tensor]:
    """The inputs of a loader's first batch (None for an NNI evaluator: it has its own dummy input)."""
    if _is_evaluator(data):
        return None
    batch = next(iter(data), None)
    return None if batch is None else _split_batch(batch)[0]


def plan_gfi_passes(shapes: Dict[str, Sequence[int]], num_classes: int,
                    memory_budget_gb: Optional[float]) -> List[List[str]]:
    """Group layers into passes whose per-class map sums (K x C x H x W floats) fit the budget.

    ``shapes`` maps layer name to its output map shape (C, H, W). A layer larger
    than the budget gets a pass of its own.
    """
    names = list(shapes)
    if memory_budget_gb is None:
        return [names] if names else []
    if memory_budget_gb <= 0:
        raise StatisticsError(f"memory budget must be positive, got {memory_budget_gb} GB")
    budget = memory_budget_gb * 2 ** 30
    passes, current, used = [], [], 0.0
    for name in names:
        need = 4.0 * num_classes * math.prod(shapes[name])
        if current and used + need > budget:
            passes.append(current)
            current, used = [], 0.0
        current.append(name)
        used += need
    if current:
        passes.append(current)
    return passes


def collect_statistics(model: nn.Module, data, layers: Sequence[str],
                       kinds: Sequence[str] = ("cdp_class",), *, num_classes: Optional[int] = None,
                       stop_batch: Optional[int] = None, memory_budget_gb: Optional[float] = None,
                       device: Optional[torch.device] = None, dummy_input: Optional[torch.Tensor] = None,
                       progress: bool = True, meta: Optional[dict] = None,
                       class_ordered: Optional[bool] = None,
                       read_at: Optional[Mapping[str, Tuple[str, str]]] = None) -> Statistics:
    """Run ``data`` through ``model`` (eval, no_grad) and gather ``kinds`` for ``layers``.

    ``read_at`` maps a layer to the (module, "output" | "input") whose tensor
    its statistics read (``sites.read_points``); by default the conv's output.

    ``data`` is an iterable of batches (a DataLoader) or an NNI Evaluator,
    whose training loop then only feeds batches (see ``drive_evaluator``).
    ``stop_batch`` bounds the batches of each pass. ``class_ordered`` (default:
    whether ``data`` is a DataLoader over a ``ClassShardSampler``) gathers GFI-AP
    in one class's memory, in one pass; otherwise GFI-AP sums that exceed
    ``memory_budget_gb`` are gathered over several passes, the loader's
    shuffling replayed so every pass sees the same images. Under
    torch.distributed the sums are all-reduced, so every rank gets the result
    of one process reading all shards.
    """
    kinds = list(dict.fromkeys(kinds))
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        raise StatisticsError(f"unknown statistics kinds {bad or kinds}; choose from {KINDS}")
    if stop_batch is not None and stop_batch < 1:
        raise StatisticsError(f"stop_batch must be at least 1, got {stop_batch}")
    modules = dict(model.named_modules())
    not_conv = [n for n in layers if not isinstance(modules.get(n), nn.Conv2d)]
    if not_conv or not layers:
        raise StatisticsError(f"layers must name Conv2d modules of the model; bad: {not_conv or 'none given'}")
    device = device or next(model.parameters()).device
    k = num_classes or infer_num_classes(model, dummy_input, data)
    needs_labels = bool(set(kinds) & {"cdp_class", "gfi"})
    ordered = is_class_ordered(data) if class_ordered is None else class_ordered

    was_training = model.training
    model.eval()
    try:
        gfi_passes = [[]]
        if "gfi" in kinds and ordered:
            gfi_passes = [list(layers)]
        elif "gfi" in kinds:
            shapes = _output_shapes(model, data, layers, device, dummy_input)
            gfi_passes = plan_gfi_passes(shapes, k, memory_budget_gb)
        rng = _RngReplay(data)
        result = None
        for i, gfi_layers in enumerate(gfi_passes):
            rng.restore()
            pass_kinds = [x for x in kinds if x != "gfi" or gfi_layers] if i == 0 else ["gfi"]
            acc = Accumulator(model, layers if i == 0 else gfi_layers, pass_kinds, gfi_layers, k, device, ordered,
                               read_at)
            try:
                counts, n_images = _run_pass(model, data, acc, stop_batch, device, needs_labels, k,
                                             progress, desc=f"statistics {i + 1}/{len(gfi_passes)}")
            finally:
                acc.close()
            if i == 0:
                result = _finish_first_pass(acc, layers, modules, counts, n_images, k, kinds, meta)
            if gfi_layers:
                result.gfi.update(acc.gfi.finish(result.class_counts))
    finally:
        model.train(was_training)
    _check_finite(result)
    return result


def _output_shapes(model, data, layers, device, dummy_input) -> Dict[str, List[int]]:
    """Per-layer output map shapes (C, H, W) from one image (the dummy, or the first batch)."""
    if dummy_input is None:
        if _is_evaluator(data):
            dummy_input = data.get_dummy_input()
        else:
            dummy_input, _ = _split_batch(next(iter(data)))
    if not torch.is_tensor(dummy_input):
        raise StatisticsError("GFI-AP statistics need a dummy input tensor to size their buffers")
    shapes, modules = {}, dict(model.named_modules())
    handles = [modules[n].register_forward_hook(
        lambda m, i, o, n=n: shapes.__setitem__(n, list(o.shape[1:]))) for n in layers]
    try:
        with torch.no_grad():
            model(dummy_input[:1].to(device))
    finally:
        for h in handles:
            h.remove()
    return shapes


class _RngReplay:
    """Remember the RNG states a shuffling DataLoader draws from, to replay the same order."""

    def __init__(self, loader):
        self.gen = getattr(loader, "generator", None)
        self.cpu = torch.get_rng_state()
        self.gen_state = self.gen.get_state() if self.gen is not None else None

    def restore(self):
        torch.set_rng_state(self.cpu)
        if self.gen is not None:
            self.gen.set_state(self.gen_state)


def _is_evaluator(data) -> bool:
    from nni.compression.utils.evaluator import Evaluator
    return isinstance(data, Evaluator)


def drive_evaluator(evaluator, model: nn.Module, step, max_steps: int) -> None:
    """Feed ``max_steps`` training batches of an NNI Evaluator to ``step(batch)``; nothing trains.

    The evaluator's own training loop runs, but its training step is replaced
    by one that hands the batch over (labels included, which hooks cannot
    see) and returns a zero loss, so no parameter ever gets a gradient.
    """
    if max_steps is None:
        raise StatisticsError("with an NNI evaluator, stop_batch (the number of batches to sample) is required")
    original = evaluator._training_step

    def training_step(batch, *_args, **_kwargs):
        step(batch)
        return torch.zeros((), requires_grad=True)

    if not evaluator._initialization_complete:  # as NNI's Compressor does for an evaluator it is handed
        evaluator._init_optimizer_helpers(model)
    evaluator.bind_model(model)
    evaluator._training_step = training_step
    try:
        evaluator.train(max_steps=max_steps)
    finally:
        evaluator._training_step = original
        evaluator.unbind_model()


def _run_pass(model, data, acc, stop_batch, device, needs_labels, k, progress, desc):
    counts = torch.zeros(k, dtype=torch.long, device=device)
    seen = {"images": 0, "batches": 0}
    bar = tqdm(total=_pass_length(data, stop_batch), desc=desc, disable=not progress, leave=False)

    def step(batch):
        x, y = _split_batch(batch)
        if y is None and needs_labels:
            raise StatisticsError("class-wise statistics need labels, but the loader yields inputs only "
                                  "(use cdp_mode='sample', which needs none)")
        if y is not None:
            if needs_labels:
                acc.gfi.begin_batch(y.long())
            y = y.to(device).long()
            if y.numel() and (int(y.min()) < 0 or int(y.max()) >= k):
                raise StatisticsError(f"label {int(y.max())} outside [0, {k}): pass the right num_classes")
            counts.add_(torch.bincount(y, minlength=k))
        acc.labels = y
        model.eval()  # an evaluator's training loop may have switched to train mode
        with torch.no_grad():
            model(x.to(device, non_blocking=True))
        seen["images"] += x.shape[0]
        seen["batches"] += 1
        bar.update(1)

    try:
        if _is_evaluator(data):
            drive_evaluator(data, model, step, stop_batch)
        else:
            for batch in data:
                if stop_batch is not None and seen["batches"] >= stop_batch:
                    break
                step(batch)
    finally:
        bar.close()
    if seen["batches"] == 0:
        raise StatisticsError("the loader yielded no batches: statistics need at least one")
    from ..distributed import all_reduce_sum_
    all_reduce_sum_(counts)
    n = torch.tensor([seen["images"]], device=device)
    all_reduce_sum_(n)
    for t in acc.cdp_class.values():
        all_reduce_sum_(t)
    return counts, int(n.item())


def _len_or_none(loader):
    try:
        return len(loader)
    except TypeError:
        return None


def _pass_length(data, stop_batch: Optional[int]) -> Optional[int]:
    """The batches a pass reads, for its progress bar: ``stop_batch``, or fewer when the data gives fewer."""
    available = None if _is_evaluator(data) else _len_or_none(data)
    if stop_batch is None or available is None:
        return stop_batch if stop_batch is not None else available
    return min(stop_batch, available)


def _finish_first_pass(acc, layers, modules, counts, n_images, k, kinds, meta) -> Statistics:
    sample = {}
    for name, parts in acc.cdp_sample.items():
        if parts:
            sample[name] = gather_rows(torch.cat(parts)).cpu()
    return Statistics(
        layers={n: list(modules[n].weight.shape) for n in layers}, num_classes=k,
        num_images=n_images, class_counts=counts.cpu(),
        cdp_class={n: t.cpu() for n, t in acc.cdp_class.items()}, cdp_sample=sample,
        meta={"kinds": list(kinds), **(meta or {})})


def _check_finite(stats: Statistics) -> None:
    for kind in KINDS:
        for name, t in getattr(stats, kind).items():
            if not torch.isfinite(t).all():
                raise StatisticsError(f"non-finite (NaN or inf) activations in layer {name!r}: "
                                      "check the model weights and the input data")

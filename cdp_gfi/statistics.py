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
  into passes.
"""
from __future__ import annotations

import bisect
import math
import os
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from tqdm.auto import tqdm

from .checkpoint import CheckpointError, UnsafeCheckpointError, load_checkpoint, save_atomic
from .data import is_class_ordered
from .fingerprint import check_fingerprint

FORMAT = "cdp_gfi.statistics/1"
KINDS = ("cdp_class", "cdp_sample", "gfi")


class StatisticsError(ValueError):
    """Statistics cannot be gathered, or do not belong to this model."""


@dataclass
class Statistics:
    """Sampled feature-map statistics of some convs of one model."""

    layers: Dict[str, List[int]]  # conv name -> weight shape
    num_classes: int
    num_images: int
    class_counts: torch.Tensor  # [K] images per class (zeros when unlabelled)
    cdp_class: Dict[str, torch.Tensor] = field(default_factory=dict)
    cdp_sample: Dict[str, torch.Tensor] = field(default_factory=dict)
    gfi: Dict[str, torch.Tensor] = field(default_factory=dict)
    meta: Dict[str, object] = field(default_factory=dict)

    def has(self, kind: str) -> bool:
        return bool(getattr(self, kind))

    def require(self, kind: str) -> None:
        """Raise unless statistics of ``kind`` were gathered."""
        if not self.has(kind):
            raise StatisticsError(
                f"these statistics hold no {kind!r} data (they hold {self.kinds()}); "
                f"gather them with kinds including {kind!r}")

    def kinds(self) -> List[str]:
        return [k for k in KINDS if self.has(k)]

    def save(self, path: str) -> None:
        """Write to ``path`` atomically (temp file, then rename)."""
        save_atomic({"format": FORMAT, **{k: _cpu(v) for k, v in self.__dict__.items()}}, path)

    @classmethod
    def load(cls, path: str, model: Optional[nn.Module] = None, fingerprint: Optional[Mapping[str, Any]] = None,
             hint: str = "") -> "Statistics":
        """Read a statistics file (weights_only: it runs no code); with ``model``, refuse one of another model,
        with ``fingerprint`` (`fingerprint.fingerprint`), one from other weights or sampling settings."""
        if not os.path.isfile(path):
            raise FileNotFoundError(f"statistics file not found: {path}")
        try:
            data = load_checkpoint(path)
        except UnsafeCheckpointError:
            raise
        except CheckpointError as exc:
            raise StatisticsError(f"{path} is not a readable statistics file: {exc}") from exc
        if not isinstance(data, dict) or data.pop("format", None) != FORMAT:
            raise StatisticsError(f"{path} is not a cdp_gfi statistics file (format {FORMAT})")
        stats = cls(**data)
        if fingerprint is not None:
            check_fingerprint(stats.meta.get("fingerprint"), fingerprint, f"statistics file {path!r}", hint)
        if model is not None:
            stats.check_model(model, source=path)
        return stats

    def check_model(self, model: Union[nn.Module, Mapping[str, nn.Module]], source: str = "statistics") -> None:
        """Raise unless every layer exists in ``model`` (or a name->module map) with the same weight shape."""
        modules = model if isinstance(model, Mapping) else dict(model.named_modules())
        problems = []
        for name, shape in self.layers.items():
            mod = modules.get(name)
            if not isinstance(mod, nn.Conv2d):
                problems.append(f"{name}: not a Conv2d of this model")
            elif list(mod.weight.shape) != list(shape):
                problems.append(f"{name}: weight {list(shape)} in file, {list(mod.weight.shape)} in model")
        if problems:
            more = f" (and {len(problems) - 8} more)" if len(problems) > 8 else ""
            raise StatisticsError(
                f"{source} does not match this model ({self.meta.get('model', 'unknown model')} "
                f"in file): " + "; ".join(problems[:8]) + more)

    def check_layers(self, names: Iterable[str]) -> None:
        """Raise unless statistics cover every conv in ``names``."""
        missing = [n for n in names if n not in self.layers]
        if missing:
            raise StatisticsError(f"statistics hold no data for layers {missing[:8]}; gather them for this layer set")


def _cpu(v):
    if torch.is_tensor(v):
        return v.detach().cpu()
    if isinstance(v, dict):
        return {k: _cpu(x) for k, x in v.items()}
    return v


def _split_batch(batch):
    """(inputs, labels or None) from a loader's batch: a tensor, or a (x, y, ...) sequence."""
    if torch.is_tensor(batch):
        return batch, None
    if isinstance(batch, (list, tuple)) and batch and torch.is_tensor(batch[0]):
        y = batch[1] if len(batch) > 1 and torch.is_tensor(batch[1]) else None
        return batch[0], y
    raise StatisticsError(f"cannot read inputs from a batch of type {type(batch).__name__}; "
                          "the loader must yield tensors or (inputs, labels) pairs")


def infer_num_classes(model: nn.Module) -> int:
    """Output width of the model's last Linear layer: its number of classes."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise StatisticsError("cannot infer the number of classes (no Linear layer); pass num_classes")
    return linears[-1].out_features


class _DenseGFI:
    """GFI-AP sums for a loader in any order: per-class map sums [K, C, H, W] per layer, reduced at the end."""

    def __init__(self, num_classes: int) -> None:
        self.k, self.sums = num_classes, {}

    def begin_batch(self, labels: torch.Tensor) -> None:
        """Nothing to do: any order is fine."""

    def add(self, name: str, out: torch.Tensor, labels: torch.Tensor) -> None:
        if name not in self.sums:
            self.sums[name] = torch.zeros(self.k, *out.shape[1:], device=out.device)
        self.sums[name].index_add_(0, labels, out)

    def finish(self, counts: torch.Tensor) -> Dict[str, torch.Tensor]:
        """S per layer, [K, C], from every process's sums (``counts``: all processes' images per class)."""
        from .distributed import all_reduce_sum_
        for name in sorted(self.sums):
            all_reduce_sum_(self.sums[name])
        return _gfi_from_sums(self.sums, counts)


class _ClassOrderedGFI:
    """GFI-AP for a class-ordered loader: map sums only for the classes in flight, each reduced to its row
    of S [K, C] as soon as a later class shows up. Under torch.distributed each process reads whole classes.

    A batch's class sums are one matrix product (class membership [m, n] @ maps [n, C*H*W]), the
    fastest reduction measured (8x an index_add_, 12x per-class sums, on 2 CPU cores), and closing
    classes is one norm per layer: the per-class ops of the first version cost 1.5x a plain forward.
    """

    def __init__(self, num_classes: int) -> None:
        self.k, self.scores = num_classes, {}
        self.open: Dict[str, Tuple[List[int], torch.Tensor]] = {}  # layer: (classes in flight, their map sums)
        self.counts = torch.zeros(num_classes, dtype=torch.long)  # this process's images per class
        self.last = -1
        self.batch_classes: List[int] = []
        self.membership = torch.zeros(0, 0)  # [classes in the batch, images]: 1 where the image is of the class

    def begin_batch(self, labels: torch.Tensor) -> None:
        """Check the order, close the classes that can get no more images, count this batch's."""
        labels = labels.cpu()
        self.batch_classes = []
        if not labels.numel():
            return
        if int(labels[0]) < self.last or bool((labels[1:] < labels[:-1]).any()):
            raise StatisticsError(f"the loader is not in class order: class {int(labels.min())} came after class "
                                  f"{max(self.last, int(labels.max()))}; class-ordered GFI-AP statistics need a "
                                  "ClassShardSampler (pass class_ordered=False for any other order)")
        self._close(below=int(labels[0]))
        self.last = int(labels[-1])
        self.counts += torch.bincount(labels, minlength=self.k)
        classes, inverse = torch.unique_consecutive(labels, return_inverse=True)
        self.batch_classes = classes.tolist()
        self.membership = torch.nn.functional.one_hot(inverse, len(classes)).T.float()

    def add(self, name: str, out: torch.Tensor, labels: torch.Tensor) -> None:
        if not self.batch_classes:
            return
        membership = self.membership.to(device=out.device, dtype=out.dtype)
        sums = (membership @ out.reshape(out.shape[0], -1)).view(len(self.batch_classes), *out.shape[1:])
        classes, running = self.open.get(name, ([], None))
        new = self.batch_classes
        if classes and classes[-1] == new[0]:  # the class carried over from the last batch
            running[-1].add_(sums[0])
            sums, new = sums[1:], new[1:]
        if new:
            running = sums if running is None or not classes else torch.cat([running, sums])
            classes = classes + new
        self.open[name] = (classes, running)

    def _close(self, below: int) -> None:
        for name, (classes, running) in self.open.items():
            done = bisect.bisect_left(classes, below)  # classes in flight are sorted
            if not done:
                continue
            if name not in self.scores:
                self.scores[name] = torch.zeros(self.k, running.shape[1], device=running.device)
            # mean_hw |sum / n| in one pass over the maps: the L1 norm over (H, W), scaled
            n = self.counts[classes[:done]].to(running.device) * (running.shape[2] * running.shape[3])
            self.scores[name][classes[:done]] = torch.linalg.vector_norm(running[:done], ord=1, dim=(2, 3)) / n[:, None]
            self.open[name] = (classes[done:], running[done:])  # a view: freed at the next concatenation

    def finish(self, counts: torch.Tensor) -> Dict[str, torch.Tensor]:
        """S per layer, [K, C]: this process's classes, summed with the other processes' (disjoint) ones."""
        from .distributed import all_reduce_sum_
        self._close(below=self.k)
        device = next(iter(self.scores.values())).device if self.scores else counts.device
        readers = (self.counts > 0).long().to(device)
        all_reduce_sum_(readers)
        if bool((readers > 1).any()):
            split = torch.nonzero(readers > 1).flatten().tolist()
            raise StatisticsError(f"classes {split[:8]} were read by several processes; class-ordered GFI-AP "
                                  "needs whole classes per process (ClassShardSampler)")
        for name in sorted(self.scores):
            all_reduce_sum_(self.scores[name])
        return {name: t.cpu() for name, t in self.scores.items()}


class _Accumulator:
    """Forward hooks that add one layer set's outputs into running sums."""

    def __init__(self, model, layers, kinds, gfi_layers, num_classes, device, class_ordered=False, read_at=None):
        self.kinds, self.gfi_layers, self.k = set(kinds), set(gfi_layers), num_classes
        self.labels: Optional[torch.Tensor] = None
        self.cdp_class, self.cdp_sample = {}, {n: [] for n in layers}
        self.gfi = _ClassOrderedGFI(num_classes) if class_ordered else _DenseGFI(num_classes)
        self.device = device
        modules = dict(model.named_modules())
        self.handles = []
        for n in layers:
            module_name, where = (read_at or {}).get(n, (n, "output"))
            channels = modules[n].out_channels
            if where == "input":
                hook = self._hook(n, channels)
                self.handles.append(modules[module_name].register_forward_pre_hook(
                    lambda m, inputs, hook=hook: hook(m, None, inputs[0])))
            else:
                self.handles.append(modules[module_name].register_forward_hook(self._hook(n, channels)))

    def _hook(self, name, channels):
        def hook(_module, _inputs, out):
            out = out.detach().float()
            if out.dim() == 2:  # a linear's flattened input: channel-major positions
                out = out.view(out.shape[0], channels, -1, 1)
            if self.kinds & {"cdp_class", "cdp_sample"}:
                a = out.clamp_min(0).mean(dim=(2, 3))
                if "cdp_class" in self.kinds:
                    if name not in self.cdp_class:
                        self.cdp_class[name] = torch.zeros(self.k, a.shape[1], device=a.device)
                    self.cdp_class[name].index_add_(0, self.labels, a)
                if "cdp_sample" in self.kinds:
                    self.cdp_sample[name].append(a)
            if name in self.gfi_layers:
                self.gfi.add(name, out, self.labels)
        return hook

    def close(self):
        for h in self.handles:
            h.remove()


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
    k = num_classes or infer_num_classes(model)
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
            acc = _Accumulator(model, layers if i == 0 else gfi_layers, pass_kinds, gfi_layers, k, device, ordered,
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
    bar = tqdm(total=stop_batch if stop_batch is not None else _len_or_none(data),
               desc=desc, disable=not progress, leave=False)

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
    from .distributed import all_reduce_sum_
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


def _finish_first_pass(acc, layers, modules, counts, n_images, k, kinds, meta) -> Statistics:
    sample = {}
    for name, parts in acc.cdp_sample.items():
        if parts:
            sample[name] = _gather_rows(torch.cat(parts)).cpu()
    return Statistics(
        layers={n: list(modules[n].weight.shape) for n in layers}, num_classes=k,
        num_images=n_images, class_counts=counts.cpu(),
        cdp_class={n: t.cpu() for n, t in acc.cdp_class.items()}, cdp_sample=sample,
        meta={"kinds": list(kinds), **(meta or {})})


def _gather_rows(t: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's per-image rows (identity outside torch.distributed)."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return t
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, t.cpu())
    return torch.cat(parts)


def _gfi_from_sums(sums: Dict[str, torch.Tensor], counts: torch.Tensor) -> Dict[str, torch.Tensor]:
    """S_c(l,k) = mean_hw |class-mean map|, [K, C]; zero rows for classes not sampled."""
    out = {}
    for name, s in sums.items():  # in place: these buffers are the pass's largest, and done with
        denom = counts.to(s.device).clamp_min(1).float().view(-1, 1, 1, 1)
        out[name] = s.div_(denom).abs_().mean(dim=(2, 3)).cpu()
    return out


def _check_finite(stats: Statistics) -> None:
    for kind in KINDS:
        for name, t in getattr(stats, kind).items():
            if not torch.isfinite(t).all():
                raise StatisticsError(f"non-finite (NaN or inf) activations in layer {name!r}: "
                                      "check the model weights and the input data")

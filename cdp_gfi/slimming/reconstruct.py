"""Reconstruction after slimming: refit slim layers by least squares so their outputs match the dense net's.

Which layers (``layers``): ``"downstream"`` (the default) refits every conv
(groups 1) and linear layer from the first one that reads a pruned conv to the
end of the forward pass, so later layers also undo the error the earlier ones
pass on; ``"readers"`` refits only the layers whose input lost channels. In the
order the forward pass reaches them, each layer's inputs in the slim network
(earlier refits included) and the dense layer's outputs on the same images are
gathered over a sample, and its weights (and bias) are solved by least squares
with a ridge towards the weights it has: W = (X^T X + lambda I)^-1 (X^T Y +
lambda W0), lambda = ridge x mean(diag X^T X), in float64, so a layer whose
inputs did not change keeps its weights. A layer with fewer sampled rows than
unknowns is left as it was, with a warning.
"""
from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..masks.masked import Masks

DEFAULT_RIDGE = 1e-3
DEFAULT_BATCHES = 4
LAYERS = ("downstream", "readers")


class _Stop(Exception):
    """Raised by a hook once it has what it needs: the rest of the forward pass is not run."""


def _call_order(model: nn.Module, images: Tensor) -> List[str]:
    """Names of ``model``'s modules in the order one forward pass of ``images`` calls them."""
    order: List[str] = []
    handles = [m.register_forward_hook(lambda *_, name=name: order.append(name)) for name, m in model.named_modules()]
    try:
        model(images)
    finally:
        for handle in handles:
            handle.remove()
    return order


def _targets(dense: nn.Module, slim: nn.Module, probe: Tensor, layers: str) -> List[str]:
    """Names of the slim conv (groups 1) / linear layers to refit, in the order a forward pass calls them: those
    with fewer input channels than their dense twins, and with ``"downstream"`` every one called after the first
    of them too; grouped convs are skipped, with a warning where one reads a pruned conv."""
    dense_modules = dict(dense.named_modules())
    twins = {name: m for name, m in slim.named_modules()
             if isinstance(m, (nn.Conv2d, nn.Linear)) and name in dense_modules}
    readers = {name for name, m in twins.items() if m.weight.shape[1] < dense_modules[name].weight.shape[1]}
    order = {name: i for i, name in reversed(list(enumerate(_call_order(slim, probe))))}
    first = min((order.get(name, len(order)) for name in readers), default=len(order))
    chosen = readers if layers == "readers" else {n for n in twins if first <= order.get(n, -1)} | readers
    for name in sorted(readers):
        if isinstance(twins[name], nn.Conv2d) and twins[name].groups != 1:
            warnings.warn(f"reconstruct: {name} is a grouped conv; left as it was", stacklevel=3)
    return sorted((n for n in chosen if not (isinstance(twins[n], nn.Conv2d) and twins[n].groups != 1)),
                  key=lambda n: order.get(n, len(order)))


def _capture(model: nn.Module, module: nn.Module, images: Tensor, output: bool) -> Tensor:
    """The input (or output) of ``module`` when ``model`` sees ``images``; the forward stops there."""
    box: List[Tensor] = []

    def hook(_, inputs, out):
        box.append((out if output else inputs[0]).detach())
        raise _Stop

    handle = module.register_forward_hook(hook)
    try:
        model(images)
    except _Stop:
        pass
    finally:
        handle.remove()
    if not box:
        raise RuntimeError("reconstruct: the forward pass never reached the layer")
    return box[0]


def _rows(layer: nn.Module, x: Tensor, y: Tensor) -> Tuple[Tensor, Tensor]:
    """(inputs as rows of the layer's unknowns [n, d], targets [n, out]); a ones column when the layer has a bias."""
    if isinstance(layer, nn.Conv2d):
        cols = F.unfold(x, layer.kernel_size, layer.dilation, layer.padding, layer.stride)  # [N, d, L]
        xs = cols.transpose(1, 2).reshape(-1, cols.shape[1])
        ys = y.flatten(2).transpose(1, 2).reshape(-1, y.shape[1])
    else:
        xs, ys = x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])
    if layer.bias is not None:
        xs = torch.cat([xs, xs.new_ones(xs.shape[0], 1)], dim=1)
    return xs.double(), ys.double()


def _kept_outputs(masks: Masks, name: str, width: int) -> Tensor:
    """Indices of the dense layer's outputs the slim one kept: a layer of the residual stream (scope "all") loses
    outputs as well as inputs."""
    weight = masks.get(name, {}).get("weight")
    if weight is None:
        return torch.arange(width)
    kept = weight.flatten(1).any(1).nonzero().flatten()
    if kept.numel() != width:
        raise RuntimeError(f"reconstruct: {name} keeps {kept.numel()} filters in its mask but has {width}")
    return kept


@torch.no_grad()
def reconstruct(dense: nn.Module, slim: nn.Module, masks: Masks, loader: Iterable,
                batches: Optional[int] = DEFAULT_BATCHES, ridge: float = DEFAULT_RIDGE,
                layers: str = "downstream") -> List[str]:
    """Refit, in place, the ``layers`` (see the module's docstring) of ``slim`` once ``masks`` pruned a conv;
    returns the names refitted.

    Inputs come from ``loader`` (images, labels) batches, at most ``batches`` of them; both networks run in eval mode.
    """
    if layers not in LAYERS:
        raise ValueError(f"reconstruct: layers must be one of {', '.join(LAYERS)}, got {layers!r}")
    if not any(not bool(m["weight"].all()) for m in masks.values() if m.get("weight") is not None):
        return []
    was_training = slim.training
    dense.eval(), slim.eval()
    device = next(slim.parameters()).device
    images = [b[0].to(device) for b, _ in zip(loader, range(batches if batches is not None else 1 << 62))]
    dense_modules, slim_modules = dict(dense.named_modules()), dict(slim.named_modules())
    refitted = []
    for name in _targets(dense, slim, images[0][:1], layers):
        layer = slim_modules[name]
        d = layer.weight[0].numel() + (layer.bias is not None)
        gram = torch.zeros(d, d, dtype=torch.float64, device=device)
        cross = torch.zeros(d, layer.weight.shape[0], dtype=torch.float64, device=device)
        rows, kept = 0, _kept_outputs(masks, name, layer.weight.shape[0])
        for batch in images:
            xs, ys = _rows(layer, _capture(slim, layer, batch, output=False),
                           _capture(dense, dense_modules[name], batch, output=True)[:, kept])
            gram += xs.T @ xs
            cross += xs.T @ ys
            rows += xs.shape[0]
        if rows < d:
            warnings.warn(f"reconstruct: {name} has {d} unknowns per output but the sample gives {rows} rows; "
                          "left as it was (sample more images)", stacklevel=2)
            continue
        lam = ridge * gram.diagonal().mean().clamp_min(1e-12)
        current = layer.weight.reshape(layer.weight.shape[0], -1)
        if layer.bias is not None:
            current = torch.cat([current, layer.bias[:, None]], dim=1)
        solved = torch.linalg.solve(gram + lam * torch.eye(d, dtype=gram.dtype, device=device),
                                    cross + lam * current.T.double()).T
        if layer.bias is not None:
            layer.bias.copy_(solved[:, -1].to(layer.bias.dtype))
            solved = solved[:, :-1]
        layer.weight.copy_(solved.reshape(layer.weight.shape).to(layer.weight.dtype))
        refitted.append(name)
    slim.train(was_training)
    return refitted


def output_error(dense: nn.Module, slim: nn.Module, name: str, loader: Iterable,
                 batches: Optional[int] = DEFAULT_BATCHES) -> float:
    """Mean squared difference between layer ``name``'s outputs in ``slim`` and ``dense`` over the sample."""
    dense.eval(), slim.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for batch, _ in zip(loader, range(batches if batches is not None else 1 << 62)):
            a = _capture(slim, dict(slim.named_modules())[name], batch[0], output=True)
            b = _capture(dense, dict(dense.named_modules())[name], batch[0], output=True)
            total += float((a - b).pow(2).sum())
            count += a.numel()
    return total / count


"""Helpers shared by the graph, slimming, coverage and script tests."""
import torch
from torch import nn


def randomized_bn(model: nn.Module) -> nn.Module:
    """``model`` in eval mode with every BatchNorm's statistics and affine terms drawn at random.

    Fresh BatchNorms are the identity; random ones make a pruned channel's shift show in the outputs
    if its BatchNorm were left unmasked, or a slimmed one sliced wrong.
    """
    for mod in model.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.1, 0.1)
            mod.running_var.uniform_(0.5, 1.5)
            mod.weight.data.uniform_(0.5, 1.5)
            mod.bias.data.uniform_(-0.1, 0.1)
    return model.eval()


class MacTimer:
    """A deterministic latency timer for scripts' latency targets: 1 ns per MAC of the convs and linears a call runs."""

    name = "macs"

    def __call__(self, module: nn.Module, x: torch.Tensor) -> float:
        total = []

        def hook(mod, _, out):
            total.append(mod.weight.numel() * out.shape[0] * (out.shape[2] * out.shape[3] if out.dim() == 4 else 1))

        handles = [m.register_forward_hook(hook) for m in module.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
        with torch.no_grad():
            module(x)
        for h in handles:
            h.remove()
        return 1e-9 * sum(total)

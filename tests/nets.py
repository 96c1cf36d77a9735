"""Helpers shared by the graph, slimming and coverage tests."""
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

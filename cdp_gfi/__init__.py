"""cdp_gfi: CDP and GFI-AP filter pruning on NNI 3.0, with physical slimming.

The public API: build a model, gather statistics, score filters, select
masks, slim, refit the slim network towards the dense one, count FLOPs, or do
it all through the NNI pruner classes.
"""
from . import _quiet  # noqa: F401  (first: filters third-party noise before NNI loads)
from .files.pretrained import load_pretrained
from .flops import count_flops, layer_table
from .graph.scope import default_scope
from .pruners import CDPPruner, GFIPruner
from .masks.select import LayerEmptiedError, apply_masks, select, to_nni_masks
from .models import build_model
from .scores.importance import cdp_scores, compute_scores, gfi_scores, scores_from_statistics
from .slimming.reconstruct import reconstruct
from .slimming.slim_files import load_slim
from .slimming.speedup import slim
from .statistics.collect import collect_statistics
from .statistics.store import Statistics, StatisticsError
from .train.recalibrate import recalibrate_batchnorm

__all__ = [
    "CDPPruner", "GFIPruner", "Statistics", "StatisticsError", "LayerEmptiedError",
    "apply_masks", "build_model", "cdp_scores", "collect_statistics", "compute_scores", "count_flops",
    "default_scope", "gfi_scores", "layer_table", "load_pretrained", "load_slim", "recalibrate_batchnorm",
    "reconstruct",
    "scores_from_statistics", "select", "slim", "to_nni_masks",
]


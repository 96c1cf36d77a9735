"""What the scripts share: the criterion flags, and how bad input is reported (one `error:` line, exit 2)."""
from __future__ import annotations

import argparse

from .checkpoint import CheckpointError
from .masks import RULES
from .ranking import NORMALIZATIONS
from .sites import SITES

USER_ERRORS = (ValueError, OSError, CheckpointError, FloatingPointError)


def add_criterion_arguments(parser: argparse.ArgumentParser) -> None:
    """--method, --scope, --round_to, --cdp_mode, --coe and the variant flags, worded the same in every script."""
    a = parser.add_argument
    a("--method", choices=("cdp", "gfi"), default="cdp", help="CDP (class-wise TF-IDF) or GFI-AP (default cdp)")
    a("--scope", choices=("internal", "all"), default="internal",
      help="prune block-internal convs (the papers', default) or all, residual streams as coupled groups")
    a("--round_to", type=int, metavar="N", help="keep a multiple of N filters (or groups) per layer or unit")
    a("--cdp_mode", choices=("classwise", "sample"),
      help="CDP documents: classes (the paper's) or images (the authors' code; our default)")
    a("--coe", type=float, help="CDP layer rescaling b = 1 + ln(C / coe); 0 or unset: b = 1")
    a("--published", action="store_true",
      help="the papers' own definitions (site conv, normalize none, cost_power 0) instead of our defaults")
    a("--site", choices=SITES, help="where feature maps are read: conv (the papers'), bn (after the BatchNorm) "
                                    "or input (what the next layer reads); default per method, see README")
    a("--normalize", choices=NORMALIZATIONS,
      help="rescale each layer's scores before the global ranking: none (the papers'), mean, max, rank")
    a("--cost_power", type=float, metavar="P",
      help="divide scores by (MACs of one filter / mean)^P: expensive filters must earn their place (papers: 0)")
    a("--max_layer_sparsity", type=float, metavar="F",
      help="most of its filters one layer may lose (default: 0.6 for CDP; GFI-AP's (1+p)/2 for the adaptive rule)")
    a("--rule", choices=RULES, help="selection: global (one ranking, CDP's) or adaptive (GFI-AP's threshold with "
                                    "its per-layer cap (1+p)/2; our default for both)")


def add_recalibration_argument(parser: argparse.ArgumentParser) -> None:
    """--bn_recalibrate N: BatchNorm re-estimation after pruning, worded the same in every script."""
    parser.add_argument("--bn_recalibrate", type=int, metavar="N",
                        help="re-estimate BatchNorm statistics of the pruned network on N batches of un-augmented "
                             "training images (default 20, or all of a smaller training set; 0 turns it off)")


def one_line(err: BaseException) -> str:
    """An error message on one line; a DataLoader worker's wrapped traceback reduced to its last line."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].startswith("Caught "):
        return lines[-1]
    text = lines[0] if lines else type(err).__name__
    for line in lines[1:]:
        text += (" " if text.endswith(":") else ", ") + line
    return text

"""What the scripts share: the criterion flags, and how bad input is reported (one `error:` line, exit 2)."""
from __future__ import annotations

import argparse
import sys
from typing import Any, Callable, NoReturn

from ..distributed import DEFAULT_TIMEOUT_S, RankError, cleanup, is_distributed, launched_rank, peer_failure
from ..files.checkpoint import CheckpointError
from ..graph.sites import SITES
from ..latency.select import ORDERS
from ..masks.select import RULES
from ..models import IMAGENET_MODELS, check_model_name
from ..scores.ranking import NORMALIZATIONS
from ..slimming.reconstruct import DEFAULT_BATCHES as RECONSTRUCT_BATCHES, LAYERS as RECONSTRUCT_LAYERS
from ..train.distill import DEFAULT_TEMPERATURE, DEFAULT_WEIGHT
from .spellings import BothSpellingsParser

USER_ERRORS = (ValueError, OSError, CheckpointError, FloatingPointError)


class OneLineParser(BothSpellingsParser):
    """An argument parser that reports bad input as one `error:` line (exit status 2), once under torchrun, and
    takes both spellings of a multi-word flag (``--batch_size``, ``--batch-size``)."""

    def error(self, message: str) -> NoReturn:
        """Print `error: message` (rank 0 only: every rank parses the same command line) and exit 2."""
        self.exit(2, f"error: {message}\n" if launched_rank() == 0 else None)


def add_distributed_argument(parser: argparse.ArgumentParser) -> None:
    """--dist_timeout: how long a torchrun process waits for the others, worded the same in every script."""
    parser.add_argument("--dist_timeout", type=float, default=DEFAULT_TIMEOUT_S, metavar="SECONDS",
                        help="under torchrun: seconds a process waits for the others in a collective before the "
                             f"whole job stops with an error (default {DEFAULT_TIMEOUT_S:.0f}; longer than the "
                             "slowest step one rank does alone, such as rank 0 writing a checkpoint)")


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
      help="the papers' own definitions (site conv, normalize none, cost_power 0, weight_power 0) instead of our "
           "defaults")
    a("--site", choices=SITES, help="where feature maps are read: conv (the papers'), bn (after the BatchNorm) "
                                    "or input (what the next layer reads); default per method, see README")
    a("--normalize", choices=NORMALIZATIONS,
      help="rescale each layer's scores before the global ranking: none (the papers'), mean, max, rank")
    a("--cost_power", type=float, metavar="P",
      help="divide scores by (MACs of one filter / mean)^P: expensive filters must earn their place (papers: 0)")
    a("--weight_power", type=float, metavar="Q",
      help="multiply scores by (norm of the filter x norm of the weights reading its channel)^Q: a channel made "
           "and read by small weights moves the next layer little (papers: 0; default per method, see README)")
    a("--max_layer_sparsity", type=float, metavar="F",
      help="most of its filters one layer may lose (default: 0.6 for CDP; GFI-AP's (1+p)/2 for the adaptive and threshold rules)")
    a("--rule", choices=RULES, help="selection: global (one ranking, CDP's), adaptive (the same ranking with "
                                    "GFI-AP's per-layer cap (1+p)/2; our default for both) or threshold (the GFI-AP "
                                    "paper's: every filter at or below its threshold, ties included)")


def add_latency_arguments(parser: argparse.ArgumentParser, default_device: str,
                          targets: Callable[[str], Any] = str) -> None:
    """--latency_reduction (parsed by ``targets``, as the script parses its other targets), --latency_device and
    --latency_batch, worded the same in every script."""
    a = parser.add_argument
    a("--latency_reduction", type=targets, metavar="R",
      help="fraction of the dense network's latency to remove, as measured on --latency_device at --latency_batch "
           "(instead of --sparsity or --flops_reduction; a list such as 0.3,0.4 sweeps them)")
    a("--latency_device", metavar="DEVICE",
      help=f"cpu, cuda or cuda:N: where latency is measured, for the target and the reports (default: "
           f"{default_device})")
    a("--latency_batch", type=int, default=1, metavar="N",
      help="batch size of the latency target (default 1); reports give batch 1 and the run's batch size")
    a("--latency_order", choices=ORDERS, default="auto",
      help="how a latency target spends its budget: ranking (the criterion's ranking as a MACs target ranks, cut "
           "where the measured latency falls enough; as accurate as a MACs target where latency follows MACs), "
           "greedy (least score lost per measured second saved; reaches more where latency does not follow MACs, "
           "e.g. MobileNets at batch 1) or auto (default: greedy for networks with depthwise convs or where only it "
           "reaches the target, else ranking)")
    a("--latency_amp", action="store_true",
      help="time under torch.autocast (float16 on CUDA, bfloat16 on the CPU), for the target and the reports")
    a("--latency_channels_last", action="store_true",
      help="time networks and inputs in channels-last memory format, for the target and the reports")


def add_recalibration_argument(parser: argparse.ArgumentParser) -> None:
    """--bn_recalibrate N: BatchNorm re-estimation after pruning, worded the same in every script."""
    parser.add_argument("--bn_recalibrate", type=int, metavar="N",
                        help="re-estimate BatchNorm statistics of the pruned network on N batches of un-augmented "
                             "training images (default 20, or all of a smaller training set; 0 turns it off)")


def add_recovery_arguments(parser: argparse.ArgumentParser, reconstruct: bool = True,
                           on_by_default: bool = False) -> None:
    """--reconstruct and --distill (with its temperature and weight), worded the same in every script.

    ``on_by_default``: both are on unless ``--published`` (the CIFAR run, where the dense teacher is at hand);
    ``--no_reconstruct`` / ``--no_distill`` turn them off.
    """
    a = parser.add_argument
    flag = dict(action="store_const", const=True, default=None) if on_by_default else dict(action="store_true")
    default = " (default: on, off with --published)" if on_by_default else ""
    if reconstruct:
        a("--reconstruct", **flag,
          help="after pruning, refit layers by least squares on sampled training images so their outputs match "
               f"the dense network's{default}")
        a("--reconstruct_layers", choices=RECONSTRUCT_LAYERS, default="downstream",
          help="which layers --reconstruct refits: every conv and linear layer from the first that reads a pruned "
               "conv on (downstream, the default), or only those reading a pruned conv (readers)")
        a("--reconstruct_batches", type=int, default=RECONSTRUCT_BATCHES, metavar="N",
          help=f"batches of training images --reconstruct fits on (default {RECONSTRUCT_BATCHES}; 16 gained 0.2-1.6 "
               "points before fine-tuning on the CIFAR ResNets, for 4x its time)")
    a("--distill", **flag, help=f"fine-tune with the dense network as teacher (knowledge distillation){default}")
    if on_by_default:
        for name in ("reconstruct", "distill")[0 if reconstruct else 1:]:
            a(f"--no_{name}", dest=name, action="store_const", const=False, help=f"turn --{name} off")
    a("--distill_temperature", type=float, default=DEFAULT_TEMPERATURE, metavar="T",
      help=f"softmax temperature of --distill (default {DEFAULT_TEMPERATURE:g})")
    a("--distill_weight", type=float, default=DEFAULT_WEIGHT, metavar="W",
      help=f"loss = (1 - W) x cross entropy + W x T^2 x KL to the teacher (default {DEFAULT_WEIGHT:g})")


def one_line(err: BaseException) -> str:
    """An error message on one line; a DataLoader worker's wrapped traceback reduced to its last line."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].startswith("Caught "):
        return lines[-1]
    text = lines[0] if lines else type(err).__name__
    for line in lines[1:]:
        text += (" " if text.endswith(":") else ", ") + line
    return text


def exit_status(work: Callable[[], object]) -> int:
    """Run a script's work and return its exit status: 0, 2 for bad input, 1 when another torchrun rank failed.

    Prints one `error:` line. Under torchrun an error every rank agreed on is
    printed by rank 0 alone, one found by a single rank mid-run by that rank
    (named), and a lost or silent peer by each rank still running.
    """
    try:
        work()
    except RankError as err:
        if err.report:
            print(f"error: {one_line(err)}", file=sys.stderr)
        return 2
    except USER_ERRORS as err:
        if is_distributed():
            print(f"error: rank {launched_rank()}: {one_line(err)}", file=sys.stderr)
        elif launched_rank() == 0:  # before the group is joined, every rank checks the same command line
            print(f"error: {one_line(err)}", file=sys.stderr)
        return 2
    except RuntimeError as err:
        peer = peer_failure(err)
        if peer is None:
            raise
        print(f"error: {one_line(peer)}", file=sys.stderr)
        return 1
    cleanup()
    return 0


def imagenet_model(name: str) -> str:
    """argparse type of ``--model`` in the ImageNet stages: a torchvision CNN name or ``timm:NAME``."""
    try:
        return check_model_name(name, "imagenet")
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err).replace(f"{list(IMAGENET_MODELS)}", "torchvision.models' "
                                                          "classification CNNs")) from err

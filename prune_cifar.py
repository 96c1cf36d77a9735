"""Prune a pretrained CIFAR (or the bundled digits) network with CDP or GFI-AP, slim it, fine-tune it, measure it.

    python prune_cifar.py --dataset digits        # the demo: trains its own baseline, 8 minutes on 2 busy cores
    python prune_cifar.py --model resnet56 --pretrained_dir ckpt/base/resnet56.pth --dataroot /data/cifar10 \\
        --sparsity 0.5                            # the CDP README's command, with CDP's class-wise scores
    python prune_cifar.py --dataset digits --sparsity 0.3,0.4,0.5,0.6   # a sweep: sweep.csv and sweep.png
"""
import argparse
import logging
import sys
from pathlib import Path
from typing import List, Optional, Sequence, Union

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run from a checkout without installing

from cdp_gfi.runs.cli import (  # noqa: E402
    OneLineParser, add_criterion_arguments, add_latency_arguments, add_recalibration_argument, add_recovery_arguments,
    exit_status)
from cdp_gfi.models import CIFAR_MODELS  # noqa: E402
from cdp_gfi.runs.cifar_config import DATASETS, DIGITS_FLOPS_REDUCTION, SCHEDULES, PruneConfig  # noqa: E402
from cdp_gfi.runs.cifar import claim_folder, run  # noqa: E402
from cdp_gfi.runs.sweep import sweep  # noqa: E402



def targets(text: str) -> Union[float, List[float]]:
    """One target (a float), or a comma-separated list of them for a sweep."""
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or a comma-separated list of numbers, got {text!r}")
    return values[0] if len(values) == 1 else values


def build_parser() -> argparse.ArgumentParser:
    """The command line: the CDP README's flags plus GFI-AP, FLOPs targets, fine-tuning and resuming."""
    p = OneLineParser(description="Prune a CIFAR/digits CNN with CDP or GFI-AP into a slim, fine-tuned "
                                  "network; report accuracy, MACs and parameters before and after.")
    a = p.add_argument
    a("--model", choices=CIFAR_MODELS, help="architecture (default resnet20)")
    a("--dataset", choices=DATASETS, default="cifar10", help="data set (default cifar10; digits: the built-in demo)")
    a("--dataroot", help="folder holding cifar-10-batches-py/ (or cifar-100-python/); unused for digits")
    a("--download", action="store_true", help="download CIFAR into --dataroot if missing (never by default)")
    a("--no_integrity_check", dest="integrity_check", action="store_false",
      help="skip the md5 check of the CIFAR files against the official release (re-packed copies)")
    a("--pretrained_dir", help="pretrained checkpoint: ours, torchvision's, pytorch_resnet_cifar10's or the CDP "
                               "authors' layout (nested or bare, 'module.' ok); loaded strictly")
    a("--train_baseline", action="store_true", help="train a baseline first when you have none (cached)")
    a("--baseline_epochs", type=int, help="epochs of baseline training, lr 0.1 cosine (default 200; digits 6)")
    a("--baseline_dir", default="ckpt/base", help="cache of trained baselines (default ckpt/base)")
    add_criterion_arguments(p)
    a("--sparsity", type=targets, help="fraction of prunable filters to remove (give this, --flops_reduction or "
                                       "--latency_reduction); "
                                       "a list such as 0.3,0.4,0.5 sweeps them from one statistics pass")
    a("--flops_reduction", type=targets, help="fraction of MACs to remove instead of --sparsity, or a list of them "
                                              f"(digits default {DIGITS_FLOPS_REDUCTION} when neither is given)")
    a("--flops_convention", choices=("conv-linear", "ptflops"), default="conv-linear",
      help="MACs convention of --flops_reduction: conv+linear (CDP, default) or ptflops (GFI-AP)")
    add_latency_arguments(p, "the run's device", targets)
    a("--stop_batch", type=int, help="batches of training images sampled for statistics (default 200)")
    a("--statistics_file", help="statistics to reuse if the file exists, else where to write them")
    a("--batch_size", type=int, help="batch size for statistics, fine-tuning and testing (default 128; digits 64)")
    a("--epochs", type=int, help="fine-tuning epochs (default 300 cosine, 80 step; digits 6)")
    a("--lr", type=float, help="fine-tuning learning rate (default 0.01 cosine, 0.08 step)")
    a("--momentum", type=float, default=0.9, help="SGD Nesterov momentum (default 0.9)")
    a("--wd", type=float, default=5e-4, help="weight decay (default 5e-4)")
    a("--schedule", choices=SCHEDULES, default="cosine",
      help="learning-rate schedule: cosine (default) or GFI-AP's step (lr / 1.8 every 8 epochs)")
    a("--layerwise_retrain", type=int, default=0, metavar="N",
      help="GFI-AP: prune layer by layer, N epochs of training after each (default 0: one shot)")
    add_recalibration_argument(p)
    add_recovery_arguments(p, on_by_default=True)
    a("--seed", type=int, default=0, help="seed of sampling, training and the digits split (default 0)")
    a("--save_dir", help="run folder (default runs/<dataset>_<model>_<method>_seed<seed>, or its next free name "
                         "...-2, -3 when it holds another run); a folder holding another run is refused")
    a("--resume", action="store_true", help="continue the interrupted run in --save_dir (same arguments); the only "
                                            "way to write into a folder that holds a run")
    a("--device", help="cpu, cuda or cuda:N (default: cuda if available)")
    a("--gpus", help="GPU index to use, e.g. 0 (a list uses its first; several GPUs need torchrun)")
    a("-j", "--workers", type=int, help="data loader worker processes (default 4; digits 0)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line; 0 on success, 2 with one `error:` line for bad input, 130 on Ctrl-C."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    sweep_key = next((k for k in ("sparsity", "flops_reduction", "latency_reduction")
                      if isinstance(getattr(args, k), list)), None)
    folder: List[str] = []  # the run's folder, once chosen: how to continue after Ctrl-C

    def work() -> None:
        first = {sweep_key: getattr(args, sweep_key)[0]} if sweep_key else {}
        config = claim_folder(PruneConfig(**{**vars(args), **first}))
        folder.append(config.save_dir)
        if sweep_key:
            sweep(config, getattr(args, sweep_key))
        else:
            run(config)

    try:
        return exit_status(work)
    except KeyboardInterrupt:
        print("interrupted: the last complete epoch is saved; continue with the same command plus --resume"
              + (f" --save_dir {folder[0]}" if folder and not args.save_dir else ""), file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

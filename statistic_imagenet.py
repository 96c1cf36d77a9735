"""Stage 1 on ImageNet: sample statistics, choose CDP or GFI-AP masks, slim, report; then imagenet/imagenet.py.

    python statistic_imagenet.py --model resnet50 --pretrained_dir ckpt/base/resnet50.pth \\
        --dataroot /data/imagenet --stop_batch 200 --batch_size 128 --sparsity 0.39 --save_model_path run
    python statistic_imagenet.py ... --sparsity 0.3,0.4,0.5        # a sweep from one statistics pass
    torchrun --nproc_per_node 4 statistic_imagenet.py ...           # statistics on 4 GPUs
    python imagenet/imagenet.py --dataroot /data/imagenet --resume run/masks.pth --make-mask
"""
import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run from a checkout without installing

from cdp_gfi.runs.cli import OneLineParser, add_criterion_arguments, add_distributed_argument, add_latency_arguments, add_recalibration_argument, exit_status, imagenet_model  # noqa: E402
from cdp_gfi.runs.imagenet_stage1 import STATISTICS_NAME, Stage1Config, parse_fractions, run  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    """The command line: the CDP README's flags of statistic_imagenet.py, sweeps, reuse and memory bounds."""
    p = OneLineParser(description="Stage 1: prune an ImageNet CNN with CDP or GFI-AP from sampled statistics; write "
                                  "statistics, masks, the slim network and a MACs/params report.")
    a = p.add_argument
    a("--model", type=imagenet_model, default="resnet50", metavar="NAME",
      help="any torchvision classification CNN by its torchvision.models name (resnet50, mobilenet_v2, "
           "efficientnet_b0, ...; plain vggNN = vggNN_bn; default resnet50), or timm:NAME for a timm model "
           "(needs timm installed)")
    a("--pretrained_dir", help="trained weights (required; for a trial run without any, --allow_random_init): a "
                               "state_dict, {'state_dict': ...}, a checkpoint of ours, or a torchvision weights file "
                               "(nested or bare, 'module.' ok); loaded strictly")
    a("--allow_random_init", action="store_true",
      help="run without --pretrained_dir on seeded random weights, to try the pipeline or test it (the masks mean "
           "nothing: statistics of an untrained network are meaningless)")
    a("--dataroot", required=True, help="folder with train/ and val/ class folders (ImageFolder layout)")
    add_criterion_arguments(p)
    a("--sparsity", help="fraction(s) of prunable filters to remove, e.g. 0.39 or a sweep 0.3,0.4,0.5")
    a("--flops_reduction", help="fraction(s) of MACs to remove instead of --sparsity, e.g. 0.5 or 0.4,0.5")
    a("--flops_convention", choices=("conv-linear", "ptflops"), default="conv-linear",
      help="MACs convention of --flops_reduction: conv+linear (CDP, default) or ptflops (GFI-AP)")
    add_latency_arguments(p, "the run's device; rank 0's under torchrun")
    a("--stop_batch", type=int, default=200, help="batches of training images sampled for statistics (default 200)")
    a("--batch_size", type=int, default=128, help="images per batch (per process under torchrun; default 128)")
    a("--input_size", type=int, default=224, help="image size for statistics and MACs counts (default 224)")
    a("--save_statistic_file", nargs="?", const=STATISTICS_NAME, default=STATISTICS_NAME,
      help=f"statistics file name (default {STATISTICS_NAME}); reused when it exists and matches")
    a("--save_statistic_path", help="folder of the statistics file (default: --save_model_path)")
    a("--recompute_statistics", action="store_true", help="gather statistics even if the file exists")
    a("--save_model_path", help="output folder (default ckpt/imagenet_<model>_<method>, or its next free name "
                                "...-2 when it holds another run); a folder holding another run is refused")
    add_recalibration_argument(p)
    a("--seed", type=int, default=0, help="seed of the image sample (and of random weights; default 0)")
    a("--gpus", help="GPU index, e.g. 0 (single process; under torchrun use CUDA_VISIBLE_DEVICES)")
    a("--device", help="cpu, cuda or cuda:N (default: cuda if available)")
    a("-j", "--workers", type=int, default=4, help="data loader worker processes (default 4)")
    add_distributed_argument(p)
    return p


def config_from_args(args: argparse.Namespace) -> Stage1Config:
    """The run's config; the target lists are parsed here."""
    values = vars(args)
    return Stage1Config(**{**values, "sparsity": parse_fractions(args.sparsity, "--sparsity"),
                           "flops_reduction": parse_fractions(args.flops_reduction, "--flops_reduction"),
                           "latency_reduction": parse_fractions(args.latency_reduction, "--latency_reduction")})


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run stage 1; 0 on success, 2 with one `error:` line on stderr for bad input (printed once under torchrun),
    1 when another torchrun rank failed."""
    args = build_parser().parse_args(argv)
    return exit_status(lambda: run(config_from_args(args)))


if __name__ == "__main__":
    sys.exit(main())

"""Stage 2: fine-tune a pruned ImageNet network (masks checkpoint with --make-mask, or a slimmed model).

    python imagenet/imagenet.py --dataroot /data/imagenet --resume run/masks.pth --make-mask --results_dir out
    torchrun --nproc_per_node 8 imagenet/imagenet.py --dataroot /data/imagenet --resume run/slim.pth ...
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from cdp_gfi.runs.imagenet_stage2 import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())

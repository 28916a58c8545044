"""Build small, seeded, random-weight checkpoints laid out like the real Stable Diffusion XL and SD3 folders.

Why: the serving stack, its tests and its benchmarks need a folder that ``StableDiffusionXLPipeline.from_pretrained``
(or ``StableDiffusion3Pipeline.from_pretrained``) loads exactly as it loads ``stabilityai/stable-diffusion-xl-base-1.0``
(or ``stabilityai/stable-diffusion-3-medium-diffusers``): same component classes, subfolders, config keys and block
structure. Nothing can be downloaded here and the real models are far too big for a CPU box. The weights are random
(so images are noise), yet every code path -- the text encoders, pooled embeddings, micro conditioning,
classifier-free guidance, VAE decode -- runs as with the real model. Each family's builder is its own module
(``sdxl_checkpoint.py``, ``sd3_checkpoint.py``), what they share is ``checkpoint_common.py``; this one is the CLI.

Usage::

    python -m export.build_checkpoint --family sdxl --size tiny --out checkpoints/sdxl-tiny [--seed 0] [--force]
    python -m export.build_checkpoint --family sd3 --size tiny --out checkpoints/sd3-tiny
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from export.sd3_checkpoint import build_sd3_checkpoint
from export.sdxl_checkpoint import SCHEDULERS, SIZES, build_sdxl_checkpoint

__all__ = ["build_sd3_checkpoint", "build_sdxl_checkpoint", "main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", choices=["sdxl", "sd3"], default="sdxl")
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny", help="same names for both families")
    parser.add_argument("--out", type=Path, required=True, help="checkpoint folder to create")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scheduler", choices=SCHEDULERS, default="ddim", help="SDXL only (SD3: FlowMatchEuler)")
    parser.add_argument("--force", action="store_true", help="rebuild even if a complete folder exists")
    args = parser.parse_args(argv)
    try:
        if args.family == "sd3":
            build_sd3_checkpoint(args.out, size=args.size, seed=args.seed, force=args.force)
        else:
            build_sdxl_checkpoint(args.out, size=args.size, seed=args.seed, scheduler=args.scheduler, force=args.force)
    except FileExistsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

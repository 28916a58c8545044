"""Train (or resume) one family's checkpoint on the shape data and save it as a diffusers folder.

    python -m train --family sdxl --size shapes --state checkpoints/train/sdxl --out models/sdxl-shapes

Stopping (Ctrl-C, --minutes, a killed process) loses at most --checkpoint-minutes of work: run the same command
again to resume. The folder in --out is written when the denoiser reaches --steps (and with --export-now before).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from train.components import TRAIN_SIZES
from train.data import ATTRIBUTES
from train.stages import Hyper, export, train_denoiser, train_serving_vae, train_vae


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", choices=["sdxl", "sd3"], required=True)
    parser.add_argument("--size", choices=sorted(TRAIN_SIZES), default="shapes")
    parser.add_argument("--state", type=Path, required=True, help="folder for resumable training state and logs")
    parser.add_argument("--out", type=Path, required=True, help="diffusers checkpoint folder to write")
    parser.add_argument("--vae-steps", type=int, default=800)
    parser.add_argument("--steps", type=int, default=8000, help="denoiser steps")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--text-lr", type=float, default=1e-3, help="0 freezes the text encoders")
    parser.add_argument("--drop", type=float, default=0.1, help="caption dropout (classifier-free guidance)")
    parser.add_argument("--mislabel", type=float, default=0.0,
                        help="share of training captions naming one attribute wrongly (train.data.mislabel)")
    parser.add_argument("--mislabel-attributes", nargs="+", choices=ATTRIBUTES, default=list(ATTRIBUTES),
                        help="the attributes a wrong caption may name wrongly")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--latent-mode", choices=["sample", "mean"], default="sample",
                        help="train the denoiser on sampled latents or on the VAE's posterior mean")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared)")
    parser.add_argument("--minutes", type=float, default=None, help="stop (resumably) after this long")
    parser.add_argument("--checkpoint-minutes", type=float, default=3.0)
    parser.add_argument("--export-now", action="store_true", help="write --out from the current EMA weights")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    size = TRAIN_SIZES[args.size]
    run_kwargs = {"checkpoint_seconds": args.checkpoint_minutes * 60,
                  "max_seconds": None if args.minutes is None else args.minutes * 60}
    vae = train_vae(size, args.family, args.state, Hyper(steps=args.vae_steps, batch=32, lr=1e-3, seed=args.seed),
                    **run_kwargs)
    # The denoiser needs only the base VAE: trained before the serving VAE, a running state can be scored
    # (train.evaluate --state --vae vae-FAMILY) while it trains. Every stage seeds itself, so the order changes nothing.
    hyper = Hyper(steps=args.steps, batch=args.batch, lr=args.lr, text_lr=args.text_lr, drop=args.drop,
                  mislabel=args.mislabel, mislabel_attributes=tuple(args.mislabel_attributes), seed=args.seed,
                  latent_mode=args.latent_mode)
    modules, tokenizers, done = train_denoiser(args.family, size, args.state, vae, hyper, **run_kwargs)
    if done < args.steps and not args.export_now:
        print(f"{args.family}: stopped at step {done} of {args.steps}; run again to resume", file=sys.stderr)
        return 0
    serving_vae = train_serving_vae(size, args.family, args.state, vae,
                                    Hyper(steps=args.vae_steps, batch=16, lr=1e-3, seed=args.seed), **run_kwargs)
    export(args.family, args.out, args.state, serving_vae, modules, tokenizers)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Prompt adherence of a trained checkpoint, sampled with the family's own serving code (``LocalPipeline``).

    python -m train.evaluate --family sdxl --checkpoint models/sdxl-shapes [--guidance 5 1] [--grid out/grid.png]
    python -m train.evaluate --family sdxl --state checkpoints/train/sdxl   # the last saved state of a run

Held-out combinations (never trained on) by default; ``--split train`` scores the trained ones.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from train.data import EVAL_SEED_BASE, HELD_OUT_COMBINATIONS, TRAIN_COMBINATIONS, caption
from train.score import score


def sample(pipe, prompts: list[str], guidance: float, steps: int, size: int, seeds: list[int]) -> list[np.ndarray]:
    """One ``serial`` image per (prompt, seed) at ``guidance`` from a ``LocalPipeline``, as the server draws it."""
    from hybridiff.loop import ImageRequest
    from hybridiff.schedule import Mode

    knobs = pipe.defaults.knobs
    images = []
    for prompt, seed in zip(prompts, seeds, strict=True):
        request = ImageRequest(seed=seed, steps=steps, guidance_scale=guidance, height=size, width=size,
                               mode=Mode.SERIAL, knobs=knobs)
        images.append(pipe.generate(prompt, request)[0])
    return images


def evaluate(family: str, folder: Path, guidances: Sequence[float], steps: int = 25, per_prompt: int = 4,
             split: str = "held_out", size: int = 32, grid: Path | None = None,
             seed_base: int = EVAL_SEED_BASE) -> dict[str, dict[str, float]]:
    """Adherence per guidance scale over every combination of ``split``, ``per_prompt`` seeds each (image ``i``
    seeded ``seed_base + i``)."""
    combos = HELD_OUT_COMBINATIONS if split == "held_out" else TRAIN_COMBINATIONS
    prompts = [caption(*c) for c in combos for _ in range(per_prompt)]
    seeds = [seed_base + i for i in range(len(prompts))]
    from hybridiff.local import LocalPipeline

    pipe = LocalPipeline(family, folder, devices=1)
    results = {}
    rows = []
    for g in guidances:
        images = sample(pipe, prompts, g, steps, size, seeds)
        results[f"guidance {g:g}"] = score(images, prompts)
        rows.append(np.concatenate(images[::per_prompt], axis=1))
    if grid is not None:
        from PIL import Image

        grid.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.concatenate(rows, axis=0)).resize(
            (rows[0].shape[1] * 4, len(rows) * size * 4), Image.NEAREST).save(grid)
    return results


def compare_modes(family: str, folder: Path, modes: Sequence[str], steps: int | None = None, per_prompt: int = 2,
                  size: int = 64) -> dict[str, dict[str, object]]:
    """Each mode at the checkpoint's default guidance and knobs on two devices: adherence on the held-out prompts,
    PSNR against ``serial`` (of the mean squared error over all images), and where tau1 came from."""
    import dataclasses

    from bench.quality import psnr_pooled
    from hybridiff.local import LocalPipeline
    from hybridiff.loop import ImageRequest
    from hybridiff.schedule import Mode

    pipe = LocalPipeline(family, folder, devices=2)
    defaults = pipe.defaults  # the checkpoint's serving defaults (its knobs)
    prompts = [caption(*c) for c in HELD_OUT_COMBINATIONS for _ in range(per_prompt)]
    base = ImageRequest(seed=0, steps=steps or defaults.steps, guidance_scale=defaults.guidance_scale, height=size,
                        width=size, mode=Mode.SERIAL, knobs=defaults.knobs)
    images: dict[str, list[np.ndarray]] = {}
    results: dict[str, dict[str, object]] = {}
    for mode in ["serial", *[m for m in modes if m != "serial"]]:
        images[mode], sources = [], []
        for i, prompt in enumerate(prompts):
            request = dataclasses.replace(base, seed=EVAL_SEED_BASE + i, mode=Mode(mode))
            image, report, _ = pipe.generate(prompt, request)
            images[mode].append(image)
            sources.append(str(report.schedule.get("tau_source")))
        results[mode] = {**score(images[mode], prompts), "psnr_vs_serial": psnr_pooled(images["serial"], images[mode]),
                         "tau_source": {s: sources.count(s) for s in set(sources)}}
    return results


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", choices=["sdxl", "sd3"], required=True)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", type=Path)
    source.add_argument("--state", type=Path, help="a training state folder (python -m train --state)")
    parser.add_argument("--size", default="shapes", help="training size of --state")
    parser.add_argument("--vae", default=None, help="VAE folder name in --state (default: the shipped one if trained)")
    parser.add_argument("--guidance", type=float, nargs="+", default=[5.0, 1.0])
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--per-prompt", type=int, default=4)
    parser.add_argument("--split", choices=["held_out", "train"], default="held_out")
    parser.add_argument("--seed-base", type=int, default=EVAL_SEED_BASE,
                        help="seed of the first image (default: the seeds the shipped models were chosen on)")
    parser.add_argument("--grid", type=Path, default=None, help="PNG: one row per guidance, one image per prompt")
    parser.add_argument("--modes", nargs="+", default=None,
                        help="instead: compare these modes at the checkpoint's defaults (--steps 0: default steps)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    report: dict[str, object] = {"family": args.family, "split": args.split, "steps": args.steps}
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.checkpoint
        if args.state is not None:
            from train.components import TRAIN_SIZES
            from train.stages import export_from_state

            folder, report["train_step"] = export_from_state(args.family, TRAIN_SIZES[args.size], args.state,
                                                             Path(tmp) / "ckpt", vae_name=args.vae)
        size = json.loads((folder / "vae" / "config.json").read_text())["sample_size"]
        if args.modes:
            report.update(compare_modes(args.family, folder, args.modes, args.steps or None, args.per_prompt, size))
            print(json.dumps(report, indent=1))
            return 0
        report.update(evaluate(args.family, folder, args.guidance, args.steps, args.per_prompt, args.split, size,
                               args.grid, args.seed_base))
        report["seed_base"] = args.seed_base
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

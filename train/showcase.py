"""The README's picture: what the built-in models draw for the prompts they never saw in training.

    python -m train.showcase --model sdxl=models/sdxl-shapes --model sd3=models/sd3-shapes --out docs/showcase.png

One row per (model, mode): ``serial`` and ``hybrid``, each at the checkpoint's own serving defaults (size, steps,
guidance, knobs), one column per held-out prompt with the caption under it, the same seed per column. The images
come from ``LocalPipeline``, the families' serving code on two in-process devices, so they are what the server
draws for the same requests; under each hybrid row, its PSNR against serial and where tau1 came from.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from bench.quality import psnr_pooled
from train.data import HELD_OUT_COMBINATIONS, caption

SCALE = 2  # each 64x64 image drawn at 128x128
LABEL_WIDTH = 110
CAPTION_HEIGHT = 30
GAP = 4  # white between tiles: the backgrounds would run together


def draw(family: str, folder: Path, prompts: Sequence[str], seed: int = 2026) -> dict[str, tuple[list, list]]:
    """``{mode: (images, schedules)}`` for serial and hybrid at the checkpoint's defaults."""
    from hybridiff.local import LocalPipeline
    from hybridiff.loop import ImageRequest
    from hybridiff.schedule import Mode

    pipe = LocalPipeline(family, folder, devices=2)
    d = pipe.defaults
    base = ImageRequest(seed=seed, steps=d.steps, guidance_scale=d.guidance_scale, height=d.height, width=d.width,
                        mode=Mode.SERIAL, knobs=d.knobs)
    rows = {}
    for mode in (Mode.SERIAL, Mode.HYBRID):
        images, schedules = [], []
        for i, prompt in enumerate(prompts):
            image, report, _ = pipe.generate(prompt, dataclasses.replace(base, seed=seed + i, mode=mode))
            images.append(image)
            schedules.append(report.schedule)
        rows[mode.value] = (images, schedules)
    return rows


def compose(rows: list[tuple[str, list[np.ndarray]]], prompts: Sequence[str]) -> np.ndarray:
    """A labelled grid: one row per entry of ``rows``, captions (two lines) under the last row."""
    from PIL import Image, ImageDraw

    side = rows[0][1][0].shape[0] * SCALE
    step = side + GAP
    width = LABEL_WIDTH + step * len(prompts)
    height = step * len(rows) + CAPTION_HEIGHT
    canvas = Image.new("RGB", (width, height), "white")
    pen = ImageDraw.Draw(canvas)
    for r, (label, images) in enumerate(rows):
        for c, image in enumerate(images):
            tile = Image.fromarray(image).resize((side, side), Image.NEAREST)
            canvas.paste(tile, (LABEL_WIDTH + c * step, r * step))
        for k, line in enumerate(label.split("\n")):
            pen.text((4, r * step + side // 2 - 12 + 12 * k), line, fill="black")
    for c, prompt in enumerate(prompts):
        words = prompt.split()
        lines = [" ".join(words[:3]), " ".join(words[3:])]
        for k, line in enumerate(lines):
            pen.text((LABEL_WIDTH + c * step + 3, len(rows) * step + 3 + 12 * k), line, fill="black")
    return np.asarray(canvas)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", action="append", required=True, help="FAMILY=FOLDER, in row order")
    parser.add_argument("--out", type=Path, default=Path("docs/showcase.png"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    prompts = [caption(*c) for c in HELD_OUT_COMBINATIONS]
    rows = []
    for entry in args.model:
        family, folder = entry.split("=", 1)
        drawn = draw(family, Path(folder), prompts)
        serial, hybrid = drawn["serial"][0], drawn["hybrid"][0]
        slope = sum(s.get("tau_source") == "slope" for s in drawn["hybrid"][1])
        print(f"{family} ({folder}): hybrid vs serial {psnr_pooled(serial, hybrid):.1f} dB; tau1 by the slope for "
              f"{slope} of {len(prompts)}", flush=True)
        rows += [(f"{family.upper()}\nserial", serial), (f"{family.upper()}\nhybrid", hybrid)]
    from PIL import Image

    args.out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(compose(rows, prompts)).save(args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

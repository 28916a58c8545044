"""Choose a trained checkpoint's hybrid knobs from its own rel-MAE curves, so that the slope test (not ``tau_cap``)
places tau1.

    python -m bench.tune_knobs --family sdxl --checkpoint models/sdxl-shapes

Draws ``cfg_parallel`` images of *training* combinations (its rel-MAE curve is the one ``hybrid`` reads until tau1:
the same math), then replays each curve through the serving schedule (:class:`hybridiff.schedule.GuidanceSchedule`)
for every (L, eps_slope, tau_cap) of a grid, and prints per setting the fraction of curves whose tau1 came from the
slope and the tau1 median and range. Measure the chosen knobs on the held-out prompts with ``bench.fidelity``.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import statistics
from collections.abc import Sequence
from pathlib import Path

from hybridiff.schedule import GuidanceSchedule, HybridKnobs, Mode


def replay_tau1(curve: Sequence[float], knobs: HybridKnobs) -> tuple[int | None, str | None]:
    """tau1 and its source as a ``hybrid`` run that observed ``curve`` would have decided them."""
    schedule = GuidanceSchedule(mode=Mode.HYBRID, steps=len(curve), knobs=knobs, guidance=True)
    for step, value in enumerate(curve):
        schedule.observe(step, value)
        if schedule.tau1 is not None:
            break
    return schedule.tau1, schedule.tau_source


def grid_table(curves: list[list[float]], windows: Sequence[int], eps_slopes: Sequence[float],
               tau_caps: Sequence[int], k: int = 5) -> list[dict]:
    """One row per setting: slope fraction and tau1 median/range, best (most slope, then earliest) first."""
    rows = []
    for window, eps, cap in itertools.product(windows, eps_slopes, tau_caps):
        knobs = HybridKnobs(window=window, eps_slope=eps, k=k, tau_cap=cap)
        decided = [replay_tau1(c, knobs) for c in curves]
        taus = [t for t, _ in decided if t is not None]
        rows.append({"slope_window": window, "eps_slope": eps, "tau_cap": cap,
                     "slope_fraction": sum(s == "slope" for _, s in decided) / len(decided),
                     "tau1_median": statistics.median(taus) if taus else None,
                     "tau1_range": (min(taus), max(taus)) if taus else None})
    return sorted(rows, key=lambda r: (-r["slope_fraction"], r["tau1_median"] or 0))


def collect_curves(family: str, checkpoint: Path, images: int) -> list[list[float]]:
    """cfg_parallel rel-MAE curves of ``images`` training-combination prompts at the checkpoint's defaults."""
    import torch

    from hybridiff.local import LocalPipeline
    from hybridiff.loop import ImageRequest
    from train.data import TRAIN_COMBINATIONS, caption

    torch.set_num_threads(1)
    pipe = LocalPipeline(family, checkpoint, devices=2)
    d = pipe.defaults
    request = ImageRequest(seed=0, steps=d.steps, guidance_scale=d.guidance_scale, height=d.height, width=d.width,
                           mode=Mode.CFG_PARALLEL, knobs=d.knobs)
    stride = max(len(TRAIN_COMBINATIONS) // images, 1)
    prompts = [caption(*c) for c in TRAIN_COMBINATIONS[::stride][:images]]
    return [pipe.generate(p, dataclasses.replace(request, seed=2000 + i))[1].schedule["rel_mae"]
            for i, p in enumerate(prompts)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.tune_knobs", description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", choices=["sdxl", "sd3"], required=True)
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--images", type=int, default=16, help="training-combination prompts (one seed each)")
    parser.add_argument("--windows", type=int, nargs="+", default=[4, 5, 6, 8, 10, 12])
    parser.add_argument("--eps-slopes", type=float, nargs="+", default=[0.5e-3, 1e-3, 1.5e-3, 2e-3, 3e-3])
    parser.add_argument("--tau-caps", type=int, nargs="+", default=[15, 20, 25])
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--curves", type=Path, default=None, help="write the curves (JSON) here")
    args = parser.parse_args(argv)
    curves = collect_curves(args.family, args.checkpoint, args.images)
    if args.curves is not None:
        args.curves.write_text(json.dumps(curves))
    print(f"{len(curves)} curves; slope fraction, tau1 median (range) per setting, best first:")
    for row in grid_table(curves, args.windows, args.eps_slopes, args.tau_caps)[: args.top]:
        print(f"L={row['slope_window']:<3} eps_slope={row['eps_slope']:<7g} tau_cap={row['tau_cap']:<3} "
              f"slope {100 * row['slope_fraction']:.0f}%  tau1 {row['tau1_median']} {row['tau1_range']}")


if __name__ == "__main__":
    main()

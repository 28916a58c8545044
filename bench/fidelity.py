"""Fidelity and prompt adherence of every mode on a trained shape model, the tau sources and the k ablation.

    python -m bench.fidelity --family sdxl --checkpoint models/sdxl-shapes --random checkpoints/sdxl-small
    python -m bench.fidelity --family sd3 --checkpoint models/sd3-shapes --frozen-feed   # + the reference's SD3 bug

Runs the family's own serving loop in this process (``LocalPipeline``, two in-process devices in threads) on the
held-out prompts (combinations training never showed) at the checkpoint's serving defaults. Per mode: PSNR and SSIM
against ``serial`` (same prompt and seed), adherence by ``train.score`` (colour, shape, position, colour+position),
tau1/tau2 and where tau1 came from (the slope test or ``tau_cap``). The k ablation has the paper's Table 4 columns:
speed-up, PSNR against serial, adherence. Speed-up is given twice: measured (wall clock of this process, configs
interleaved per prompt, median of per-prompt ratios to serial) and ideal (the schedule's phases priced with
one-device timings of this model: two devices fully parallel, no overhead). Writes fidelity.json, fidelity.md
and rel_mae.png (the rel-MAE curve of this model beside ``--random``'s) to --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from pathlib import Path

import numpy as np

from bench.quality import psnr, psnr_pooled, ssim
from train.data import EVAL_SEED_BASE, HELD_OUT_COMBINATIONS, caption

ABLATION_K = (0, 5, 10, 20, 30)
FROZEN = " (frozen stage-1 feed)"


@dataclasses.dataclass(frozen=True)
class Config:
    """One way of running every prompt: a mode, its k, and for SD3 whether the reference's frozen feed is used."""

    mode: str
    k: int | None = None  # None: the checkpoint's default
    frozen_feed: bool = False
    guidance: float | None = None  # None: the checkpoint's default

    @property
    def label(self) -> str:
        label = self.mode if self.k is None else f"{self.mode} k={self.k}"
        label += "" if self.guidance is None else f" (guidance {self.guidance:g})"
        return label + (FROZEN if self.frozen_feed else "")


def configs(ks: tuple[int, ...], frozen_feed: bool, default_k: int) -> list[Config]:
    """serial first (the reference of every comparison), the modes, serial without guidance (what guidance
    adds to adherence), the k ablation, the frozen-feed runs."""
    runs = [Config("serial"), Config("cfg_parallel"), Config("hybrid"), Config("serial", guidance=1.0)]
    runs += [Config("hybrid", k) for k in ks if k != default_k]
    if frozen_feed:
        runs += [Config("hybrid", None, True)] + [Config("hybrid", k, True) for k in ks if k != default_k]
    return runs


def run_all(family: str, checkpoint: Path, runs: list[Config], per_prompt: int, steps: int | None,
            size: int | None = None, seed_base: int = EVAL_SEED_BASE) -> dict:
    """Every prompt in every config (configs interleaved per prompt, so drift hits them alike); image ``i``
    has seed ``seed_base + i``."""
    import torch

    from bench.frozen_feed import FrozenStageFeed
    from hybridiff.local import LocalPipeline
    from hybridiff.loop import ImageRequest
    from hybridiff.schedule import Mode

    torch.set_num_threads(1)
    pipe = LocalPipeline(family, checkpoint, devices=2, threaded=True)
    correct = pipe.transport
    frozen = FrozenStageFeed(correct) if any(c.frozen_feed for c in runs) else None
    defaults = pipe.defaults
    prompts = [caption(*c) for c in HELD_OUT_COMBINATIONS for _ in range(per_prompt)]
    base = ImageRequest(seed=0, steps=steps or defaults.steps, guidance_scale=defaults.guidance_scale,
                        height=size or defaults.height, width=size or defaults.width, mode=Mode.SERIAL,
                        knobs=defaults.knobs)
    results = {c.label: {"images": [], "schedules": [], "seconds": []} for c in runs}
    pipe.generate(prompts[0], dataclasses.replace(base, steps=3, mode=Mode.HYBRID))  # warm-up, untimed
    for i, prompt in enumerate(prompts):
        for config in runs:
            knobs = defaults.knobs if config.k is None else dataclasses.replace(defaults.knobs, k=config.k)
            guidance = base.guidance_scale if config.guidance is None else config.guidance
            request = dataclasses.replace(base, seed=seed_base + i, mode=Mode(config.mode), knobs=knobs,
                                          guidance_scale=guidance)
            pipe.transport = frozen if config.frozen_feed else correct
            started = time.perf_counter()
            image, report, _ = pipe.generate(prompt, request)
            results[config.label]["seconds"].append(time.perf_counter() - started)
            results[config.label]["images"].append(image)
            results[config.label]["schedules"].append(report.schedule)
    pipe.transport = correct
    return {"pipe": pipe, "prompts": prompts, "request": base, "results": results}


def summarize(prompts: list[str], results: dict, ideal_latency) -> dict:
    """Per config: fidelity against serial, adherence, tau sources, measured and ideal speed-up."""
    from train.score import score

    serial = results["serial"]
    rows = {}
    for label, got in results.items():
        pairs = list(zip(serial["images"], got["images"], strict=True))
        sources = [s.get("tau_source") for s in got["schedules"]]
        hybrid = [s for s in sources if s is not None]
        rows[label] = {
            **score(got["images"], prompts),
            "psnr_vs_serial_db": psnr_pooled(serial["images"], got["images"]),
            "psnr_vs_serial_per_image_median_db": statistics.median(psnr(a, b) for a, b in pairs),
            "ssim_vs_serial": float(np.mean([ssim(a, b) for a, b in pairs])),
            "tau1": [s["tau1"] for s in got["schedules"]],
            "tau2": [s["tau2"] for s in got["schedules"]],
            "tau_source": {src: sources.count(src) for src in sorted(set(hybrid))},
            "slope_fraction": (sources.count("slope") / len(hybrid)) if hybrid else None,
            "speedup_measured": statistics.median(
                s / t for s, t in zip(serial["seconds"], got["seconds"], strict=True)),
            "speedup_ideal": statistics.median(
                ideal_latency(s) / ideal_latency(t)
                for s, t in zip(serial["schedules"], got["schedules"], strict=True)),
            "latency_s_median": statistics.median(got["seconds"]),
        }
        correct = label.replace(FROZEN, "")
        if correct != label:  # what the reference's bug changes: the same run with the correct feed
            rows[label]["psnr_vs_correct_feed_db"] = psnr_pooled(results[correct]["images"], got["images"])
    return rows


def _pct(value: float) -> str:
    return f"{100 * value:.0f}%"


def _taus(row: dict) -> str:
    tau1 = [t for t in row["tau1"] if t is not None]
    if not tau1:
        return "-"
    tau2 = [t for t in row["tau2"] if t is not None]
    source = ", ".join(f"{src} {n}" for src, n in row["tau_source"].items())
    return (f"{statistics.median(tau1):g} ({min(tau1)}-{max(tau1)}), {statistics.median(tau2):g} "
            f"({min(tau2)}-{max(tau2)}); {source} of {len(tau1)}")


def markdown(header: str, rows: dict, default_k: int) -> list[str]:
    lines = [header, "", "| mode | colour+position | colour | shape | position | PSNR vs serial (dB) | SSIM vs serial "
             "| tau1, tau2: median (range); source |", "|---|---|---|---|---|---|---|---|"]
    for label, row in rows.items():
        if " k=" in label:
            continue
        lines.append(f"| {label} | {_pct(row['colour+position'])} | {_pct(row['colour'])} | {_pct(row['shape'])} "
                     f"| {_pct(row['position'])} | {row['psnr_vs_serial_db']:.1f} | {row['ssim_vs_serial']:.4f} "
                     f"| {_taus(row)} |")
    lines += ["", f"k ablation (the paper's Table 4; hybrid's default k = {default_k}):", "",
              "| k | speed-up measured | speed-up ideal | PSNR vs serial (dB) | SSIM | colour+position | shape "
              "| PSNR vs correct feed (dB) |", "|---|---|---|---|---|---|---|---|"]

    def k_of(label: str) -> int:
        return int(label.split("k=")[1].split(" ")[0]) if " k=" in label else default_k

    hybrid = sorted((label for label in rows if label.startswith("hybrid")), key=lambda lb: (FROZEN in lb, k_of(lb)))
    for label in hybrid:
        row = rows[label]
        versus = f"{row['psnr_vs_correct_feed_db']:.1f}" if "psnr_vs_correct_feed_db" in row else "-"
        lines.append(f"| {k_of(label)}{FROZEN if FROZEN in label else ''} | {row['speedup_measured']:.2f}x "
                     f"| {row['speedup_ideal']:.2f}x | {row['psnr_vs_serial_db']:.1f} | {row['ssim_vs_serial']:.4f} "
                     f"| {_pct(row['colour+position'])} | {_pct(row['shape'])} | {versus} |")
    return lines


def rel_mae_curves(family: str, checkpoint: Path, request, prompts: list[str],
                   seed_base: int = EVAL_SEED_BASE) -> list[list[float]]:
    """cfg_parallel's rel-MAE per step (the curve hybrid's slope test reads) for each prompt."""
    from hybridiff.local import LocalPipeline
    from hybridiff.schedule import Mode

    pipe = LocalPipeline(family, checkpoint, devices=2)
    return [pipe.generate(p, dataclasses.replace(request, seed=seed_base + i, mode=Mode.CFG_PARALLEL))[1]
            .schedule["rel_mae"] for i, p in enumerate(prompts)]


def plot_curves(curves: dict[str, list[list[float]]], taus: dict[str, list[int]], path: Path) -> None:
    """Median and range of rel-MAE per step for each model; tau1 marks where the slope test placed it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves), figsize=(5.5 * len(curves), 3.6))
    for ax, (name, family_curves) in zip(np.atleast_1d(axes), curves.items(), strict=True):
        values = np.array(family_curves, dtype=float)
        steps = np.arange(values.shape[1])
        ax.fill_between(steps, values.min(0), values.max(0), alpha=0.25, label="range over prompts")
        ax.plot(steps, np.median(values, 0), label="median")
        for tau in sorted(set(taus.get(name, []))):
            ax.axvline(tau, color="grey", lw=0.6, ls=":")  # each image's tau1
        ax.set(title=name, xlabel="step", ylabel="rel-MAE = mean|eps_c - eps_u| / mean|eps_u|")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.fidelity", description=__doc__.split("\n")[0])
    parser.add_argument("--family", choices=["sdxl", "sd3"], required=True)
    parser.add_argument("--checkpoint", type=Path, required=True, help="a trained shape model (models/FAMILY-shapes)")
    parser.add_argument("--random", type=Path, default=None, help="a random checkpoint whose rel-MAE curve to plot")
    parser.add_argument("--per-prompt", type=int, default=2, help="seeds per held-out combination")
    parser.add_argument("--steps", type=int, default=None, help="default: the checkpoint's serving default")
    parser.add_argument("--size", type=int, default=None, help="image side; default: the checkpoint's serving default")
    parser.add_argument("--ks", type=int, nargs="*", default=list(ABLATION_K))
    parser.add_argument("--frozen-feed", action="store_true",
                        help="SD3: also run hybrid with the reference's frozen stage-1 feed (bench/frozen_feed.py)")
    parser.add_argument("--seed-base", type=int, default=EVAL_SEED_BASE,
                        help="seed of the first image (default: the seeds the shipped models were chosen on)")
    parser.add_argument("--out", type=Path, default=Path("out/bench"))
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    from bench.measure import OneDevice
    from hybridiff.families import get_family
    from hybridiff.serving_defaults import read_serving_defaults

    default_k = read_serving_defaults(args.checkpoint, get_family(args.family).defaults).knobs.k
    run = run_all(args.family, args.checkpoint, configs(tuple(args.ks), args.frozen_feed, default_k),
                  args.per_prompt, args.steps, args.size, args.seed_base)
    request = run["request"]
    times = OneDevice(args.family, args.checkpoint, request.height).measure(repeats=5)
    rows = summarize(run["prompts"], run["results"], times.ideal_latency)
    curves = {f"{args.checkpoint} (trained)": [s["rel_mae"] for s in run["results"]["cfg_parallel"]["schedules"]]}
    taus = {f"{args.checkpoint} (trained)": [t for t in rows["hybrid"]["tau1"] if t is not None]}
    if args.random is not None:
        curves[f"{args.random} (random weights)"] = rel_mae_curves(args.family, args.random, request,
                                                                   run["prompts"][:: args.per_prompt], args.seed_base)
    plot_curves(curves, taus, args.out / "rel_mae.png")
    header = (f"**{args.family}, {args.checkpoint}**: {len(run['prompts'])} held-out images "
              f"({args.per_prompt} seeds x {len(run['prompts']) // args.per_prompt} combinations, seeds from "
              f"{args.seed_base}), "
              f"{request.steps} steps, guidance {request.guidance_scale:g}, {request.height}x{request.width}, "
              f"knobs {dataclasses.asdict(request.knobs)}; two in-process devices (threads).")
    lines = markdown(header, rows, default_k)
    lines += ["", f"One device, one thread (prices the ideal speed-up): denoiser batch 1 {times.full[1]:.4f} s, "
              f"batch 2 {times.full[2]:.4f} s; stages batch 1 {times.stages[1][0]:.4f} / {times.stages[1][1]:.4f} s; "
              f"text encoders {times.text_encoder:.4f} s; VAE decode {times.vae:.4f} s."]
    (args.out / "fidelity.md").write_text("\n".join(lines) + "\n")
    (args.out / "fidelity.json").write_text(json.dumps(
        {"family": args.family, "checkpoint": str(args.checkpoint), "request": dataclasses.asdict(request),
         "rows": rows, "components_s": dataclasses.asdict(times),
         "rel_mae_curves": curves}, indent=1, default=str))
    print("\n".join(lines))


if __name__ == "__main__":
    main()

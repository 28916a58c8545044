"""The benchmark's report: the Markdown table per family, the plot, and the files a run leaves in --out.

Formatting only: every figure comes from :func:`bench.stats.summarize`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path


def _fmt_db(value: float) -> str:
    return "inf (identical)" if value == float("inf") else f"{value:.1f}"


def markdown_table(family: str, summary: dict) -> list[str]:
    """One family's table (a row per mode and k) and the one-device timings under it."""
    lines = [
        f"**{family}**",
        "",
        "| mode | latency median (min-max) | vs serial | vs diffusers, all cores | parallel efficiency "
        "| efficiency net of contention | overhead / step | MB moved / image | PSNR vs serial (dB) | SSIM vs serial "
        "| tau1, tau2 |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key, row in summary["rows"].items():
        lat = row["latency_s"]
        lines.append(
            f"| {key} | {lat['median']:.2f} s ({lat['min']:.2f}-{lat['max']:.2f}) | {row['speedup_vs_serial']:.2f}x "
            f"| {row['speedup_vs_diffusers_all_cores']:.2f}x | {row['parallel_efficiency']:.3f} "
            f"| {row['efficiency_net_of_contention']:.3f} "
            f"| {row['overhead_per_step_ms']:.1f} ms ({100 * row['overhead_fraction_of_step']:.1f}%) "
            f"| {row['mb_moved_per_image']:.1f} | {_fmt_db(row['psnr_vs_serial_db'])} "
            f"| {row['ssim_vs_serial']:.4f} | {row['tau1']}, {row['tau2']} |"
        )
    d = summary["diffusers_all_cores"]
    c = summary["components_s"]
    lines += [
        "",
        f"diffusers' own pipeline, {d['threads']} threads: {d['latency_s']['median']:.2f} s median. "
        f"One device, one thread: denoiser batch 1 {c['full_batch1']:.3f} s, batch 2 {c['full_batch2']:.3f} s; "
        f"stages batch 1 {c['stages_batch1'][0]:.3f} / {c['stages_batch1'][1]:.3f} s; text encoders "
        f"{c['text_encoder']:.3f} s; VAE decode {c['vae']:.3f} s. hybrid uses k=5.",
    ]
    per_round = ", ".join(f"{v:.2f}x" for v in c.get("contention_per_round", []))
    lines.append(
        f"Batch efficiency: batch 2 takes {c['batch2_over_batch1']:.2f}x batch 1. Contention: a batch-1 forward "
        f"takes {c['contention']:.2f}x as long while the other core runs one (per round: {per_round}). "
        "One-device timings are medians over the rounds."
    )
    return lines + [""]


def write_plot(summaries: dict[str, dict], path: Path) -> None:
    """Per family: median latency per mode beside diffusers' own, and PSNR against serial."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(summaries), 2, figsize=(12, 4.5 * len(summaries)), squeeze=False)
    for (family, summary), (left, right) in zip(summaries.items(), axes, strict=True):
        keys = list(summary["rows"])
        latency = [summary["rows"][k]["latency_s"]["median"] for k in keys]
        psnr_values = [min(summary["rows"][k]["psnr_vs_serial_db"], 80.0) for k in keys]
        left.bar(keys, latency, color="tab:blue")
        left.axhline(summary["diffusers_all_cores"]["latency_s"]["median"], color="tab:red", linestyle="--",
                     label="diffusers, all cores")
        left.set_ylabel(f"{family}: end-to-end latency (s)")
        left.legend()
        right.bar(keys, psnr_values, color="tab:green")
        right.set_ylabel(f"{family}: PSNR vs serial (dB; identical = 80)")
        for axis in (left, right):
            axis.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def machine_line(checkpoint_size: str, steps: int, size: int, prompts: int, repeats: int) -> str:
    """What the figures were measured on and with, for the report's first line and bench.json."""
    return (f"{os.cpu_count()} cores ({_cpu_name()}), one core per device, `{checkpoint_size}` models, "
            f"{steps} steps, {size}x{size}, {prompts} prompts x {repeats} runs per mode")


def write_report(out: Path, machine: str, summaries: dict[str, dict]) -> list[str]:
    """Write bench.json, bench.md and bench.png to ``out``; return the Markdown lines."""
    lines = [f"Measured on {machine} with `make bench`.", ""]
    for family, summary in summaries.items():
        lines += markdown_table(family, summary)
    (out / "bench.json").write_text(json.dumps({"machine": machine, **summaries}, indent=2, default=float))
    (out / "bench.md").write_text("\n".join(lines))
    write_plot(summaries, out / "bench.png")
    return lines


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"

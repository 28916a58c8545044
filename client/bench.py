"""Benchmark and fidelity harness: latency, speed-up, efficiency, overhead, bytes and PSNR/SSIM.

    python -m client.bench                      # starts a server on the small model
    python -m client.bench --url 127.0.0.1:8000 # or measures a running one

Sends the same prompts and seeds in every mode, then (with the server idle) times the pieces on
one device in this process to compute the ideal latency of each mode, and runs diffusers' own
pipeline with every core as the single-process alternative. Writes bench.json, bench.md and
bench.png to --out. Every figure is measured in this run; nothing is typed in.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from client.generate import generate, make_client
from client.quality import psnr, ssim

PROMPTS = [
    "a lighthouse on a cliff at sunset, oil painting",
    "a red fox sitting in fresh snow, photograph",
    "a futuristic city street at night with neon signs",
]
MODES = ["serial", "cfg_parallel", "pipeline", "hybrid"]
ABLATION_K = [0, 5, 10, 20]


@dataclass
class Run:
    mode: str
    prompt: int
    k: int | None  # set for the k ablation; None = the mode's defaults (hybrid: k=5)
    latency_s: float
    schedule: dict
    image: np.ndarray = field(repr=False)


@dataclass
class ComponentTimes:
    """Median single-device timings (one core, one thread) of every piece a request runs."""

    text_encoder: float
    vae: float
    full: dict[int, float]  # batch -> whole denoiser
    stages: dict[int, tuple[float, float]]  # batch -> (stage 0, stage 1)

    def step(self, mode: str, phase: str) -> float:
        if phase == "serial":
            return self.full[2]
        if mode == "pipeline":  # CFG batch inside each stage
            return self.full[2] if phase == "warmup" else max(self.stages[2])
        return self.full[1] if phase in ("partition", "warmup") else max(self.stages[1])

    def ideal_latency(self, schedule: dict) -> float:
        mode = schedule["mode_run"]
        steps = sum(self.step(mode, phase) for phase in schedule["phases"])
        return self.text_encoder + steps + self.vae


def _median_time(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def measure_components(family: str, checkpoint: Path, size: int, repeats: int) -> ComponentTimes:
    """Time each piece alone on core 0 with one thread: the devices' conditions, without contention."""
    import torch

    from hybridiff.local import LocalPipeline
    from hybridiff.schedule import COND, UNCOND

    os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    torch.set_num_threads(1)
    local = LocalPipeline(family, checkpoint, devices=1)
    denoiser = local.denoisers[0]
    branches = local.branch_conditioning(PROMPTS[0], None)
    extra = local.sampler.extra_conditioning(size, size)
    side = size // local.sampler.vae_scale_factor
    latent = torch.randn(1, local.sampler.latent_channels, side, side)
    timestep = torch.tensor([500.0])
    full, stages = {}, {}
    for batch, names in ((1, (COND,)), (2, (UNCOND, COND))):
        cond = {k: torch.cat([branches[b][k] for b in names]) for k in branches[COND]}
        cond.update({k: v.expand(batch, -1) for k, v in extra.items()})
        full[batch] = _median_time(lambda c=cond: denoiser.run(latent, timestep, c), repeats)
        head = denoiser.run(latent, timestep, cond, capture_stage=1).activations
        middle = denoiser.run(latent, timestep, cond, stage=0, stale=head).activations
        stage0 = _median_time(lambda c=cond, h=head: denoiser.run(latent, timestep, c, stage=0, stale=h), repeats)
        stage1 = _median_time(lambda c=cond, m=middle: denoiser.run(latent, timestep, c, stage=1, stale=m), repeats)
        stages[batch] = (stage0, stage1)
    text = _median_time(lambda: local.text_encoder.encode([PROMPTS[0]], None), repeats)
    final = torch.randn(1, local.sampler.latent_channels, side, side)
    vae = _median_time(lambda: local.decoder.decode(final), repeats)
    return ComponentTimes(text, vae, full, stages)


def _probe_worker(family: str, checkpoint: str, size: int, core: int, start_at: float, repeats: int, queue) -> None:
    """One device's batch-1 forwards on ``core``, starting at ``start_at`` (so two workers overlap)."""
    import torch

    from hybridiff.local import LocalPipeline
    from hybridiff.schedule import COND

    os.sched_setaffinity(0, {core})
    torch.set_num_threads(1)
    local = LocalPipeline(family, Path(checkpoint), devices=1)
    cond = {**local.branch_conditioning(PROMPTS[0], None)[COND], **local.sampler.extra_conditioning(size, size)}
    side = size // local.sampler.vae_scale_factor
    latent = torch.randn(1, local.sampler.latent_channels, side, side)
    local.denoisers[0].run(latent, torch.tensor([500.0]), cond)
    while time.time() < start_at:
        time.sleep(0.01)
    times = [local.denoisers[0].run(latent, torch.tensor([500.0]), cond).compute_seconds for _ in range(repeats)]
    queue.put((core, statistics.median(times)))


def contention_probe(family: str, checkpoint: Path, size: int, repeats: int = 6) -> dict:
    """How much slower a batch-1 forward gets when the other core runs one at the same time.

    This is the hardware's share of the gap between measured and ideal parallel latency: the
    ideal assumes a device is as fast next to a busy neighbour as alone.
    """
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    results = {}
    cores = sorted(os.sched_getaffinity(0))[:2]
    for label, used in (("alone", cores[:1]), ("together", cores)):
        queue = ctx.Queue()
        start_at = time.time() + 25
        workers = [
            ctx.Process(target=_probe_worker, args=(family, str(checkpoint), size, c, start_at, repeats, queue))
            for c in used
        ]
        for w in workers:
            w.start()
        measured = [queue.get(timeout=600) for _ in workers]
        for w in workers:
            w.join()
        results[label] = max(t for _, t in measured)
    results["slowdown"] = results["together"] / results["alone"]
    return results


def diffusers_all_cores(checkpoint: Path, guidance: float, prompts: list[int], steps: int, size: int, repeats: int):
    """diffusers' own pipeline (the class the folder names) with every core: what a user would run instead."""
    import torch
    from diffusers import DiffusionPipeline

    os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    pipe = DiffusionPipeline.from_pretrained(checkpoint)
    pipe.set_progress_bar_config(disable=True)

    def run(prompt: int):
        return pipe(
            PROMPTS[prompt], num_inference_steps=steps, guidance_scale=guidance, height=size, width=size,
            generator=torch.Generator("cpu").manual_seed(prompt), output_type="np",
        ).images[0]

    run(prompts[0])
    latencies = []
    for prompt in prompts:
        for _ in range(repeats):
            started = time.perf_counter()
            run(prompt)
            latencies.append(time.perf_counter() - started)
    return latencies, torch.get_num_threads()


def _stats(values: list[float]) -> dict:
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


def run_server_modes(client, protocol: str, family: str, guidance: float, args) -> list[Run]:
    runs = []
    base = {"steps": args.steps, "height": args.size, "width": args.size, "guidance_scale": guidance}
    generate(client, protocol, family, ["warm-up"], mode="hybrid", **{**base, "steps": 4})
    # Modes interleaved within each round, so the machine's drift (a shared VM here) hits all alike.
    ablation = [("hybrid", k) for k in ABLATION_K if k != 5]
    for round_index in range(args.repeats):
        for prompt in range(args.prompts):
            plan = [(mode, None) for mode in MODES] + (ablation if round_index == 0 else [])
            for mode, k in plan:
                fields = {**base, "mode": mode, "seed": prompt}
                if k is not None:
                    fields["k"] = k
                result = generate(client, protocol, family, [PROMPTS[prompt]], **fields)
                schedule = result.schedules[0]
                runs.append(Run(mode, prompt, k, result.latency_s, schedule, result.images[0]))
                k_label = "-" if k is None else k
                print(f"{family} {mode:12s} k={k_label:>2} prompt {prompt}: {result.latency_s:6.2f} s"
                      f" tau1={schedule['tau1']} tau2={schedule['tau2']}", flush=True)
    return runs


def summarize(runs: list[Run], components: ComponentTimes, diffusers_latencies: list[float], threads: int,
              steps: int) -> dict:
    serial = {r.prompt: r for r in runs if r.mode == "serial" and r.k is None}
    serial_latency = statistics.median(r.latency_s for r in runs if r.mode == "serial" and r.k is None)
    diffusers_latency = statistics.median(diffusers_latencies)
    rows = {}
    groups: dict[str, list[Run]] = {}
    for r in runs:
        key = r.mode if r.k is None else f"hybrid k={r.k}"
        groups.setdefault(key, []).append(r)
    for key, group in groups.items():
        latency = _stats([r.latency_s for r in group])
        ideal = statistics.median(components.ideal_latency(r.schedule) for r in group)
        overhead = [r.schedule["overhead_seconds"] / r.schedule["loop_seconds"] for r in group]
        moved = [(r.schedule["bytes_to_devices"] + r.schedule["bytes_from_devices"]) / 1e6 for r in group]
        fidelity_psnr = [psnr(serial[r.prompt].image, r.image) for r in group]
        fidelity_ssim = [ssim(serial[r.prompt].image, r.image) for r in group]
        rows[key] = {
            "latency_s": latency,
            "speedup_vs_serial": serial_latency / latency["median"],
            "speedup_vs_diffusers_all_cores": diffusers_latency / latency["median"],
            "ideal_latency_s": ideal,
            "parallel_efficiency": ideal / latency["median"],
            "overhead_per_step_ms": 1000 * statistics.median(r.schedule["overhead_seconds"] for r in group) / steps,
            "overhead_fraction_of_step": statistics.median(overhead),
            "mb_moved_per_image": statistics.median(moved),
            "psnr_vs_serial_db": statistics.median(fidelity_psnr),
            "ssim_vs_serial": statistics.median(fidelity_ssim),
            "tau1": sorted({r.schedule["tau1"] for r in group}, key=lambda v: (v is None, v)),
            "tau2": sorted({r.schedule["tau2"] for r in group}, key=lambda v: (v is None, v)),
            "phase_steps": group[0].schedule["phase_steps"],
        }
    return {
        "rows": rows,
        "diffusers_all_cores": {"latency_s": _stats(diffusers_latencies), "threads": threads},
        "components_s": {
            "text_encoder": components.text_encoder,
            "vae": components.vae,
            "full_batch1": components.full[1],
            "full_batch2": components.full[2],
            "stages_batch1": components.stages[1],
            "stages_batch2": components.stages[2],
        },
    }


def _fmt_db(value: float) -> str:
    return "inf (identical)" if value == float("inf") else f"{value:.1f}"


def markdown_table(family: str, summary: dict) -> list[str]:
    lines = [
        f"**{family}**",
        "",
        "| mode | latency median (min-max) | vs serial | vs diffusers, all cores | parallel efficiency "
        "| overhead / step | MB moved / image | PSNR vs serial (dB) | SSIM vs serial | tau1, tau2 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key, row in summary["rows"].items():
        lat = row["latency_s"]
        lines.append(
            f"| {key} | {lat['median']:.2f} s ({lat['min']:.2f}-{lat['max']:.2f}) | {row['speedup_vs_serial']:.2f}x "
            f"| {row['speedup_vs_diffusers_all_cores']:.2f}x | {row['parallel_efficiency']:.3f} "
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
    probe = summary.get("contention_batch1_s")
    if probe:
        lines.append(
            f"Batch efficiency: batch 2 takes {c['full_batch2'] / c['full_batch1']:.2f}x batch 1. Contention: a "
            f"batch-1 forward takes {probe['alone']:.3f} s alone and {probe['together']:.3f} s while the other "
            f"core runs one ({probe['slowdown']:.2f}x)."
        )
    return lines + [""]


def write_plot(summaries: dict[str, dict], path: Path) -> None:
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", help="a running server's HTTP host:port (default: start one)")
    parser.add_argument("--families", default="sdxl,sd3", help="comma-separated: sdxl, sd3")
    parser.add_argument("--checkpoints", type=Path, default=Path("checkpoints"))
    parser.add_argument("--checkpoint-size", default="small")
    parser.add_argument("--repository", type=Path, default=Path("model_repository"))
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--prompts", type=int, default=2, help=f"how many of the {len(PROMPTS)} built-in prompts")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("out/bench"))
    parser.add_argument("--contention-only", action="store_true", help="only run the contention probe")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    from hybridiff.families import get_family

    if args.contention_only:
        for family in args.families.split(","):
            print(family, contention_probe(family, args.checkpoints / f"{family}-{args.checkpoint_size}", args.size))
        return

    families = args.families.split(",")
    guidance = {f: get_family(f).defaults.guidance_scale for f in families}
    server = None
    if args.url is None:
        from hybridiff.tritonserver import TritonServer

        server = TritonServer(args.repository, ready_timeout=900).__enter__()
        url = server.http_url
    else:
        url = args.url
    runs: dict[str, list[Run]] = {}
    try:
        client = make_client("http", url, connection_timeout=3600, network_timeout=3600)
        for family in families:
            runs[family] = run_server_modes(client, "http", family, guidance[family], args)
        client.close()
    finally:
        if server is not None:
            server.__exit__(None, None, None)
    summaries = {}
    for family in families:
        checkpoint = args.checkpoints / f"{family}-{args.checkpoint_size}"
        components = measure_components(family, checkpoint, args.size, repeats=5)
        diffusers_latencies, threads = diffusers_all_cores(
            checkpoint, guidance[family], list(range(args.prompts)), args.steps, args.size, args.repeats
        )
        summaries[family] = summarize(runs[family], components, diffusers_latencies, threads, args.steps)
        summaries[family]["contention_batch1_s"] = contention_probe(family, checkpoint, args.size)
    machine = (f"{os.cpu_count()} cores ({_cpu_name()}), one core per device, `{args.checkpoint_size}` models, "
               f"{args.steps} steps, {args.size}x{args.size}, {args.prompts} prompts x {args.repeats} runs per mode")
    lines = [f"Measured on {machine} with `make bench`.", ""]
    for family, summary in summaries.items():
        lines += markdown_table(family, summary)
    (args.out / "bench.json").write_text(json.dumps({"machine": machine, **summaries}, indent=2, default=float))
    (args.out / "bench.md").write_text("\n".join(lines))
    write_plot(summaries, args.out / "bench.png")
    print("\n".join(lines))


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


if __name__ == "__main__":
    main()

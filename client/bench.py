"""Benchmark and fidelity harness: latency, speed-up, efficiency, overhead, bytes and PSNR/SSIM.

    python -m client.bench                      # starts a server on the small model
    python -m client.bench --url 127.0.0.1:8000 # or measures a running one

Sends the same prompts and seeds in every mode. Each round first times the pieces on one device in
this process (for the ideal latency of each mode) and runs diffusers' own pipeline with every core
(the single-process alternative), then sends that round's requests, modes interleaved. Speed-ups are
medians of ratios paired within a round and prompt, and each run's efficiency uses its own round's
timings: this VM's speed drifts by 10-30% over minutes, and only figures taken close together in
time compare like with like. Writes bench.json, bench.md and bench.png to --out. Every figure is
measured in this run; nothing is typed in.
"""

from __future__ import annotations

import argparse
import contextlib
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
    round: int
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
    # Batch-1 forward while the other core runs the same forwards: what a device of a 2-device mode
    # gets from the hardware. None where not measured.
    full1_beside_busy_core: float | None = None

    @property
    def contention(self) -> float:
        """How much slower a device computes while its twin computes too (1.0 = not at all)."""
        return 1.0 if self.full1_beside_busy_core is None else self.full1_beside_busy_core / self.full[1]

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


class OneDevice:
    """Times each piece alone on one core with one thread: the devices' conditions, without contention."""

    def __init__(self, family: str, checkpoint: Path, size: int) -> None:
        import torch

        from hybridiff.local import LocalPipeline
        from hybridiff.schedule import COND, UNCOND

        self.core = sorted(os.sched_getaffinity(0))[0]
        local = LocalPipeline(family, checkpoint, devices=1)
        self.local = local
        branches = local.branch_conditioning(PROMPTS[0], None)
        extra = local.sampler.extra_conditioning(size, size)
        side = size // local.sampler.vae_scale_factor
        self.latent = torch.randn(1, local.sampler.latent_channels, side, side)
        self.timestep = torch.tensor([500.0])
        self.conditioning = {}
        for batch, names in ((1, (COND,)), (2, (UNCOND, COND))):
            cond = {k: torch.cat([branches[b][k] for b in names]) for k in branches[COND]}
            cond.update({k: v.expand(batch, -1) for k, v in extra.items()})
            self.conditioning[batch] = cond

    @contextlib.contextmanager
    def pinned(self):
        """This process on the device's core with one torch thread, as a denoiser stub runs."""
        import torch

        previous = os.sched_getaffinity(0), torch.get_num_threads()
        os.sched_setaffinity(0, {self.core})
        torch.set_num_threads(1)
        try:
            yield
        finally:
            os.sched_setaffinity(0, previous[0])
            torch.set_num_threads(previous[1])

    def measure(self, repeats: int, neighbour: Neighbour | None = None) -> ComponentTimes:
        with self.pinned():
            times = self._measure(repeats)
            if neighbour is not None:
                with neighbour.busy():
                    times.full1_beside_busy_core = _median_time(lambda: self.forward(1), repeats)
            return times

    def ceiling(self, neighbour: Neighbour, rounds: int, repeats: int) -> list[tuple[float, float]]:
        """Per round, (serial step, cfg_parallel step) with no server at all: a batch-2 forward on this
        core alone, and batch-1 forwards on this core and the neighbour's started together, waiting
        for both. Their ratio is the most ``cfg_parallel`` can gain on this machine."""
        pairs = []
        with self.pinned():
            for _ in range(rounds):
                serial = _median_time(lambda: self.forward(2), repeats)
                lockstep = _median_time(lambda: neighbour.alongside(lambda: self.forward(1)), repeats)
                pairs.append((serial, lockstep))
        return pairs

    def forward(self, batch: int) -> None:
        """One whole-denoiser forward at ``batch`` (1: a CFG branch; 2: both, as ``serial`` runs)."""
        self.local.denoisers[0].run(self.latent, self.timestep, self.conditioning[batch])

    def _measure(self, repeats: int) -> ComponentTimes:
        import torch

        denoiser, latent, timestep = self.local.denoisers[0], self.latent, self.timestep
        full, stages = {}, {}
        for batch, cond in self.conditioning.items():
            full[batch] = _median_time(lambda b=batch: self.forward(b), repeats)
            head = denoiser.run(latent, timestep, cond, capture_stage=1).activations
            middle = denoiser.run(latent, timestep, cond, stage=0, stale=head).activations
            stage0 = _median_time(lambda c=cond, h=head: denoiser.run(latent, timestep, c, stage=0, stale=h), repeats)
            stage1 = _median_time(lambda c=cond, m=middle: denoiser.run(latent, timestep, c, stage=1, stale=m), repeats)
            stages[batch] = (stage0, stage1)
        text = _median_time(lambda: self.local.text_encoder.encode([PROMPTS[0]], None), repeats)
        final = torch.randn(latent.shape)
        vae = _median_time(lambda: self.local.decoder.decode(final), repeats)
        return ComponentTimes(text, vae, full, stages)


def _neighbour_loop(family: str, checkpoint: str, size: int, core: int, commands, replies, stop) -> None:
    """Child process on ``core``: batch-1 forwards from each "run" command until ``stop`` is set, or
    one forward per "step" command."""
    import torch

    os.sched_setaffinity(0, {core})
    torch.set_num_threads(1)
    device = OneDevice(family, Path(checkpoint), size)
    device.forward(1)
    replies.put("ready")
    while (command := commands.get()) in ("run", "step"):
        if command == "step":  # one forward, in lockstep with the caller's
            device.forward(1)
            replies.put("done")
            continue
        replies.put("running")
        while not stop.is_set():
            device.forward(1)
        replies.put("stopped")


class Neighbour:
    """A process on the other core that computes batch-1 forwards on demand: the twin device of a
    2-device mode. Timing a forward beside it measures how much the two cores slow each other (a
    shared VM's vCPUs may share a physical core or its caches); the ideal latency assumes they do not.
    """

    def __init__(self, family: str, checkpoint: Path, size: int) -> None:
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")
        self.commands, self.replies, self.stop = ctx.Queue(), ctx.Queue(), ctx.Event()
        cores = sorted(os.sched_getaffinity(0))
        core = cores[1 % len(cores)]
        self.process = ctx.Process(
            target=_neighbour_loop,
            args=(family, str(checkpoint), size, core, self.commands, self.replies, self.stop),
            daemon=True,
        )
        self.process.start()
        if self.replies.get(timeout=600) != "ready":
            raise RuntimeError("the neighbour process did not start")

    @contextlib.contextmanager
    def busy(self):
        self.stop.clear()
        self.commands.put("run")
        self.replies.get(timeout=60)
        time.sleep(0.5)  # let it get into its first forward
        try:
            yield
        finally:
            self.stop.set()
            self.replies.get(timeout=600)

    def alongside(self, forward) -> None:
        """One batch-1 forward here while ``forward`` runs in the caller; returns when both are done."""
        self.commands.put("step")
        forward()
        if self.replies.get(timeout=600) != "done":
            raise RuntimeError("the neighbour process did not finish its step")

    def close(self) -> None:
        self.commands.put("quit")
        self.process.join(timeout=60)


@contextlib.contextmanager
def _device_and_neighbour(family: str, checkpoint: Path, size: int):
    """The two machine probes' set-up: this process as device 0, a neighbour process as device 1."""
    neighbour = Neighbour(family, checkpoint, size)
    try:
        yield OneDevice(family, checkpoint, size), neighbour
    finally:
        neighbour.close()


class DiffusersAllCores:
    """diffusers' own pipeline (the class the folder names) with every core: what a user would run instead."""

    def __init__(self, checkpoint: Path, guidance: float, steps: int, size: int) -> None:
        from diffusers import DiffusionPipeline

        from hybridiff.host_memory import keep_freed_memory

        keep_freed_memory()  # the same allocator settings as the server's stubs: a like-for-like baseline
        self.pipe = DiffusionPipeline.from_pretrained(checkpoint)
        self.pipe.set_progress_bar_config(disable=True)
        self.guidance, self.steps, self.size = guidance, steps, size
        self.threads = len(os.sched_getaffinity(0))
        self.warm = False

    def _run(self, prompt: int) -> None:
        import torch

        self.pipe(
            PROMPTS[prompt], num_inference_steps=self.steps, guidance_scale=self.guidance, height=self.size,
            width=self.size, generator=torch.Generator("cpu").manual_seed(prompt), output_type="np",
        )

    def latency(self, prompt: int) -> float:
        import torch

        previous = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            if not self.warm:
                self._run(prompt)
                self.warm = True
            started = time.perf_counter()
            self._run(prompt)
            return time.perf_counter() - started
        finally:
            torch.set_num_threads(previous)


def ceiling_summary(pairs: list[tuple[float, float]]) -> dict:
    """The ``cfg_parallel`` ceiling from (serial step, lockstep step) pairs: per round and the median."""
    ratios = [serial / lockstep for serial, lockstep in pairs]
    return {"per_round": ratios, "median": statistics.median(ratios)}


def _stats(values: list[float]) -> dict:
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


def run_round(client, protocol: str, family: str, guidance: float, round_index: int, args) -> list[Run]:
    """Every mode for every prompt, interleaved, so the machine's drift hits all modes alike."""
    runs = []
    base = {"steps": args.steps, "height": args.size, "width": args.size, "guidance_scale": guidance}
    ablation = [("hybrid", k) for k in ABLATION_K if k != 5]
    for prompt in range(args.prompts):
        plan = [(mode, None) for mode in MODES] + (ablation if round_index == 0 else [])
        for mode, k in plan:
            fields = {**base, "mode": mode, "seed": prompt}
            if k is not None:
                fields["k"] = k
            result = generate(client, protocol, family, [PROMPTS[prompt]], **fields)
            schedule = result.schedules[0]
            runs.append(Run(mode, round_index, prompt, k, result.latency_s, schedule, result.images[0]))
            k_label = "-" if k is None else k
            print(f"{family} round {round_index} {mode:12s} k={k_label:>2} prompt {prompt}: "
                  f"{result.latency_s:6.2f} s tau1={schedule['tau1']} tau2={schedule['tau2']}", flush=True)
    return runs


def summarize(runs: list[Run], components: list[ComponentTimes], diffusers: dict[tuple[int, int], float],
              threads: int, steps: int) -> dict:
    """Per mode: medians over runs; speed-ups paired with the serial (diffusers) run of the same round
    and prompt; efficiency against the ideal from the same round's one-device timings."""
    serial = {(r.round, r.prompt): r for r in runs if r.mode == "serial" and r.k is None}
    rows = {}
    groups: dict[str, list[Run]] = {}
    for r in runs:
        key = r.mode if r.k is None else f"hybrid k={r.k}"
        groups.setdefault(key, []).append(r)
    for key, group in groups.items():
        overhead = [r.schedule["overhead_seconds"] / r.schedule["loop_seconds"] for r in group]
        moved = [(r.schedule["bytes_to_devices"] + r.schedule["bytes_from_devices"]) / 1e6 for r in group]
        rows[key] = {
            "latency_s": _stats([r.latency_s for r in group]),
            "speedup_vs_serial": statistics.median(serial[r.round, r.prompt].latency_s / r.latency_s for r in group),
            "speedup_vs_diffusers_all_cores": statistics.median(diffusers[r.round, r.prompt] / r.latency_s
                                                                for r in group),
            "ideal_latency_s": statistics.median(components[r.round].ideal_latency(r.schedule) for r in group),
            "parallel_efficiency": statistics.median(components[r.round].ideal_latency(r.schedule) / r.latency_s
                                                     for r in group),
            # The same, with the ideal slowed by the round's measured contention where two devices compute.
            "efficiency_net_of_contention": statistics.median(
                components[r.round].ideal_latency(r.schedule)
                * (1.0 if r.schedule["mode_run"] == "serial" else components[r.round].contention)
                / r.latency_s
                for r in group
            ),
            "overhead_per_step_ms": 1000 * statistics.median(r.schedule["overhead_seconds"] for r in group) / steps,
            "overhead_fraction_of_step": statistics.median(overhead),
            "mb_moved_per_image": statistics.median(moved),
            "psnr_vs_serial_db": statistics.median(psnr(serial[r.round, r.prompt].image, r.image) for r in group),
            "ssim_vs_serial": statistics.median(ssim(serial[r.round, r.prompt].image, r.image) for r in group),
            "tau1": sorted({r.schedule["tau1"] for r in group}, key=lambda v: (v is None, v)),
            "tau2": sorted({r.schedule["tau2"] for r in group}, key=lambda v: (v is None, v)),
            "phase_steps": group[0].schedule["phase_steps"],
        }

    def median_of(pick) -> float | tuple[float, float]:
        values = [pick(c) for c in components]
        if isinstance(values[0], tuple):
            return tuple(statistics.median(v[i] for v in values) for i in range(len(values[0])))
        return statistics.median(values)

    return {
        "rows": rows,
        "diffusers_all_cores": {"latency_s": _stats(list(diffusers.values())), "threads": threads},
        "components_s": {
            "text_encoder": median_of(lambda c: c.text_encoder),
            "vae": median_of(lambda c: c.vae),
            "full_batch1": median_of(lambda c: c.full[1]),
            "full_batch2": median_of(lambda c: c.full[2]),
            "batch2_over_batch1": median_of(lambda c: c.full[2] / c.full[1]),
            "stages_batch1": median_of(lambda c: c.stages[1]),
            "stages_batch2": median_of(lambda c: c.stages[2]),
            "full_batch1_beside_busy_core": median_of(lambda c: c.full1_beside_busy_core or c.full[1]),
            "contention": median_of(lambda c: c.contention),
            "contention_per_round": [c.contention for c in components],
        },
    }


def _fmt_db(value: float) -> str:
    return "inf (identical)" if value == float("inf") else f"{value:.1f}"


def markdown_table(family: str, summary: dict) -> list[str]:
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
    parser.add_argument("--ceiling-only", action="store_true",
                        help="only measure the machine's cfg_parallel ceiling, without a server")
    parser.add_argument("--ceiling-rounds", type=int, default=6)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    from hybridiff.families import get_family

    families = args.families.split(",")
    checkpoints = {f: args.checkpoints / f"{f}-{args.checkpoint_size}" for f in families}
    if args.contention_only or args.ceiling_only:
        for family in families:
            with _device_and_neighbour(family, checkpoints[family], args.size) as (device, neighbour):
                if args.contention_only:
                    times = device.measure(repeats=6, neighbour=neighbour)
                    print(f"{family}: batch-1 forward {times.full[1]:.3f} s alone, "
                          f"{times.full1_beside_busy_core:.3f} s beside a busy core ({times.contention:.2f}x)")
                if args.ceiling_only:
                    pairs = device.ceiling(neighbour, args.ceiling_rounds, repeats=5)
                    summary = ceiling_summary(pairs)
                    rounds = ", ".join(f"{serial:.3f}/{lockstep:.3f}" for serial, lockstep in pairs)
                    print(f"{family}: serial step / cfg_parallel lockstep step per round (s): {rounds}")
                    print(f"{family}: cfg_parallel ceiling without a server: {summary['median']:.2f}x median "
                          f"(per round {', '.join(f'{r:.2f}' for r in summary['per_round'])})")
        return

    guidance = {f: get_family(f).defaults.guidance_scale for f in families}
    one_device = {f: OneDevice(f, checkpoints[f], args.size) for f in families}
    neighbours = {f: Neighbour(f, checkpoints[f], args.size) for f in families}
    alternative = {f: DiffusersAllCores(checkpoints[f], guidance[f], args.steps, args.size) for f in families}
    server = None
    if args.url is None:
        from tools.triton_process import TritonServer

        server = TritonServer(args.repository, ready_timeout=900).__enter__()
        url = server.http_url
    else:
        url = args.url
    runs: dict[str, list[Run]] = {f: [] for f in families}
    components: dict[str, list[ComponentTimes]] = {f: [] for f in families}
    diffusers: dict[str, dict[tuple[int, int], float]] = {f: {} for f in families}
    try:
        client = make_client("http", url, connection_timeout=3600, network_timeout=3600)
        for family in families:
            warm = {"steps": 4, "height": args.size, "width": args.size}
            generate(client, "http", family, ["warm-up"], mode="hybrid", **warm)
        for round_index in range(args.repeats):
            for family in families:
                components[family].append(one_device[family].measure(repeats=5, neighbour=neighbours[family]))
                for prompt in range(args.prompts):
                    diffusers[family][round_index, prompt] = alternative[family].latency(prompt)
                runs[family] += run_round(client, "http", family, guidance[family], round_index, args)
        client.close()
    finally:
        if server is not None:
            server.__exit__(None, None, None)
        for neighbour in neighbours.values():
            neighbour.close()
    summaries = {}
    for family in families:
        threads = alternative[family].threads
        summaries[family] = summarize(runs[family], components[family], diffusers[family], threads, args.steps)
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

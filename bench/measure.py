"""The benchmark's measurements: pieces timed on one core, the neighbour core, diffusers' own pipeline, and
the served requests.

Each is a record for :mod:`bench.stats`; nothing here computes a figure from them. The machine probes run
in this process (pinned like a denoiser stub) and in one spawned neighbour process on the other core.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from bench.stats import ComponentTimes, Run
from client.generate import generate

PROMPTS = [
    "a lighthouse on a cliff at sunset, oil painting",
    "a red fox sitting in fresh snow, photograph",
    "a futuristic city street at night with neon signs",
]
MODES = ["serial", "cfg_parallel", "pipeline", "hybrid"]
ABLATION_K = [0, 5, 10, 20]


def _median_time(fn: Callable[[], object], repeats: int) -> float:
    """Median of ``repeats`` timed calls after one untimed warm-up call."""
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
        extra = local.latent_math.extra_conditioning(size, size)
        side = size // local.latent_math.vae_scale_factor
        self.latent = torch.randn(1, local.latent_math.latent_channels, side, side)
        self.timestep = torch.tensor([500.0])
        self.conditioning = {}
        for batch, names in ((1, (COND,)), (2, (UNCOND, COND))):
            cond = {k: torch.cat([branches[b][k] for b in names]) for k in branches[COND]}
            cond.update({k: v.expand(batch, -1) for k, v in extra.items()})
            self.conditioning[batch] = cond

    @contextlib.contextmanager
    def pinned(self) -> Iterator[None]:
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
    def busy(self) -> Iterator[None]:
        """The neighbour computes batch-1 forwards for as long as the block runs."""
        self.stop.clear()
        self.commands.put("run")
        self.replies.get(timeout=60)
        time.sleep(0.5)  # let it get into its first forward
        try:
            yield
        finally:
            self.stop.set()
            self.replies.get(timeout=600)

    def alongside(self, forward: Callable[[], object]) -> None:
        """One batch-1 forward here while ``forward`` runs in the caller; returns when both are done."""
        self.commands.put("step")
        forward()
        if self.replies.get(timeout=600) != "done":
            raise RuntimeError("the neighbour process did not finish its step")

    def close(self) -> None:
        """Ask the neighbour to quit and wait for it."""
        self.commands.put("quit")
        self.process.join(timeout=60)


@contextlib.contextmanager
def device_and_neighbour(family: str, checkpoint: Path, size: int) -> Iterator[tuple[OneDevice, Neighbour]]:
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


def run_round(client, protocol: str, family: str, guidance: float, round_index: int, *, steps: int, size: int,
              prompts: int) -> list[Run]:
    """Every mode for every prompt, interleaved, so the machine's drift hits all modes alike."""
    runs = []
    base = {"steps": steps, "height": size, "width": size, "guidance_scale": guidance}
    ablation = [("hybrid", k) for k in ABLATION_K if k != 5]
    for prompt in range(prompts):
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

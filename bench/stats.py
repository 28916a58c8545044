"""The benchmark's statistics: the records a run measures, the ideal-latency model and the per-mode summary.

Pure Python on numbers and images (no torch, no server), so every figure's arithmetic is unit-tested.
Speed-ups are medians of ratios paired within a round and prompt, and each run's efficiency uses its own
round's one-device timings: the machine's speed drifts over minutes, and only figures taken close
together in time compare like with like.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from bench.quality import psnr, ssim


@dataclass
class Run:
    """One served request as the benchmark saw it."""

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


def _tau_values(group: list[Run], name: str) -> list[int | None]:
    return sorted({r.schedule[name] for r in group}, key=lambda v: (v is None, v))


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
            "tau1": _tau_values(group, "tau1"),
            "tau2": _tau_values(group, "tau2"),
            "phase_steps": group[0].schedule["phase_steps"],
        }

    def median_of(pick: Callable[[ComponentTimes], float | tuple[float, ...]]) -> float | tuple[float, ...]:
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

"""The benchmark's ideal-latency model (the denominator of parallel efficiency) and its machine probes."""

import pytest

from bench.measure import Neighbour, OneDevice
from bench.stats import ComponentTimes, ceiling_summary

TIMES = ComponentTimes(text_encoder=0.1, vae=0.2, full={1: 1.0, 2: 2.0}, stages={1: (0.4, 0.6), 2: (0.9, 1.1)})


def schedule(mode: str, phases: list[str]) -> dict:
    return {"mode_run": mode, "phases": phases}


@pytest.mark.parametrize(
    "mode,phases,expected",
    [
        ("serial", ["serial"] * 3, 0.3 + 3 * 2.0),
        ("cfg_parallel", ["partition"] * 3, 0.3 + 3 * 1.0),
        # hybrid: partition and warm-up cost a batch-1 pass; a pipeline step the slower stage
        ("hybrid", ["partition", "warmup", "pipeline", "pipeline", "partition"], 0.3 + 3 * 1.0 + 2 * 0.6),
        # pipeline mode keeps the CFG batch: warm-up is a batch-2 pass, a step the slower batch-2 stage
        ("pipeline", ["warmup", "pipeline", "pipeline"], 0.3 + 2.0 + 2 * 1.1),
    ],
)
def test_ideal_latency(mode, phases, expected):
    assert TIMES.ideal_latency(schedule(mode, phases)) == pytest.approx(expected)


def test_speedups_and_efficiency_are_paired_within_a_round():
    """The machine is 2x slower in round 1, and the k ablation runs in round 0 only: its speed-ups must
    come from round 0's serial and diffusers runs (2.0x, 1.2x), not from medians pooled over both
    rounds (3.0x, 1.8x)."""
    import numpy as np

    from bench.stats import Run, summarize

    image = np.zeros((8, 8, 3), dtype=np.uint8)
    runs, components, diffusers = [], [], {}

    def add(mode, round_index, k, phase, latency):
        sched = {"mode_run": mode, "phases": [phase] * 10, "overhead_seconds": 0.0, "loop_seconds": 1.0,
                 "bytes_to_devices": 0, "bytes_from_devices": 0, "tau1": None, "tau2": None,
                 "phase_steps": {phase: 10}}
        runs.append(Run(mode, round_index, 0, k, latency, sched, image))

    for round_index, slowdown in enumerate((1.0, 2.0)):
        # Beside a busy core a forward takes 1.25x as long (the vCPUs share a physical core).
        components.append(ComponentTimes(0.0, 0.0, {1: 0.1 * slowdown, 2: 0.2 * slowdown}, TIMES.stages,
                                         full1_beside_busy_core=0.125 * slowdown))
        diffusers[round_index, 0] = 1.5 * slowdown
        add("serial", round_index, None, "serial", 2.5 * slowdown)
        add("cfg_parallel", round_index, None, "partition", 1.25 * slowdown)
    add("hybrid", 0, 0, "partition", 1.25)
    rows = summarize(runs, components, diffusers, threads=2, steps=10)["rows"]
    for key in ("cfg_parallel", "hybrid k=0"):
        assert rows[key]["speedup_vs_serial"] == pytest.approx(2.0)
        assert rows[key]["speedup_vs_diffusers_all_cores"] == pytest.approx(1.2)
        assert rows[key]["parallel_efficiency"] == pytest.approx(0.8)  # 10 x 0.1 / 1.25, per round
        assert rows[key]["efficiency_net_of_contention"] == pytest.approx(1.0)  # 10 x 0.125 / 1.25
    assert rows["serial"]["parallel_efficiency"] == pytest.approx(0.8)
    assert rows["serial"]["efficiency_net_of_contention"] == pytest.approx(0.8)  # one device: no twin


def test_contention_defaults_to_none_measured():
    assert TIMES.contention == 1.0


def test_ceiling_is_the_serial_step_over_the_lockstep_step_per_round():
    summary = ceiling_summary([(2.0, 1.0), (1.8, 1.2), (2.1, 1.0)])
    assert summary["per_round"] == pytest.approx([2.0, 1.5, 2.1])
    assert summary["median"] == pytest.approx(2.0)


def test_lockstep_probe_runs_a_forward_on_each_core_and_waits_for_both(sdxl_tiny):
    """The probe's protocol with a real second process (tiny model): one pair per round, both steps
    timed, and the neighbour still serves the contention probe afterwards."""
    neighbour = Neighbour("sdxl", sdxl_tiny, 64)
    try:
        device = OneDevice("sdxl", sdxl_tiny, 64)
        pairs = device.ceiling(neighbour, rounds=2, repeats=1)
        assert len(pairs) == 2 and all(serial > 0 and lockstep > 0 for serial, lockstep in pairs)
        times = device.measure(repeats=1, neighbour=neighbour)
        assert times.full1_beside_busy_core is not None
    finally:
        neighbour.close()
    neighbour.process.join(timeout=60)
    assert neighbour.process.exitcode == 0

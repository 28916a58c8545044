"""The benchmark's ideal-latency model (the denominator of parallel efficiency)."""

import pytest

from client.bench import ComponentTimes

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

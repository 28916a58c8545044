"""The deadline-aware auto policy on given loads (plain Python)."""

from __future__ import annotations

import pytest

from hybridiff.deadline import Costs, choose, give_back, overlap_latency
from hybridiff.schedule import Mode

COSTS = Costs(step_s=0.1, parallel_speedup=1.6, batch_gain=1.5)  # 20 steps alone: 2.0 s serial, 1.25 s split


def test_two_idle_devices_are_split():
    choice = choose(20, deadline_s=3.0, remaining_steps=[[], []], costs=COSTS)
    assert choice.mode is Mode.HYBRID and choice.devices == (0, 1)
    assert choice.predicted_s == pytest.approx(1.25)


def test_no_guidance_or_one_device_runs_serial():
    assert choose(20, 3.0, [[], []], COSTS, guidance=False).mode is Mode.SERIAL
    assert choose(20, 3.0, [[]], COSTS).devices == (0,)


def test_a_busy_pair_gets_serial_on_the_device_that_finishes_it_first_when_that_meets_the_deadline():
    # Device 0 runs a request with 15 steps left, device 1 one with 2 steps left: device 1 is better.
    choice = choose(20, deadline_s=3.0, remaining_steps=[[15], [2]], costs=COSTS)
    assert choice.mode is Mode.SERIAL and choice.devices == (1,)
    assert choice.predicted_s == pytest.approx(2.0 + (2 / 1.5 - 1) * 0.2)


def test_both_devices_when_serial_would_miss_and_splitting_would_not():
    # Each device has a short neighbour; serial (about 2.07 s) misses a 1.5 s deadline, splitting makes it.
    choice = choose(20, deadline_s=1.5, remaining_steps=[[2], [2]], costs=COSTS)
    assert choice.mode is Mode.CFG_PARALLEL and choice.devices == (0, 1)
    assert choice.predicted_s <= 1.5


def test_nothing_meets_the_deadline_takes_the_fastest():
    choice = choose(20, deadline_s=0.5, remaining_steps=[[30, 30], [30]], costs=COSTS)
    assert choice.predicted_s == min(
        overlap_latency(2.0, [3.0], COSTS),
        max(overlap_latency(1.25, [3.0, 3.0], COSTS), overlap_latency(1.25, [3.0], COSTS)),
    )


def test_without_a_deadline_a_busy_server_runs_serial_on_the_least_busy_device():
    choice = choose(20, None, [[10, 10], [5]], COSTS)
    assert choice.mode is Mode.SERIAL and choice.devices == (1,)


def test_ties_go_to_the_lower_device():
    assert choose(20, 5.0, [[4], [4]], COSTS).devices == (0,)


def test_overlap_counts_only_the_time_both_run():
    assert overlap_latency(2.0, [], COSTS) == 2.0
    assert overlap_latency(2.0, [0.5], COSTS) == pytest.approx(2.0 + 0.5 / 3)
    assert overlap_latency(2.0, [10.0], COSTS) == pytest.approx(2.0 + 2.0 / 3)


def test_a_split_run_gives_a_device_back_only_when_that_saves_the_newcomers_deadline():
    # Newcomer: 20 steps (2.0 s alone). The split run has 16 steps left (1.0 s at its two-device speed).
    assert give_back(16, 20, newcomer_deadline_s=2.2, costs=COSTS)  # shared: 2.33 s > 2.2 >= 2.0
    assert not give_back(16, 20, newcomer_deadline_s=3.0, costs=COSTS)  # meets it anyway
    assert not give_back(16, 20, newcomer_deadline_s=1.5, costs=COSTS)  # misses it anyway
    assert not give_back(1, 20, newcomer_deadline_s=2.05, costs=COSTS)  # almost done: a 0.02 s delay

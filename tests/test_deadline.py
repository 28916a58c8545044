"""The deadline-aware auto policy on given loads, and the cost arithmetic it rests on (plain Python)."""

from __future__ import annotations

import pytest

from hybridiff import deadline
from hybridiff.deadline import (
    BoardView,
    Costs,
    Running,
    StepSample,
    arrival_refusal,
    choose,
    costs_from,
    grow_device,
    keeps_pair,
    learn,
    overlap_latency,
    place,
    predict,
    pushes_late,
    refusal,
    running_from,
    view_of,
    yield_device,
    yields,
)
from hybridiff.inflight import Snapshot
from hybridiff.schedule import GuidanceSchedule, HybridKnobs, Mode, NoDeviceLeft, Placement

# The deadlines below are worked out with a 10% margin on predictions; the margin the server uses is tuned by
# measurement (docs/overload.md) and tested on its own (test_the_margin_on_predictions_decides_what_meets).
MARGIN = 1.1


@pytest.fixture(autouse=True)
def _margin(monkeypatch):
    monkeypatch.setattr(deadline, "DEADLINE_MARGIN", MARGIN)

COSTS = Costs(step_s=0.1, parallel_speedup=1.6, batch_gain=1.5)  # 20 steps alone: 2.0 s serial, 1.25 s split
# Splitting no faster than serial: nothing grows onto an idle device, so serial choices are priced alone.
NO_GROW = Costs(step_s=0.1, parallel_speedup=1.0, batch_gain=1.5)
KNOBS = HybridKnobs(window=3, eps_slope=0.4e-3, k=4, tau_cap=10)


def serial(device: int, steps: int, deadline_s: float | None = None) -> Running:
    return Running((device,), COSTS.seconds(steps, 1), deadline_s)


def split(steps: int, may_yield: bool = True) -> Running:
    return Running((0, 1), COSTS.seconds(steps, 2), None, may_yield)


def test_two_idle_devices_are_split():
    choice = choose(20, deadline_s=3.0, running=[], costs=COSTS, num_devices=2)
    assert choice.mode is Mode.HYBRID and choice.devices == (0, 1)
    assert choice.predicted_s == pytest.approx(1.25)


def test_equal_predictions_go_to_the_device_with_less_work_left():
    # Both neighbours outlast the newcomer (equal overlap), or batching looks free (batch gain 2).
    assert choose(20, None, [serial(0, 60), serial(1, 30)], COSTS, 2).devices == (1,)
    free = Costs(step_s=0.1, parallel_speedup=1.0, batch_gain=2.0)
    running = [Running((0,), 6.0), Running((1,), 0.5)]
    assert choose(20, None, running, free, 2).devices == (1,)


def test_no_guidance_or_one_device_runs_serial():
    assert choose(20, 3.0, [], COSTS, 2, guidance=False).mode is Mode.SERIAL
    assert choose(20, 3.0, [], COSTS, 1).devices == (0,)


def test_a_busy_pair_gets_serial_on_the_device_that_finishes_it_first_when_that_meets_the_deadline():
    # Device 0 runs a request with 15 steps left, device 1 one with 2 steps left: device 1 is better,
    # although both run one request (the count rule would take device 0).
    choice = choose(20, deadline_s=3.0, running=[serial(0, 15), serial(1, 2)], costs=NO_GROW, num_devices=2)
    assert choice.mode is Mode.SERIAL and choice.devices == (1,)
    assert choice.predicted_s == pytest.approx(2.0 + (2 / 1.5 - 1) * 0.2)


def test_both_devices_when_serial_would_miss_and_splitting_would_not():
    # Each device has a neighbour with 0.8 s left; serial misses a 1.7 s deadline even growing onto the
    # first device to free (0.8 s, then split: 1.61 s, with the 10% margin), splitting now (1.52 s) makes it.
    choice = choose(20, deadline_s=1.7, running=[serial(0, 8), serial(1, 8)], costs=COSTS, num_devices=2)
    assert choice.mode is Mode.CFG_PARALLEL and choice.devices == (0, 1)
    assert choice.predicted_s == pytest.approx(1.25 + 0.8 / 3)


def test_nothing_meets_the_deadline_takes_the_fastest():
    choice = choose(20, deadline_s=0.5, running=[serial(0, 30), serial(0, 30), serial(1, 30)], costs=COSTS,
                    num_devices=2)
    assert choice.predicted_s == min(
        overlap_latency(2.0, [3.0], COSTS),
        max(overlap_latency(1.25, [3.0, 3.0], COSTS), overlap_latency(1.25, [3.0], COSTS)),
    )


def test_without_a_deadline_a_busy_server_runs_serial_on_the_least_busy_device():
    choice = choose(20, None, [serial(0, 10), serial(0, 10), serial(1, 5)], COSTS, 2)
    assert choice.mode is Mode.SERIAL and choice.devices == (1,)


def test_ties_go_to_the_lower_device_and_down_devices_are_never_chosen():
    assert choose(20, 5.0, [serial(0, 4), serial(1, 4)], COSTS, 2).devices == (0,)
    assert choose(20, 5.0, [], COSTS, 2, up=[False, True]).devices == (1,)
    with pytest.raises(NoDeviceLeft):
        choose(20, 5.0, [], COSTS, 2, up=[False, False])


def test_a_split_run_that_would_give_a_device_back_is_not_counted_against_the_newcomer():
    # The split run has 16 steps left (1.0 s at two-device speed): it yields, going on serially (1.6 s)
    # on the other device, so the newcomer is priced alone there, then grown onto both: 1.6 + 0.4 / 1.6.
    choice = choose(20, 2.2, [split(16)], COSTS, 2)
    assert choice.mode is Mode.SERIAL and choice.predicted_s == pytest.approx(1.85)
    # An explicit hybrid (cannot yield) is counted: sharing device 0 for its 1.0 s (2.0 + 1/3 s alone there),
    # then split over both once it ends.
    pinned = choose(20, 2.2, [split(16, may_yield=False)], COSTS, 2)
    shared = 2.0 + 1.0 / 3
    assert pinned.mode is Mode.SERIAL
    assert pinned.predicted_s == pytest.approx(1.0 + 2.0 * (1 - 1.0 / shared) / 1.6)


def test_a_serial_newcomer_is_priced_with_growing_onto_the_first_device_to_free():
    # Device 1 frees after 0.5 s: 0.5 s serial, then the other 1.5 s of work split (1.6x): 1.44 s in all.
    choice = choose(20, 1.6, [serial(0, 60), serial(1, 5)], Costs(step_s=0.1, batch_gain=2.0), 2)
    assert choice.mode is Mode.SERIAL and choice.devices == (0,)
    assert choice.predicted_s == pytest.approx(0.5 + 1.5 / 1.6) and choice.meets
    # Requests waiting to be placed take device 1 when it frees: serial is not counted on to grow (2.0 s,
    # the deadline missed), so both devices are taken now (1.25 s; sharing is free at this batching gain).
    queued = choose(20, 1.6, [serial(0, 60), serial(1, 5)], Costs(step_s=0.1, batch_gain=2.0), 2, queued=True)
    assert queued.mode is Mode.CFG_PARALLEL and queued.predicted_s == pytest.approx(1.25) and queued.meets
    # Splitting measured no faster: no growth, 2.0 s on either device, the 1.6 s deadline missed.
    assert not choose(20, 1.6, [serial(0, 60), serial(1, 5)], Costs(step_s=0.1, parallel_speedup=1.0,
                                                                     batch_gain=2.0), 2).meets


def test_overlap_counts_only_the_time_both_run():
    assert overlap_latency(2.0, [], COSTS) == 2.0
    assert overlap_latency(2.0, [0.5], COSTS) == pytest.approx(2.0 + 0.5 / 3)
    assert overlap_latency(2.0, [10.0], COSTS) == pytest.approx(2.0 + 2.0 / 3)


def test_a_split_run_keeps_both_devices_only_when_going_on_serially_would_make_it_late():
    # 1.0 s left at its two-device speed is 1.6 s serially.
    assert not keeps_pair(Running((0, 1), 1.0, None, True), COSTS)  # no deadline: give way
    assert not keeps_pair(Running((0, 1), 1.0, 2.0, True), COSTS)  # serially in time
    assert keeps_pair(Running((0, 1), 1.0, 1.2, True), COSTS)  # serially late, split in time
    assert not keeps_pair(Running((0, 1), 1.0, 0.8, True), COSTS)  # late either way
    assert yields(Running((0, 1), 1.0, None, True), COSTS)
    assert not yields(Running((0, 1), 1.0, None, False), COSTS)  # an explicit split run never yields
    assert not yields(Running((0,), 1.0, None, True), COSTS)  # nothing to give back


# --- costs learned online ----------------------------------------------------------------------------


def test_costs_are_learned_from_steps_as_moving_averages():
    estimate: dict[str, float] = {}
    assert costs_from(estimate) is None  # nothing measured: no numbers, the count rule applies
    learn(estimate, StepSample("split", 1, wall_s=0.5, compute_s=0.4))
    assert costs_from(estimate) is None  # a split step alone says nothing of a serial one
    learn(estimate, StepSample("serial", 1, wall_s=1.0, compute_s=0.8))
    learn(estimate, StepSample("serial", 1, wall_s=2.0, compute_s=0.8), alpha=0.5)
    learn(estimate, StepSample("serial", 2, wall_s=9.0, compute_s=1.2))  # shared by two: the batching gain
    learn(estimate, StepSample("serial", 3, wall_s=9.0, compute_s=9.0))  # three: not learned
    learn(estimate, StepSample("pipeline", 1, wall_s=9.0, compute_s=9.0))
    learn(estimate, StepSample("serial", 1, wall_s=9.0, compute_s=0.8), alone=False)  # waited for a neighbour
    learn(estimate, StepSample("split", 1, wall_s=9.0, compute_s=0.4), alone=False)
    costs = costs_from(estimate)
    assert costs.step_s == pytest.approx(1.5)
    assert costs.parallel_speedup == 2.0  # 1.5 / 0.5, kept in [1, 2]
    assert costs.batch_gain == pytest.approx(2 * 0.8 / 1.2)


def test_the_cost_of_sharing_a_device_is_learned_as_it_happens():
    """Two requests stepping in alternation rarely meet in the batcher's queue: each step then waits for the
    other's, and sharing costs twice the device time, whatever a merged pass would have cost."""
    estimate: dict[str, float] = {}
    learn(estimate, StepSample("serial", 1, wall_s=1.0, compute_s=0.8))
    learn(estimate, StepSample("serial", 2, wall_s=1.3, compute_s=1.2), alone=False)  # one merged pass
    assert costs_from(estimate).batch_gain == pytest.approx(2 * 0.8 / 1.2)  # only the merged pass known
    learn(estimate, StepSample("serial", 1, wall_s=2.0, compute_s=0.8), alone=False, pair=True)  # in turn
    costs = costs_from(estimate)
    assert costs.batch_gain == pytest.approx(1.0) and costs.overlap_cost == pytest.approx(1.0)
    assert costs.step_s == pytest.approx(1.0)  # a shared step is not a step alone


def test_learned_ratios_are_kept_in_their_range():
    costs = costs_from({"serial": 1.0, "split": 2.0, "serial_compute": 1.0, "pair_compute": 0.5})
    assert costs.parallel_speedup == 1.0 and costs.batch_gain == 2.0


def test_board_jobs_become_seconds_left_at_their_own_size_and_speed():
    estimates = {"sdxl:64x64": {"serial": 0.1}, "sdxl:128x128": {"serial": 0.4, "split": 0.25}}
    jobs = {
        "a": {"devices": [0], "steps_left": 10, "cost_key": "sdxl:64x64", "deadline": 105.0},
        "b": {"devices": [0, 1], "steps_left": 4, "cost_key": "sdxl:128x128", "deadline": None, "may_yield": True},
    }
    running = running_from(jobs, estimates, now=100.0)
    assert running["a"] == Running((0,), pytest.approx(1.0), pytest.approx(5.0), False, "sdxl:64x64",
                                   pytest.approx(0.1))
    assert running["b"].remaining_s == pytest.approx(4 * 0.25) and running["b"].may_yield
    assert running["b"].step_s == pytest.approx(0.25)  # a step at its two-device speed
    assert running_from({**jobs, "c": {"devices": [1], "steps_left": 3, "cost_key": "sd3:64x64"}}, estimates,
                        100.0) is None  # a size never measured: no numbers


def snapshot(jobs: dict, loads: list[int], estimates: dict | None = None) -> Snapshot:
    return Snapshot(loads, [True] * len(loads), jobs, estimates or {"k": {"serial": 0.1}}, now=0.0)


def test_place_uses_the_deadline_policy_only_for_auto_with_numbers():
    jobs = {"a": {"devices": [0], "steps_left": 15, "cost_key": "k"}, "b": {"devices": [1], "steps_left": 2,
                                                                           "cost_key": "k"}}
    view = view_of(snapshot(jobs, [1, 1], {"k": {"serial": 0.1, "split": 0.1}}), None, "k")
    decided = place(Mode.AUTO, True, 20, 3.0, view.costs, view.others, view.loads)
    assert decided.rule == "deadline" and decided.placement.devices == (1,)
    # The count rule: no estimate for this size, or an explicit mode.
    unknown = view_of(snapshot(jobs, [1, 1]), None, "other")
    assert place(Mode.AUTO, True, 20, 3.0, unknown.costs, unknown.others, unknown.loads).placement.devices == (0,)
    assert place(Mode.SERIAL, True, 20, 3.0, view.costs, view.others, view.loads).rule == "count"
    tight = place(Mode.AUTO, True, 20, 1.7, COSTS, [serial(0, 8), serial(1, 8)], [1, 1])
    assert tight.placement.mode is Mode.CFG_PARALLEL and tight.placement.devices == (0, 1)


def hybrid_run() -> GuidanceSchedule:
    return GuidanceSchedule(Mode.HYBRID, 20, KNOBS, guidance=True, mode_requested=Mode.AUTO)


def test_a_split_run_yields_to_a_sharing_newcomer_unless_going_on_serially_makes_it_late():
    me = split(16)  # 1.0 s left split, 1.6 s serially, no deadline
    shared = BoardView([2, 1], me, [serial(0, 20, deadline_s=3.0)], COSTS)
    assert yield_device(hybrid_run(), 4, shared) == 1  # finish alone on the device the newcomer is not on
    no_deadline = BoardView([1, 2], me, [serial(1, 20)], COSTS)
    assert yield_device(hybrid_run(), 4, no_deadline) == 0
    alone = BoardView([1, 1], me, [], COSTS)
    assert yield_device(hybrid_run(), 4, alone) is None
    needs_both = BoardView([2, 1], Running((0, 1), 1.0, 1.2, True), [serial(0, 20, deadline_s=3.0)], COSTS)
    assert yield_device(hybrid_run(), 4, needs_both) is None  # serially it would be late


def grown_run() -> GuidanceSchedule:
    schedule = GuidanceSchedule(Mode.SERIAL, 20, KNOBS, guidance=True, device=1, mode_requested=Mode.AUTO)
    return schedule


def test_an_auto_serial_run_grows_onto_an_idle_device_and_gives_it_back_when_shared():
    schedule = grown_run()
    me = Running((1,), 1.0)
    assert grow_device(schedule, 4, BoardView([1, 1], me, [serial(0, 20)], COSTS)) is None  # device 0 is busy
    assert grow_device(schedule, 4, BoardView([0, 1], me, [], COSTS, up=[False, True])) is None  # device 0 is down
    assert grow_device(schedule, 4, BoardView([0, 1], me, [], NO_GROW)) is None  # splitting measured no faster
    assert grow_device(schedule, 18, BoardView([0, 1], me, [], COSTS)) is None  # 2 steps left: not worth it
    assert grow_device(schedule, 4, BoardView([0, 1], me, [], COSTS)) == 0
    schedule.grow(4, 0)
    assert schedule.effective_mode is Mode.CFG_PARALLEL and schedule.devices_in_use == (0, 1)
    grown = Running((0, 1), 1.0, None, True)
    assert yield_device(schedule, 5, BoardView([1, 1], grown, [], COSTS)) is None
    assert yield_device(schedule, 5, BoardView([2, 1], grown, [serial(0, 20)], COSTS)) == 1
    explicit = GuidanceSchedule(Mode.SERIAL, 20, KNOBS, guidance=True, device=1)
    assert grow_device(explicit, 4, BoardView([0, 1], me, [], COSTS)) is None  # only auto re-places


def test_without_numbers_the_yield_follows_the_count_rule():
    assert yield_device(hybrid_run(), 4, BoardView([2, 1], None, None, None)) == 1
    explicit = GuidanceSchedule(Mode.HYBRID, 20, KNOBS, guidance=True)
    assert yield_device(explicit, 4, BoardView([2, 1], split(16), [serial(0, 20, 2.2)], COSTS)) is None


# --- admission by deadline: refuse what cannot finish in time, protect what runs -----------------------


def test_a_newcomer_that_would_make_a_running_request_late_is_placed_where_it_does_not():
    # Device 0 runs a request with 10 steps left (1.0 s) and 1.1 s to its deadline: a newcomer beside it
    # (2.0 s of work) would slow it to 1.33 s. Device 1's request has no deadline to miss.
    tight = Running((0,), 1.0, deadline_s=1.1)
    loose = Running((1,), 1.0)
    assert pushes_late((0,), 2.0, [tight, loose], COSTS) == [tight]
    assert pushes_late((1,), 2.0, [tight, loose], COSTS) == []
    choice = choose(20, deadline_s=5.0, running=[tight, loose], costs=COSTS, num_devices=2)
    assert choice.mode is Mode.SERIAL and choice.devices == (1,) and choice.meets


def test_a_request_already_late_is_not_protected():
    late = Running((0,), 1.0, deadline_s=0.8)  # misses its deadline whatever happens
    assert pushes_late((0,), 2.0, [late], COSTS) == []


def test_nothing_that_meets_the_deadline_without_harm_is_marked_and_refused():
    # Both devices run requests that a newcomer would make late; serial alone would meet its own deadline.
    running = [Running((0,), 1.0, deadline_s=1.1), Running((1,), 1.0, deadline_s=1.1)]
    choice = choose(20, deadline_s=5.0, running=running, costs=COSTS, num_devices=2)
    assert not choice.meets
    reason = refusal(choice, 5.0)
    assert reason is not None and reason.startswith("server full") and "timeout" in reason
    # Without a deadline the newcomer is never refused, and is served as before.
    assert choose(20, None, running, COSTS, 2).meets
    assert refusal(choose(20, None, running, COSTS, 2), None) is None


def test_an_idle_server_refuses_nothing_and_a_busy_one_what_it_cannot_finish_in_time():
    choice = choose(20, deadline_s=1.0, running=[], costs=COSTS, num_devices=2)  # hybrid alone: 1.25 s
    assert choice.mode is Mode.HYBRID and not choice.meets
    # Idle: admitted anyway (it costs no one, and running refreshes an estimate that may be stale).
    assert place(Mode.AUTO, True, 20, 1.0, COSTS, [], [0, 0]).refused is None
    busy = [Running((0,), 0.3)]
    assert place(Mode.AUTO, True, 20, 1.0, COSTS, busy, [1, 0]).refused is not None
    assert place(Mode.AUTO, True, 20, 1.0, COSTS, busy, [1, 0], admit_by_deadline=False).refused is None
    assert place(Mode.AUTO, True, 20, 2.5, COSTS, busy, [1, 0]).refused is None


def test_explicit_modes_are_refused_by_their_own_placements_prediction():
    # Beside a request on device 2 (of 3), serial alone on device 0 takes 2.0 s: refused with 1.5 s left,
    # served with 2.5 s; cfg_parallel (1.25 s) fits 1.5 s.
    other = [Running((2,), 0.5)]
    assert place(Mode.SERIAL, True, 20, 1.5, COSTS, other, [0, 0, 1]).refused is not None
    served = place(Mode.SERIAL, True, 20, 2.5, COSTS, other, [0, 0, 1])
    assert served.refused is None and served.rule == "count" and served.predicted_s == pytest.approx(2.0)
    assert place(Mode.SERIAL, True, 20, 2.1, COSTS, other, [0, 0, 1]).refused is not None  # inside the 10% margin
    assert place(Mode.CFG_PARALLEL, True, 20, 1.5, COSTS, other, [0, 0, 1]).refused is None
    # The count rule places a serial request on device 0 beside a request it would make late: refused.
    running = [Running((0,), 1.0, deadline_s=1.1), Running((1,), 1.0, deadline_s=1.1)]
    assert place(Mode.SERIAL, True, 20, 5.0, COSTS, running, [1, 1]).refused is not None
    # Without numbers (no estimate for the size yet) nothing is refused.
    assert place(Mode.SERIAL, True, 20, 0.1, None, None, [0, 0]).refused is None


def test_predict_prices_an_explicit_placement_on_the_current_load():
    placement = Placement(Mode.CFG_PARALLEL, 0, (0, 1))
    choice = predict(placement, 20, None, [Running((1,), 3.0)], COSTS)
    assert choice.devices == (0, 1) and choice.meets
    assert choice.predicted_s == pytest.approx(overlap_latency(1.25, [3.0], COSTS))


def test_a_neighbour_of_another_size_is_priced_by_alternating_steps_not_by_batching():
    """Device 0 runs a larger image (0.4 s steps, 64 left), device 1 one of the newcomer's size with fewer
    steps left than the newcomer has. Priced as if every neighbour batched with it, sharing device 0 and
    growing onto device 1 when that frees looks fastest; but a larger image shares no forward, and each
    of the newcomer's 40 steps would wait for one of its 0.4 s steps: device 1 is the faster choice."""
    big = Running((0,), 64 * 0.4, cost_key="sdxl:256x256", step_s=0.4)
    same = Running((1,), 36 * 0.1, cost_key="sdxl:64x64", step_s=0.1)
    assert choose(40, None, [big, same], COSTS, 2).devices == (0,)  # all one size: the old pricing
    choice = choose(40, None, [big, same], COSTS, 2, cost_key="sdxl:64x64")
    assert choice.mode is Mode.SERIAL and choice.devices == (1,)
    # On device 0 each of its 40 steps would wait for a 0.4 s step of the larger image: 4.0 + 16.0 s.
    assert overlap_latency(4.0, [big.as_neighbour("sdxl:64x64")], COSTS, 0.1) == pytest.approx(20.0)
    assert choice.predicted_s < 20.0
    # ... and that larger run is pushed past its deadline by a newcomer's alternating steps.
    tight = Running((0,), 2 * 0.4, deadline_s=1.0, cost_key="sdxl:256x256", step_s=0.4)
    assert pushes_late((0,), 4.0, [tight], COSTS, cost_key="sdxl:64x64", own_step_s=0.1) == [tight]
    assert pushes_late((0,), 4.0, [tight], COSTS) == [tight]  # priced by batching: 0.8 + 0.8 / 3


def test_a_request_that_would_wait_is_refused_on_arrival_only_if_it_could_not_finish_even_at_the_earliest():
    costs = Costs(step_s=0.1, batch_gain=1.5)  # 20 steps: 2 s alone
    running = [Running((0,), 1.5), Running((1,), 1.5), Running((0,), 0.5), Running((1,), 0.5)]
    # Four running, two waiting (2 s each): 8 device-seconds ahead, worked off by two devices at 1.5x,
    # then its own 2 s: 4.67 s at the earliest, which must meet its deadline with placement's margin.
    assert arrival_refusal(2.0, 4.6 * MARGIN, running, [2.0, 2.0], costs, num_up=2, slots=4) is not None
    assert arrival_refusal(2.0, 4.7 * MARGIN, running, [2.0, 2.0], costs, num_up=2, slots=4) is None
    refused = arrival_refusal(2.0, 3.0, running, [2.0, 2.0], costs, num_up=2, slots=4)
    assert refused.startswith("server full") and "6 requests" in refused and "4.67 s at the earliest" in refused
    # A split run's remaining work counts on both of its devices: (2 x 3 + 3.5) / 3 + 2 = 5.17 s.
    with_split = [Running((0, 1), 3.0), *running[:3]]
    assert arrival_refusal(2.0, 5.1 * MARGIN, with_split, [], costs, num_up=2, slots=4) is not None
    assert arrival_refusal(2.0, 5.2 * MARGIN, with_split, [], costs, num_up=2, slots=4) is None
    # One device down: the same work ahead takes twice as long.
    assert arrival_refusal(2.0, 4.7 * MARGIN, running, [2.0, 2.0], costs, num_up=1, slots=4) is not None
    # One slot, held by a run with 1.5 s left: however idle the other device, it starts after that run.
    assert arrival_refusal(2.0, 3.4 * MARGIN, running[:1], [], costs, num_up=2, slots=1) is not None
    assert arrival_refusal(2.0, 3.6 * MARGIN, running[:1], [], costs, num_up=2, slots=1) is None
    # Behind one waiting request with two slots held: it needs two to finish, the later at 1.5 s.
    assert arrival_refusal(2.0, 3.4 * MARGIN, running[1:3], [2.0], costs, num_up=2, slots=2) is not None
    # An orchestrator instance is free: placement prices it a moment later, so nothing is refused here;
    # nor without a deadline.
    assert arrival_refusal(2.0, 0.1, running[:3], [], costs, num_up=2, slots=4) is None
    assert arrival_refusal(2.0, None, running, [2.0, 2.0], costs, num_up=2, slots=4) is None


def test_the_margin_on_predictions_decides_what_meets(monkeypatch):
    """A placement meets a deadline only when its prediction times the server's margin does: alone, 20 steps
    take 2.0 s; with 2.0 x the margin left it is placed, with a little less it is refused (the server is busy)."""
    monkeypatch.undo()
    busy = [serial(0, 5)]
    margin = deadline.DEADLINE_MARGIN
    assert margin > 1.0
    assert choose(20, 2.0 * margin + 0.01, busy, NO_GROW, 2, guidance=False).meets
    assert not choose(20, 2.0 * margin - 0.01, busy, NO_GROW, 2, guidance=False).meets

"""The guidance schedule on hand-written rel-MAE curves: no torch, no Triton."""

import pytest

from hybridiff.schedule import (
    COND,
    UNCOND,
    GuidanceSchedule,
    HybridKnobs,
    Mode,
    Phase,
    detect_tau1,
)

SDXL_KNOBS = HybridKnobs(window=12, eps_slope=0.4e-3, k=5, tau_cap=15)


def run(schedule: GuidanceSchedule, curve: list[float]) -> list[Phase]:
    """Drive the schedule as the loop does: plan step t, then observe its rel-MAE."""
    phases = []
    for t in range(schedule.steps):
        plan = schedule.plan(t)
        phases.append(plan.phase)
        has_uncond = any(UNCOND in a.branches for a in plan.eps_assignments)
        schedule.observe(t, curve[t] if has_uncond else None)
    return phases


def falling_then_flat(steps: int, knee: int, drop: float = 0.05) -> list[float]:
    """Falls by ``drop`` per step until ``knee``, then stays flat."""
    return [1.0 - drop * min(t, knee) for t in range(steps)]


def test_slope_detection_inside_window():
    # Falls 0.05/step until step 4, then flat. With L=3 the window (m[t-2]-m[t])/3 first reaches 0
    # at t=6 (m[4]=m[5]=m[6]).
    knobs = HybridKnobs(window=3, eps_slope=1e-3, k=2, tau_cap=40)
    curve = falling_then_flat(20, knee=4)
    assert detect_tau1(curve, knobs) == 6
    schedule = GuidanceSchedule(Mode.HYBRID, 20, knobs, guidance=True)
    phases = run(schedule, curve)
    assert (schedule.tau1, schedule.tau2, schedule.tau_source) == (6, 8, "slope")
    assert phases[:7] == [Phase.PARTITION] * 7
    assert phases[7] == Phase.WARMUP and phases[8] == Phase.PIPELINE
    assert phases[9:] == [Phase.PARTITION] * 11


def test_slope_needs_more_than_window_values():
    # A flat curve satisfies the slope test at once, but only once more than L values are logged.
    knobs = HybridKnobs(window=4, eps_slope=1e-3, k=1, tau_cap=40)
    assert detect_tau1([0.5] * 4, knobs) is None
    assert detect_tau1([0.5] * 5, knobs) == 4


def test_rising_curve_is_not_a_plateau():
    # A negative slope (rel-MAE rising) must not count: the test is 0 <= slope < eps_slope.
    knobs = HybridKnobs(window=2, eps_slope=1e-3, k=1, tau_cap=40)
    assert detect_tau1([0.1 * t for t in range(10)], knobs) is None


def test_tau_cap_fallback_runs_the_pipeline():
    # Steadily falling: no slope ever qualifies, so tau1 = tau_cap (the case that crashes the
    # reference SDXL code). The pipeline then runs in (tau_cap, tau_cap + k], starting with warm-up.
    curve = [1.0 - 0.01 * t for t in range(50)]
    schedule = GuidanceSchedule(Mode.HYBRID, 50, SDXL_KNOBS, guidance=True)
    phases = run(schedule, curve)
    assert (schedule.tau1, schedule.tau2, schedule.tau_source) == (15, 20, "tau_cap")
    assert phases[15] == Phase.PARTITION
    assert phases[16] == Phase.WARMUP
    assert phases[17:21] == [Phase.PIPELINE] * 4
    assert phases[21] == Phase.PARTITION
    pipeline_plan = schedule.plan(17)
    assert [(a.device, a.branches, a.stage) for a in pipeline_plan.assignments] == [
        (0, (UNCOND,), 0),
        (1, (COND,), 1),
    ]
    assert [a.device for a in pipeline_plan.eps_assignments] == [1]


def test_tau2_beyond_last_step_is_clamped():
    curve = [1.0 - 0.01 * t for t in range(12)]
    knobs = HybridKnobs(window=12, eps_slope=0.4e-3, k=5, tau_cap=8)
    schedule = GuidanceSchedule(Mode.HYBRID, 12, knobs, guidance=True)
    phases = run(schedule, curve)
    assert schedule.tau1 == 8 and schedule.tau2 == 11
    assert phases[9] == Phase.WARMUP and phases[10:] == [Phase.PIPELINE] * 2


def test_tau_cap_at_last_step_leaves_no_pipeline():
    schedule = GuidanceSchedule(Mode.HYBRID, 10, HybridKnobs(12, 0.4e-3, 5, tau_cap=9), guidance=True)
    phases = run(schedule, [1.0 - 0.01 * t for t in range(10)])
    assert schedule.tau1 == 9 and schedule.tau2 == 9
    assert phases == [Phase.PARTITION] * 10


def test_fewer_steps_than_window_never_detects():
    # 8 steps, L=12, tau_cap beyond the run: no tau at all, every step partitioned.
    schedule = GuidanceSchedule(Mode.HYBRID, 8, HybridKnobs(12, 0.4e-3, 5, tau_cap=15), guidance=True)
    phases = run(schedule, [0.5] * 8)
    assert schedule.tau1 is None and schedule.tau2 is None
    assert phases == [Phase.PARTITION] * 8


def test_k_zero_is_cfg_parallel():
    schedule = GuidanceSchedule(Mode.HYBRID, 30, HybridKnobs(3, 1e-3, k=0, tau_cap=5), guidance=True)
    phases = run(schedule, [0.5] * 30)
    assert phases == [Phase.PARTITION] * 30


def test_serial_and_cfg_parallel_plans():
    serial = GuidanceSchedule(Mode.SERIAL, 4, SDXL_KNOBS, guidance=True, device=1)
    assert [(a.device, a.branches) for a in serial.plan(0).assignments] == [(1, (UNCOND, COND))]
    partition = GuidanceSchedule(Mode.CFG_PARALLEL, 4, SDXL_KNOBS, guidance=True)
    assert [(a.device, a.branches) for a in partition.plan(3).assignments] == [(0, (UNCOND,)), (1, (COND,))]


def test_pipeline_mode_keeps_cfg_batch_in_each_stage():
    knobs = HybridKnobs(12, 0.4e-3, 5, 15, pipeline_warmup=2)
    schedule = GuidanceSchedule(Mode.PIPELINE, 6, knobs, guidance=True)
    phases = run(schedule, [0.5] * 6)
    assert phases == [Phase.WARMUP] * 2 + [Phase.PIPELINE] * 4
    warm = schedule.plan(0).assignments
    assert [(a.branches, a.stage, a.capture_stage) for a in warm] == [
        ((UNCOND, COND), None, 0),
        ((UNCOND, COND), None, 1),
    ]
    staged = schedule.plan(3).assignments
    assert [(a.branches, a.stage) for a in staged] == [((UNCOND, COND), 0), ((UNCOND, COND), 1)]


@pytest.mark.parametrize("mode,expected", [
    (Mode.SERIAL, Mode.SERIAL),
    (Mode.CFG_PARALLEL, Mode.SERIAL),
    (Mode.HYBRID, Mode.SERIAL),
    (Mode.PIPELINE, Mode.PIPELINE),
])
def test_without_guidance_modes_fall_back_and_say_so(mode, expected):
    schedule = GuidanceSchedule(mode, 3, SDXL_KNOBS, guidance=False)
    phases = run(schedule, [0.0] * 3)
    assert schedule.effective_mode is expected
    assert schedule.summary(phases)["mode_run"] == expected.value
    for t in range(3):
        assert all(a.branches == (COND,) for a in schedule.plan(t).assignments)


def test_one_device_runs_everything_serially():
    schedule = GuidanceSchedule(Mode.HYBRID, 3, SDXL_KNOBS, guidance=True, devices=1)
    assert schedule.effective_mode is Mode.SERIAL


@pytest.mark.parametrize("field,value,message", [
    ("window", 0, "slope_window"),
    ("eps_slope", -1.0, "eps_slope"),
    ("k", -1, "k must be >= 0"),
    ("tau_cap", -2, "tau_cap"),
])
def test_invalid_knobs_name_the_field(field, value, message):
    knobs = dict(window=12, eps_slope=0.4e-3, k=5, tau_cap=15)
    knobs[field] = value
    with pytest.raises(ValueError, match=message):
        GuidanceSchedule(Mode.HYBRID, 10, HybridKnobs(**knobs), guidance=True)


def test_summary_counts_phase_steps():
    schedule = GuidanceSchedule(Mode.HYBRID, 20, HybridKnobs(3, 1e-3, 3, 40), guidance=True)
    phases = run(schedule, falling_then_flat(20, knee=4))
    summary = schedule.summary(phases)
    assert summary["phase_steps"] == {"partition": 17, "warmup": 1, "pipeline": 2}
    assert summary["rel_mae"][7] is not None  # warm-up has both branches
    assert summary["rel_mae"][8] is None  # pipeline steps have no unconditional prediction


def test_auto_hybrid_yields_a_device_when_others_arrive_before_its_pipeline():
    from hybridiff.schedule import yield_device

    knobs = HybridKnobs(window=3, eps_slope=1e-3, k=2, tau_cap=40)
    schedule = GuidanceSchedule(Mode.HYBRID, 20, knobs, guidance=True, pair=(0, 1), mode_requested=Mode.AUTO)
    assert yield_device(schedule, 0, [1, 1]) is None  # alone on its pair: keep both devices
    assert yield_device(schedule, 0, [2, 1]) == 1  # a newcomer on device 0: finish alone on device 1
    curve = falling_then_flat(20, knee=4)
    phases = []
    for t in range(3):
        phases.append(schedule.plan(t).phase)
        schedule.observe(t, curve[t])
    schedule.continue_serially(3, 1)
    for t in range(3, 20):
        plan = schedule.plan(t)
        phases.append(plan.phase)
        assert [(a.device, a.branches) for a in plan.assignments] == [(1, (UNCOND, COND))]
        schedule.observe(t, curve[t])
    summary = schedule.summary(phases)
    assert summary["mode_run"] == "serial" and summary["serial_from_step"] == 3
    assert summary["phase_steps"] == {"partition": 3, "serial": 17}
    assert summary["tau1"] is None  # no pipeline ran: the image is a serial run's


def test_a_hybrid_in_its_pipeline_phase_keeps_its_devices():
    from hybridiff.schedule import may_yield, yield_device

    knobs = HybridKnobs(window=3, eps_slope=1e-3, k=3, tau_cap=40)
    schedule = GuidanceSchedule(Mode.HYBRID, 20, knobs, guidance=True, mode_requested=Mode.AUTO)
    run(schedule, falling_then_flat(20, knee=4))  # tau1 = 6
    assert yield_device(schedule, 7, [2, 2]) is None
    assert may_yield(schedule, 6) and not may_yield(schedule, 7)  # the orchestrator stops reading loads
    with pytest.raises(ValueError, match="before its pipeline"):
        schedule.continue_serially(7, 0)


def test_only_an_auto_serial_run_with_guidance_may_grow_and_the_summary_says_when():
    from hybridiff.schedule import MIN_GROW_STEPS, may_grow

    auto = GuidanceSchedule(Mode.SERIAL, 10, SDXL_KNOBS, guidance=True, device=1, mode_requested=Mode.AUTO)
    assert may_grow(auto, 0) and not may_grow(auto, 10 - MIN_GROW_STEPS + 1)
    assert not may_grow(GuidanceSchedule(Mode.SERIAL, 10, SDXL_KNOBS, guidance=True), 0)  # explicit: a promise
    unguided = GuidanceSchedule(Mode.SERIAL, 10, SDXL_KNOBS, guidance=False, mode_requested=Mode.AUTO)
    assert not may_grow(unguided, 0)  # nothing to partition
    with pytest.raises(ValueError):
        auto.grow(2, 1)  # its own device
    auto.grow(2, 0)
    assert auto.effective_mode is Mode.CFG_PARALLEL and auto.pair == (0, 1) and not may_grow(auto, 3)
    assert auto.plan(3).phase is Phase.PARTITION
    with pytest.raises(ValueError):
        auto.grow(3, 0)  # already on two devices
    auto.continue_serially(5, 1)
    assert auto.effective_mode is Mode.SERIAL and auto.devices_in_use == (1,) and may_grow(auto, 6)
    summary = auto.summary([Phase.SERIAL] * 2 + [Phase.PARTITION] * 3 + [Phase.SERIAL] * 5)
    assert summary["grew"] == [{"step": 2, "device": 0}] and summary["serial_from_step"] == 5
    failed = GuidanceSchedule(Mode.SERIAL, 10, SDXL_KNOBS, guidance=True, mode_requested=Mode.AUTO)
    failed.fail_over(1, 0, 1)
    assert not may_grow(failed, 2)  # a run that lost a device does not reach for another

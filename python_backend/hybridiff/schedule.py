"""The guidance schedule: which work each denoising step runs, and where.

This is policy only. It knows nothing of torch, Triton or threads: it takes the mode, the
knobs and the rel-MAE values observed so far, and answers with a :class:`StepPlan`. The
denoising loop (``loop.py``) carries the plan out. Keeping it pure makes every branch of the
Hybridiff schedule (tau detection, the tau_cap fallback, clamping at the last step) testable on
hand-written curves.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum

UNCOND = "uncond"
COND = "cond"


class Mode(str, Enum):
    """Parallel modes a request may ask for."""

    SERIAL = "serial"  # one device, batch-2 CFG: the baseline diffusers computes
    CFG_PARALLEL = "cfg_parallel"  # condition-based partitioning every step
    PIPELINE = "pipeline"  # AsyncDiff stale-activation pipeline, CFG batch inside each stage
    HYBRID = "hybrid"  # Hybridiff: partitioning, pipeline in (tau1, tau2], partitioning
    AUTO = "auto"  # hybrid when two devices are free, else serial on the least busy device


class Reason(str, Enum):
    """Why a run was re-placed mid-way."""

    YIELD = "yield"  # an ``auto`` split run gave up a device to newcomers (see :func:`yield_device`)
    FAILOVER = "failover"  # a device of the run failed (see :func:`failover_device`)
    GROW = "grow"  # an ``auto`` run on one device took a second, idle one (see ``deadline.grow_device``)


# A run grows onto an idle device only with at least this many steps left: fewer do not pay for the move.
MIN_GROW_STEPS = 3


class NoDeviceLeft(RuntimeError):
    """Every device of the family is down: nothing can run the request (retryable later)."""


class Phase(str, Enum):
    """What one step runs; reported per step so users see the schedule that was used."""

    SERIAL = "serial"  # whole denoiser on one device, all branches in one batch
    PARTITION = "partition"  # whole denoiser, one branch per device
    WARMUP = "warmup"  # whole denoiser per device, also recording stage outputs for the pipeline
    PIPELINE = "pipeline"  # one stage per device, fed stale activations of the previous step


@dataclass(frozen=True)
class Assignment:
    """One device's share of a step: which guidance branches, and which stage (None = whole)."""

    device: int
    branches: tuple[str, ...]
    stage: int | None = None
    capture_stage: int | None = None  # whole pass that also returns this stage's outputs (warm-up)


@dataclass(frozen=True)
class StepPlan:
    step: int
    phase: Phase
    assignments: tuple[Assignment, ...]

    @property
    def eps_assignments(self) -> tuple[Assignment, ...]:
        """The devices whose output is a noise prediction: in a pipeline, the last stage's only."""
        if self.phase is Phase.PIPELINE:
            last = max(a.stage for a in self.assignments if a.stage is not None)
            return tuple(a for a in self.assignments if a.stage == last)
        return self.assignments


@dataclass(frozen=True)
class Replacement:
    """One re-placement of a run: from ``step`` on, every step runs whole on ``continued_on`` (yield,
    failover), or partitioned over ``continued_on`` and ``device`` (grow).

    ``device`` is the device given up (yield), the one that failed (failover) or the one taken (grow).
    """

    reason: Reason
    step: int
    device: int
    continued_on: int


@dataclass(frozen=True)
class HybridKnobs:
    """The Hybridiff schedule knobs (paper notation)."""

    window: int  # L: rel-MAE values the slope is taken over
    eps_slope: float  # a slope in [0, eps_slope) marks tau1
    k: int  # pipeline steps after tau1
    tau_cap: int  # tau1 if no slope qualifies before it
    pipeline_warmup: int = 1  # `pipeline` mode: whole-model steps before stale activations exist

    def validate(self) -> None:
        """Raise ValueError naming the field and its allowed range."""
        if self.window < 1:
            raise ValueError(f"slope_window (L) must be >= 1, got {self.window}")
        if not self.eps_slope >= 0:
            raise ValueError(f"eps_slope must be >= 0, got {self.eps_slope}")
        if self.k < 0:
            raise ValueError(f"k must be >= 0, got {self.k}")
        if self.tau_cap < 0:
            raise ValueError(f"tau_cap must be >= 0, got {self.tau_cap}")
        if self.pipeline_warmup < 1:
            raise ValueError(f"pipeline_warmup must be >= 1, got {self.pipeline_warmup}")


def effective_mode(mode: Mode, guidance: bool, devices: int) -> Mode:
    """The mode actually run: one device, or no guidance to partition by condition, means serial."""
    if devices < 2:
        return Mode.SERIAL
    if not guidance and mode in (Mode.CFG_PARALLEL, Mode.HYBRID):
        return Mode.SERIAL
    return mode


def rel_mae(mean_abs_diff: float, mean_abs_uncond: float) -> float:
    """mean|eps_c - eps_u| / mean|eps_u|: how far the two guidance branches still disagree."""
    return mean_abs_diff / (mean_abs_uncond + 1e-12)


def detect_tau1(curve: list[float], knobs: HybridKnobs) -> int | None:
    """The step index at which the slope test first holds on ``curve`` (rel-MAE per step), or None.

    Once more than L values are logged, slope = (m[-L] - m[-1]) / L; tau1 is the first step t
    with 0 <= slope < eps_slope, i.e. the discrepancy has stopped falling fast.
    """
    window = knobs.window
    for t in range(window, len(curve)):
        slope = (curve[t - window + 1] - curve[t]) / window
        if 0.0 <= slope < knobs.eps_slope:
            return t
    return None


@dataclass
class GuidanceSchedule:
    """The schedule of one image: call :meth:`plan` for step t, run it, then :meth:`observe`.

    ``device`` is where single-device steps run and ``pair`` the two devices parallel steps use
    (both chosen by :func:`place_request`). ``devices`` is how many devices the server has.
    """

    mode: Mode
    steps: int
    knobs: HybridKnobs
    guidance: bool  # classifier-free guidance on (guidance_scale > 1)
    device: int = 0
    devices: int = 2
    pair: tuple[int, int] = (0, 1)
    mode_requested: Mode | None = None  # what the client asked for (``auto``); None: ``mode``
    rel_mae_curve: list[float | None] = field(default_factory=list)
    tau1: int | None = None
    tau_source: str | None = None  # "slope" or "tau_cap"
    replacements: list[Replacement] = field(default_factory=list)  # yields and failovers, in order

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.mode is Mode.AUTO:
            raise ValueError("resolve mode auto with place_request() before scheduling")
        if self.mode_requested is None:
            self.mode_requested = self.mode
        self.knobs.validate()

    @property
    def grown(self) -> bool:
        """Whether the run last took a second device (:meth:`grow`): condition partitioning since."""
        return bool(self.replacements) and self.replacements[-1].reason is Reason.GROW

    @property
    def effective_mode(self) -> Mode:
        """The mode the next step runs in: serial once the run was re-placed onto one device,
        condition partitioning once it grew onto two."""
        if self.replacements:
            return Mode.CFG_PARALLEL if self.grown else Mode.SERIAL
        devices = self.devices if self.pair[0] != self.pair[1] else 1
        return effective_mode(self.mode, self.guidance, devices)

    @property
    def serial_device(self) -> int:
        """Where single-device steps run: the placed device, or the last re-placement's."""
        return self.replacements[-1].continued_on if self.replacements else self.device

    @property
    def devices_in_use(self) -> tuple[int, ...]:
        """The devices the next step occupies (what the in-flight board should count)."""
        return (self.serial_device,) if self.effective_mode is Mode.SERIAL else tuple(self.pair)

    @property
    def tau2(self) -> int | None:
        """tau1 + k, clamped to the last step (the reference code raises instead)."""
        if self.tau1 is None:
            return None
        return min(self.tau1 + self.knobs.k, self.steps - 1)

    @property
    def branches(self) -> tuple[str, ...]:
        return (UNCOND, COND) if self.guidance else (COND,)

    def phase(self, step: int) -> Phase:
        mode = self.effective_mode
        if mode is Mode.SERIAL:
            return Phase.SERIAL
        if mode is Mode.CFG_PARALLEL:
            return Phase.PARTITION
        if mode is Mode.PIPELINE:
            return Phase.WARMUP if step < self.knobs.pipeline_warmup else Phase.PIPELINE
        # hybrid: pipeline in (tau1, tau2]; its first step records the stage outputs it will
        # need, since no stale activation exists yet.
        if self.tau1 is None or self.knobs.k == 0 or step <= self.tau1 or step > self.tau2:
            return Phase.PARTITION
        return Phase.WARMUP if step == self.tau1 + 1 else Phase.PIPELINE

    def plan(self, step: int) -> StepPlan:
        """What step ``step`` runs, and where. Asks only: the loop records what actually ran."""
        if not 0 <= step < self.steps:
            raise IndexError(f"step {step} outside 0..{self.steps - 1}")
        phase = self.phase(step)
        mode = self.effective_mode
        first, second = self.pair
        if phase is Phase.SERIAL:
            assignments = (Assignment(self.serial_device, self.branches),)
        elif phase is Phase.PARTITION:
            assignments = (Assignment(first, (UNCOND,)), Assignment(second, (COND,)))
        elif mode is Mode.PIPELINE:
            # AsyncDiff: every device holds the full CFG batch; warm-up runs the whole model.
            staged = phase is Phase.PIPELINE
            assignments = tuple(
                Assignment(d, self.branches, stage=s if staged else None, capture_stage=None if staged else s)
                for s, d in enumerate(self.pair)
            )
        elif phase is Phase.WARMUP:
            assignments = (
                Assignment(first, (UNCOND,), capture_stage=0),
                Assignment(second, (COND,), capture_stage=1),
            )
        else:
            # Hybridiff pipeline: the first device runs the middle stage on the unconditional text,
            # the second head and tail on the conditional text; its output is used without guidance.
            assignments = (Assignment(first, (UNCOND,), stage=0), Assignment(second, (COND,), stage=1))
        return StepPlan(step, phase, assignments)

    def observe(self, step: int, rel_mae_value: float | None) -> None:
        """Record step ``step``'s rel-MAE (None when the step had no unconditional branch)."""
        if step != len(self.rel_mae_curve):
            raise ValueError(f"observe() expects step {len(self.rel_mae_curve)}, got {step}")
        self.rel_mae_curve.append(rel_mae_value)
        if self.effective_mode is not Mode.HYBRID or self.tau1 is not None:
            return
        measured = [m for m in self.rel_mae_curve if m is not None]
        if len(measured) == len(self.rel_mae_curve):
            detected = detect_tau1(measured, self.knobs)
            if detected is not None:
                self.tau1, self.tau_source = detected, "slope"
                return
        if step >= self.knobs.tau_cap - 1:
            self.tau1, self.tau_source = self.knobs.tau_cap, "tau_cap"

    def continue_serially(self, step: int, device: int) -> None:
        """Yield: run the remaining steps whole on ``device`` (decided by :func:`yield_device`).

        Only before any pipeline step: up to then a hybrid run is the same math as serial (condition
        partitioning only splits the batch), so the image stays that of a serial run of the request.
        """
        if self.effective_mode is Mode.HYBRID and self.pipeline_started(step):
            raise ValueError("a hybrid run can only turn serial before its pipeline phase")
        given_up = next((d for d in self.devices_in_use if d != device), device)
        self.replacements.append(Replacement(Reason.YIELD, step, given_up, device))

    def grow(self, step: int, device: int) -> None:
        """Grow: from ``step`` on, partition by condition over the run's device and ``device``, an idle one
        (decided by ``deadline.grow_device``). Serial and condition partitioning are the same math, so the
        image stays that of a serial run; the run gives the device back (:meth:`continue_serially`) when
        another request needs it."""
        if self.effective_mode is not Mode.SERIAL or not self.guidance:
            raise ValueError("only a serial run with guidance can grow onto a second device")
        current = self.serial_device
        if device == current:
            raise ValueError(f"device {device} is the run's own device")
        self.pair = (min(current, device), max(current, device))
        self.replacements.append(Replacement(Reason.GROW, step, device, current))

    def fail_over(self, step: int, failed: int, device: int) -> None:
        """Failover: ``failed`` is gone, so step ``step`` and the rest run whole on ``device``
        (decided by :func:`failover_device`). Allowed in any phase: a pipeline run continues
        serially from its current latents."""
        self.replacements.append(Replacement(Reason.FAILOVER, step, failed, device))

    def pipeline_started(self, step: int) -> bool:
        return self.tau1 is not None and self.knobs.k > 0 and step > self.tau1

    def summary(self, phases_run: Sequence[Phase]) -> dict:
        """What the response reports: this schedule's state, and ``phases_run``, the phase each step
        ran as the loop recorded it."""
        phases = [Phase(p).value for p in phases_run]
        return {
            "mode_requested": self.mode_requested.value,
            "mode_run": self.effective_mode.value,
            "guidance": self.guidance,
            "tau1": self.tau1,
            "tau2": self.tau2,
            "tau_source": self.tau_source,
            "phases": phases,
            "phase_steps": {p.value: phases.count(p.value) for p in Phase if p.value in phases},
            "rel_mae": self.rel_mae_curve,
            "serial_from_step": next((r.step for r in self.replacements if r.reason is not Reason.GROW), None),
            "grew": [{"step": r.step, "device": r.device} for r in self.replacements if r.reason is Reason.GROW],
            "failover": [
                {"device": r.device, "step": r.step, "continued_on": r.continued_on}
                for r in self.replacements
                if r.reason is Reason.FAILOVER
            ],
        }


@dataclass(frozen=True)
class Placement:
    """Where one request runs: the mode actually chosen and the devices it occupies."""

    mode: Mode
    device: int  # single-device steps
    pair: tuple[int, int]  # parallel steps
    guidance: bool = True

    @property
    def devices(self) -> tuple[int, ...]:
        """The devices this request keeps busy."""
        num_devices = 1 if self.pair[0] == self.pair[1] else 2
        if effective_mode(self.mode, self.guidance, num_devices) is Mode.SERIAL:
            return (self.device,)
        return self.pair


def place_request(mode: Mode, loads: list[int], guidance: bool, up: Sequence[bool] | None = None) -> Placement:
    """The load-aware choice, from the requests in flight per device and which devices are up.

    Splitting one image over two devices wins when they are free; when they are busy, a whole
    request on the least busy device wins (no device waits on another). ``auto`` takes hybrid
    only when two devices are idle; explicit modes keep their mode and get the least busy devices.
    Ties go to the lower device index, so placement is deterministic for a given load. A device
    that is down is never chosen; with one device left every mode runs serially there, and with
    none :class:`NoDeviceLeft` is raised.
    """
    candidates = [d for d in range(len(loads)) if up is None or up[d]]
    if not candidates:
        raise NoDeviceLeft(f"all {len(loads)} devices are down")
    by_load = sorted(candidates, key=lambda d: (loads[d], d))
    least = by_load[0]
    pair = (by_load[0], by_load[1]) if len(by_load) >= 2 else (least, least)
    pair = (min(pair), max(pair))
    if mode is Mode.AUTO:
        idle_pair = len(by_load) >= 2 and loads[pair[0]] == 0 and loads[pair[1]] == 0
        mode = Mode.HYBRID if idle_pair and guidance else Mode.SERIAL
    return Placement(mode, least, pair, guidance)


def may_yield(schedule: GuidanceSchedule, step: int) -> bool:
    """Whether the run could still give up a device at ``step``: a hybrid that ``auto`` placed, before its
    pipeline phase, or an ``auto`` run that grew onto a second device. Only ``auto`` may re-place a run
    for load: an explicit mode is a promise.

    Cheap, so callers ask it before reading the loads that :func:`yield_device` needs.
    """
    if schedule.mode_requested is not Mode.AUTO:
        return False
    if schedule.grown:
        return True
    return schedule.effective_mode is Mode.HYBRID and not schedule.pipeline_started(step)


def may_grow(schedule: GuidanceSchedule, step: int) -> bool:
    """Whether the run could take a second, idle device at ``step``: an ``auto`` run on one device with
    guidance to partition, not re-placed by a failover, and with enough steps left to pay for it.

    Cheap, so callers ask it before reading the board.
    """
    return (
        schedule.mode_requested is Mode.AUTO
        and schedule.guidance
        and schedule.devices >= 2
        and schedule.effective_mode is Mode.SERIAL
        and not any(r.reason is Reason.FAILOVER for r in schedule.replacements)
        and schedule.steps - step >= MIN_GROW_STEPS
    )


def yield_device(schedule: GuidanceSchedule, step: int, loads: list[int]) -> int | None:
    """For a split run placed by ``auto`` (or grown): the device to finish on alone, once others share its pair.

    A hybrid step waits for both devices, so a newcomer on either one slows every remaining step;
    before the pipeline phase the run can instead continue serially on the less busy device of
    its pair (the same image as a serial run), leaving the other to the newcomer. ``loads`` counts
    this request on both devices of its pair.
    """
    if not may_yield(schedule, step):
        return None
    first, second = schedule.pair
    if loads[first] <= 1 and loads[second] <= 1:
        return None
    return min((first, second), key=lambda d: (loads[d], d))


def failover_device(
    schedule: GuidanceSchedule, failed: int, up: Sequence[bool], loads: Sequence[int] | None = None
) -> int | None:
    """Where a run whose device ``failed`` goes on (serially, from the failed step), or None if nowhere.

    Any mode may fail over: losing the image would break the promise more than changing its shape.
    A surviving device the run already occupies comes first (no new device gets busier), then the
    least loaded device that is up; ties go to the lower index. Before the pipeline phase every
    mode is the same math as serial, so the image stays the serial image of the request.
    """
    survivors = [d for d in range(len(up)) if up[d] and d != failed]
    if not survivors:
        return None
    in_use = set(schedule.devices_in_use)
    return min(survivors, key=lambda d: (d not in in_use, 0 if loads is None else loads[d], d))

"""The denoising loop: one loop for every mode, on any transport.

Each step it asks the :class:`GuidanceSchedule` what to run, sends the work to the devices
through a :class:`Transport` (in-process in tests, BLS inside the Triton orchestrator), combines
guidance, takes the scheduler step in one place and carries the stale activations between steps.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from . import deadline
from .families.base import Conditioning, DenoiseOutput, Denoiser, Family, LatentMath
from .params import ImageRequest  # noqa: F401 (re-exported: the loop runs these)
from .schedule import (
    COND,
    UNCOND,
    GuidanceSchedule,
    NoDeviceLeft,
    Phase,
    failover_device,
    may_grow,
    may_yield,
    rel_mae,
    yield_device,
)


@dataclass(frozen=True)
class DenoiseTask:
    """What one device is asked to run for one step (the denoiser models are stateless)."""

    sample: torch.Tensor  # the scaled latent, batch 1: shared by every branch
    timestep: torch.Tensor
    cond: Conditioning  # batch = number of branches, in (uncond, cond) order
    stage: int | None
    stale: dict[str, torch.Tensor]
    capture_stage: int | None
    want_eps: bool

    def nbytes(self) -> int:
        tensors = [self.sample, self.timestep, *self.cond.values(), *self.stale.values()]
        return sum(t.numel() * t.element_size() for t in tensors)


class DeviceUnavailable(RuntimeError):
    """The device is gone (its process died, its model is unloaded or reloading): a failover case.

    Transports raise it only for such failures; an error in the request itself is another exception.
    """

    def __init__(self, device: int, message: str) -> None:
        super().__init__(message)
        self.device = device


class Transport(Protocol):
    """Runs a :class:`DenoiseTask` on a device; the loop awaits several at once.

    Raises :class:`DeviceUnavailable` when the device is gone, so that the loop can fail over.
    """

    num_devices: int

    async def denoise(self, device: int, task: DenoiseTask) -> DenoiseOutput: ...


class InProcessTransport:
    """Denoisers in this process. ``threaded`` runs devices in threads (torch frees the GIL)."""

    def __init__(self, denoisers: Sequence[Denoiser], threaded: bool = False) -> None:
        self.denoisers = list(denoisers)
        self.num_devices = len(self.denoisers)
        self.threaded = threaded

    async def denoise(self, device: int, task: DenoiseTask) -> DenoiseOutput:
        def run() -> DenoiseOutput:
            return self.denoisers[device].run(
                task.sample, task.timestep, task.cond, task.stage, task.stale, task.capture_stage
            )

        return await asyncio.to_thread(run) if self.threaded else run()


class RunHooks:
    """What the caller does around the loop; these defaults (an in-process run) do nothing.

    The loop asks the policy (``schedule.py``) and obeys; the hooks only report the world (loads,
    which devices are up) and carry decisions out there (the in-flight board). The orchestrator
    overrides them.
    """

    def check(self, step: int) -> None:
        """Called before every step; raises to stop the run (cancelled, deadline passed)."""

    def loads(self) -> list[int] | None:
        """Requests in flight per device, or None when the run is not load-aware (no yield)."""
        return None

    def board_view(self) -> deadline.BoardView | None:
        """What the board says of this run and the others (None: use :meth:`loads`, the count rule)."""
        return None

    def advanced(self, steps_left: int, may_yield: bool, sample: deadline.StepSample | None) -> None:
        """A step finished: ``steps_left`` remain, the run may still yield or not, and what the step cost."""

    def device_failed(self, device: int) -> list[bool] | None:
        """``device`` is gone: record that, and say which devices are up now (None: all of them)."""
        return None

    def occupy(self, devices: tuple[int, ...]) -> None:
        """The run was re-placed and now keeps ``devices`` busy."""

    def answered(self, devices: set[int]) -> None:
        """``devices`` ran a step for this run (a device marked down is back)."""


@dataclass
class LoopReport:
    """What the response tells about the run: the schedule, time per phase, bytes moved."""

    schedule: dict
    phase_seconds: dict[str, float] = field(default_factory=dict)
    loop_seconds: float = 0.0
    device_seconds: dict[int, float] = field(default_factory=dict)  # compute time per device
    # Per step: wall time minus the longest device compute of that step, summed. What the loop,
    # the transport and the scheduler cost beyond the work itself.
    overhead_seconds: float = 0.0
    placement_seconds: float = 0.0  # the board's reads before and writes after steps (``hooks``)
    bytes_to_devices: int = 0
    bytes_from_devices: int = 0
    batched_steps: int = 0  # steps whose device pass was shared with other requests

    def as_dict(self) -> dict:
        return {
            **self.schedule,
            "phase_seconds": {k: round(v, 6) for k, v in self.phase_seconds.items()},
            "loop_seconds": round(self.loop_seconds, 6),
            "device_seconds": {str(k): round(v, 6) for k, v in sorted(self.device_seconds.items())},
            "overhead_seconds": round(self.overhead_seconds, 6),
            "placement_seconds": round(self.placement_seconds, 6),
            "bytes_to_devices": self.bytes_to_devices,
            "bytes_from_devices": self.bytes_from_devices,
            "batched_steps": self.batched_steps,
        }


def _output_nbytes(output: DenoiseOutput) -> int:
    tensors = ([output.eps] if output.eps is not None else []) + list(output.activations.values())
    return sum(t.numel() * t.element_size() for t in tensors)


async def denoise_image(
    family: Family,
    latent_math: LatentMath,
    transport: Transport,
    branch_cond: dict[str, Conditioning],
    request: ImageRequest,
    hooks: RunHooks | None = None,
) -> tuple[torch.Tensor, LoopReport]:
    """Run the whole denoising loop for one image; returns the final latents and the report.

    ``branch_cond`` maps ``uncond``/``cond`` to that branch's text conditioning (batch 1).
    Between steps an ``auto`` split run may yield a device (:func:`yield_device`, from ``hooks.loads``) and
    an ``auto`` serial run may grow onto an idle one (``deadline.grow_device``, from ``hooks.board_view``);
    when a device is gone the same step runs again where :func:`failover_device` says, and
    :class:`NoDeviceLeft` is raised when no device is left.
    """
    hooks = hooks or RunHooks()
    started = time.perf_counter()
    schedule = GuidanceSchedule(
        mode=request.mode,
        steps=request.steps,
        knobs=request.knobs,
        guidance=request.guidance_scale > 1.0,
        device=request.device,
        devices=transport.num_devices,
        pair=request.pair,
        mode_requested=request.mode_requested,
    )
    scheduler = latent_math.new_scheduler(request.steps, request.height, request.width)
    latents = latent_math.prepare_latents(scheduler, request.seed, request.height, request.width)
    extra = latent_math.extra_conditioning(request.height, request.width)
    cond = {branch: {**tensors, **extra} for branch, tensors in branch_cond.items()}
    stale: dict[str, torch.Tensor] = {}
    report = LoopReport(schedule={})

    phases_run: list[Phase] = []
    lost: set[int] = set()  # devices that failed during this run: never used again by it

    for step, timestep in enumerate(scheduler.timesteps):
        step_started = time.perf_counter()
        hooks.check(step)
        if may_yield(schedule, step):
            view = hooks.board_view()
            if view is not None:
                device = deadline.yield_device(schedule, step, view)
            else:
                loads = hooks.loads()
                device = None if loads is None else yield_device(schedule, step, loads)
            if device is not None:
                schedule.continue_serially(step, device)
                hooks.occupy(schedule.devices_in_use)
            report.placement_seconds += time.perf_counter() - step_started
        elif may_grow(schedule, step):
            view = hooks.board_view()
            device = None if view is None else deadline.grow_device(schedule, step, view)
            if device is not None:
                schedule.grow(step, device)
                hooks.occupy(schedule.devices_in_use)
            report.placement_seconds += time.perf_counter() - step_started
        model_input = latent_math.scale_model_input(scheduler, latents, timestep)
        failed_over = False
        while True:
            plan = schedule.plan(step)
            eps_devices = {a.device for a in plan.eps_assignments}
            tasks = [
                DenoiseTask(
                    sample=model_input,
                    timestep=timestep.reshape(1).to(torch.float32),
                    cond={name: torch.cat([cond[b][name] for b in a.branches]) for name in cond[a.branches[0]]},
                    stage=a.stage,
                    stale={n: stale[n] for n in family.stage_imports(a.stage)} if a.stage is not None else {},
                    capture_stage=a.capture_stage,
                    want_eps=a.device in eps_devices,
                )
                for a in plan.assignments
            ]
            # Every device's call finishes (no orphaned work) before a failure is acted on.
            results = await asyncio.gather(
                *(transport.denoise(a.device, task) for a, task in zip(plan.assignments, tasks, strict=True)),
                return_exceptions=True,
            )
            for result in results:
                if isinstance(result, BaseException) and not isinstance(result, DeviceUnavailable):
                    raise result
            failures = [r for r in results if isinstance(r, DeviceUnavailable)]
            if not failures:
                break
            failed_over = True
            _fail_over(schedule, step, failures, lost, hooks, transport.num_devices)
        outputs: list[DenoiseOutput] = list(results)
        hooks.answered({a.device for a in plan.assignments})
        phases_run.append(plan.phase)
        for a, out in zip(plan.assignments, outputs, strict=True):
            report.device_seconds[a.device] = report.device_seconds.get(a.device, 0.0) + out.compute_seconds
        longest_compute = max(out.compute_seconds for out in outputs)
        report.batched_steps += any(out.batched_requests > 1 for out in outputs)
        report.bytes_to_devices += sum(t.nbytes() for t in tasks)
        report.bytes_from_devices += sum(_output_nbytes(o) for o in outputs)

        eps: dict[str, torch.Tensor] = {}
        for a, out in zip(plan.assignments, outputs, strict=True):
            stale.update(out.activations)
            if a.device in eps_devices:
                for branch, branch_eps in zip(a.branches, out.eps.float().chunk(len(a.branches)), strict=True):
                    eps.setdefault(branch, branch_eps)
        if UNCOND in eps:
            eps_u, eps_c = eps[UNCOND], eps[COND]
            diff = eps_c - eps_u
            guided = eps_u + request.guidance_scale * diff
            step_rel_mae = rel_mae(diff.abs().mean().item(), eps_u.abs().mean().item())
        else:
            guided, step_rel_mae = eps[COND], None
        schedule.observe(step, step_rel_mae)
        latents = latent_math.step(scheduler, guided, timestep, latents)
        step_seconds = time.perf_counter() - step_started
        report.overhead_seconds += max(step_seconds - longest_compute, 0.0)
        phase = plan.phase.value
        report.phase_seconds[phase] = report.phase_seconds.get(phase, 0.0) + step_seconds
        kind = _COST_KINDS.get(plan.phase)
        sample = None
        if kind is not None and not failed_over:
            batched = max(out.batched_requests for out in outputs)
            sample = deadline.StepSample(kind, batched, step_seconds, longest_compute)
        recorded = time.perf_counter()
        hooks.advanced(request.steps - step - 1, may_yield(schedule, step + 1), sample)
        report.placement_seconds += time.perf_counter() - recorded

    report.schedule = schedule.summary(phases_run)
    report.loop_seconds = time.perf_counter() - started
    return latents, report


# The phases whose steps the board learns costs from (a pipeline step is neither a serial nor a split step).
_COST_KINDS = {Phase.SERIAL: "serial", Phase.PARTITION: "split"}


def _fail_over(
    schedule: GuidanceSchedule,
    step: int,
    failures: list[DeviceUnavailable],
    lost: set[int],
    hooks: RunHooks,
    num_devices: int,
) -> None:
    """Record the failed devices and re-place the run where the policy says (step ``step`` runs again)."""
    up: list[bool] | None = None
    for failure in failures:
        lost.add(failure.device)
        up = hooks.device_failed(failure.device)
    alive = [(up is None or up[d]) and d not in lost for d in range(num_devices)]
    for failure in failures:
        device = failover_device(schedule, failure.device, alive, hooks.loads())
        if device is None:
            reasons = "; ".join(str(f) for f in failures)
            raise NoDeviceLeft(f"no device left to run step {step} of {schedule.steps} ({reasons})")
        schedule.fail_over(step, failure.device, device)
    hooks.occupy(schedule.devices_in_use)

"""Triton model ``<family>_orchestrator``: the BLS model that runs the whole request.

The public front ``<family>`` (:mod:`.front`) hands it the client's request. It validates the request, has
``<family>_text_encoder`` encode the prompts, runs :func:`hybridiff.loop.denoise_image` with a transport whose
devices are the ``<family>_denoiser_<i>`` models (called with ``async_exec``, so that work for different
devices runs at the same time), and has ``<family>_vae`` decode the latents. Stale activations live here
between steps, and every tensor that moves between devices passes through here. The loop asks the policy;
this glue only reports the world to it (the in-flight board, which devices answer, cancellation, the
deadline) and turns its outcome into responses. A text encoder or VAE that is gone for a while (its stub
died, the supervisor reloads it) is waited for (:mod:`hybridiff.outage`). The client's cancel reaches it
as a mark the front sets under the request's ``REQUEST_KEY`` (:class:`hybridiff.inflight.CancelMark`), its
deadline as the BLS request's timeout.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time

import numpy as np
import torch

from .. import wire
from ..admission import QueueLimits, admit
from ..deadline import EWMA_ALPHA, BoardView, StepSample, place, view_of
from ..families import get_family
from ..families.base import DenoiseOutput, Family
from ..inflight import (
    WAITING_PREFIX,
    CancelMark,
    InFlightBoard,
    Job,
    Occupancy,
    Snapshot,
    default_board_path,
    remove_dead_boards,
)
from ..loop import DenoiseTask, DeviceUnavailable, ImageRequest, RunHooks, denoise_image
from ..outage import ModelGone, OutagePolicy, StillGone, call_through_outage
from ..params import InvalidParameter
from ..schedule import COND, UNCOND, Mode, NoDeviceLeft
from ..serving_defaults import read_serving_defaults
from ..validation import check_request_key, check_text_conditioning, model_limits
from .bls import RunStopped, bls_exec, check_request, device_gone, error_response, image_requests_of, input_array
from .common import from_triton, model_context, to_triton
from .metrics import OrchestratorMetrics


class DeviceError(RuntimeError):
    """An internal model answered with an error that is not its being gone (a bug, bad input)."""


class InputRefused(RuntimeError):
    """The text encoder refused the request's input (e.g. an SD3 prompt over its token limit)."""


class Refused(RuntimeError):
    """The request was refused before it started (the server cannot serve it in time now): retryable."""


async def call_model(pb, model: str, inputs: list, outputs: list[str], fields: tuple[str, ...] = ()):
    """One BLS call of an internal model; its reply, or :class:`ModelGone` when the model is gone,
    :class:`InputRefused` when it refused the request's own ``fields`` (the prompts the text encoder was
    passed: an SD3 prompt over its T5 length), :class:`DeviceError` else."""
    reply, code, message, _ = await bls_exec(
        pb, pb.InferenceRequest(model_name=model, inputs=inputs, requested_output_names=outputs)
    )
    if reply is not None:
        return reply
    if fields and code == "INVALID_ARG":
        raise InputRefused(message)
    if device_gone(code, message):
        raise ModelGone(model, message)
    raise DeviceError(f"{model}: {message}")


class BLSTransport:
    """Devices reached as Triton models through business-logic scripting."""

    def __init__(self, family: Family, model_names: list[str], wire_dtype: torch.dtype, gpu_memory: bool) -> None:
        import triton_python_backend_utils as pb_utils

        self.pb = pb_utils
        self.family = family
        self.model_names = model_names
        self.num_devices = len(model_names)
        self.wire_dtype = wire_dtype
        self.gpu_memory = gpu_memory

    def _preferred_memory(self, device: int):
        if not self.gpu_memory:
            return None
        return self.pb.PreferredMemory(self.pb.TRITONSERVER_MEMORY_GPU, device)

    async def denoise(self, device: int, task: DenoiseTask) -> DenoiseOutput:
        # Every input carries the request's batch (its branches) first, so Triton's dynamic
        # batcher can queue requests that meet on this device together.
        batch = next(iter(task.cond.values())).shape[0]

        def per_sample(value: float, dtype: torch.dtype) -> torch.Tensor:
            return torch.full((batch, 1), value, dtype=dtype)

        def stage_index(stage: int | None) -> torch.Tensor:
            return per_sample(wire.NO_STAGE if stage is None else stage, torch.int32)

        inputs = [
            to_triton(wire.SAMPLE.name, task.sample.to(torch.float32).expand(batch, *task.sample.shape[1:])),
            to_triton(wire.TIMESTEP.name, per_sample(float(task.timestep.reshape(-1)[0]), torch.float32)),
            to_triton(wire.STAGE.name, stage_index(task.stage)),
            to_triton(wire.CAPTURE_STAGE.name, stage_index(task.capture_stage)),
        ]
        inputs += [to_triton(name, t.to(self.wire_dtype)) for name, t in task.cond.items()]
        inputs += [to_triton(name, t.to(self.wire_dtype)) for name, t in task.stale.items()]
        export_stage = task.stage if task.stage is not None else task.capture_stage
        exports = list(self.family.stage_exports[export_stage]) if export_stage is not None else []
        requested = [wire.EPS.name] if task.want_eps else []
        requested += exports + [wire.COMPUTE_SECONDS.name, wire.BATCHED_REQUESTS.name]
        kwargs = {}
        memory = self._preferred_memory(device)
        if memory is not None:
            kwargs["preferred_memory"] = memory
        model = self.model_names[device]
        request = self.pb.InferenceRequest(model_name=model, inputs=inputs, requested_output_names=requested, **kwargs)
        reply, code, message, _ = await bls_exec(self.pb, request)
        if reply is None:
            text = f"{model}: {message}"
            if device_gone(code, message):
                raise DeviceUnavailable(device, text)
            raise DeviceError(text)

        def output(name: str) -> torch.Tensor:
            return from_triton(self.pb.get_output_tensor_by_name(reply, name))

        eps = output(wire.EPS.name) if task.want_eps else None
        compute_seconds = float(output(wire.COMPUTE_SECONDS.name).reshape(-1)[0])
        batched = int(output(wire.BATCHED_REQUESTS.name).reshape(-1)[0])
        return DenoiseOutput(eps, {name: output(name) for name in exports}, compute_seconds, batched)


class BoardHooks(RunHooks):
    """The loop's view of this server: loads and down devices on the shared board, the client's
    cancellation and the request's deadline."""

    def __init__(self, occupancy: Occupancy, devices: list[int], cancelled, deadline: float | None, log) -> None:
        self.occupancy, self.devices, self.cancelled, self.deadline, self.log = (
            occupancy, devices, cancelled, deadline, log)

    def check(self, step: int) -> None:
        check_request(self.cancelled, self.deadline, f"step {step}")

    def loads(self) -> list[int]:
        return self.occupancy.loads()

    def board_view(self) -> BoardView:
        return view_of(self.occupancy.snapshot(), self.occupancy.key, self.occupancy.job.cost_key)

    def advanced(self, steps_left: int, may_yield: bool, sample: StepSample | None) -> None:
        self.occupancy.progress(steps_left, may_yield, sample)

    def device_failed(self, device: int) -> list[bool]:
        self.log.log_warn(f"denoiser device {device} is gone; marked down, the run fails over")
        return self.occupancy.board.mark_down(device)

    def occupy(self, devices: tuple[int, ...]) -> None:
        self.occupancy.update(devices)
        self.devices[:] = devices

    def answered(self, devices: set[int]) -> None:
        for device in devices & self.occupancy.probing:
            self.occupancy.board.mark_up(device)
            self.occupancy.probing.discard(device)
            self.log.log_info(f"denoiser device {device} answers again; marked up")


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        import triton_python_backend_utils as pb_utils

        self.pb = pb_utils
        context = model_context(args)
        params = context.params
        self.family = get_family(params["family"])
        self.latent_math = self.family.load_latent_math(context.checkpoint)
        self.shapes = self.family.model_shapes(context.checkpoint)
        self.limits = model_limits(params, self.shapes)
        self.defaults = read_serving_defaults(context.checkpoint, self.family.defaults, self.limits)
        self.text_encoder, self.vae = params["text_encoder"], params["vae"]
        self.outage = OutagePolicy()
        self.transport = BLSTransport(
            self.family,
            params["denoisers"].split(","),
            context.instance.dtype,
            gpu_memory=params.get("bls_memory", "cpu") == "gpu",
        )
        board_path = default_board_path()
        remove_dead_boards(board_path.parent)
        self.board = InFlightBoard(board_path, self.transport.num_devices)
        self.metrics = OrchestratorMetrics(self.family.name)
        self.queues = QueueLimits(
            max_per_device=int(params.get("max_per_device", "0")),
            start_timeout_us=int(params.get("start_timeout_us", "0")),
            admit_by_deadline=params.get("admit_by_deadline", "1") == "1",
        )
        self.decode_s: dict[str, float] = {}  # cost key -> seconds to decode one image (moving average)

    async def _denoise_placed(
        self, image_request: ImageRequest, branch_cond, cancelled, deadline: float | None, key: str | None = None
    ) -> tuple[torch.Tensor, dict]:
        """Place the request by the board (the policy: ``deadline.place``), then run the loop there.

        The request's deadline (counted from its arrival at the front) and steps go on the board with its
        devices, for the ``auto`` choices of later requests; its entry replaces the front's waiting one (``key``).
        """
        guidance = image_request.guidance_scale > 1.0
        cost_key = f"{self.family.name}:{image_request.height}x{image_request.width}"
        seconds_left = None if deadline is None else deadline - time.monotonic()
        job = Job(image_request.steps, cost_key, None if seconds_left is None else self.board.clock() + seconds_left)

        # What the denoising may take: the time left less this size's decoding, which follows it.
        denoise_s = None if seconds_left is None else seconds_left - self.decode_s.get(cost_key, 0.0)

        def choose(snapshot: Snapshot):
            view = view_of(snapshot, None, cost_key)
            mine = None if key is None else WAITING_PREFIX + key
            queued = any(job.get("waiting") for k, job in snapshot.jobs.items() if k != mine)
            decided = place(image_request.mode, guidance, image_request.steps, denoise_s, view.costs,
                            view.others, snapshot.loads, snapshot.up, self.queues.admit_by_deadline, cost_key,
                            queued)
            if decided.refused is not None:
                return (decided, snapshot.loads), ()
            placement = decided.placement
            job.may_yield = image_request.mode is Mode.AUTO and placement.mode is Mode.HYBRID
            return (decided, snapshot.loads), placement.devices

        with self.board.occupy(choose, job, key) as occupancy:
            decided, loads = occupancy.decision
            if decided.refused is not None:
                self.pb.Logger.log_info(
                    f"{self.family.name}: refused at placement with {_seconds(seconds_left)} left (predicted "
                    f"{_seconds(decided.predicted_s)}, loads {loads})"
                )
                raise Refused(decided.refused)
            placement = decided.placement
            placed = dataclasses.replace(
                image_request,
                mode=placement.mode,
                device=placement.device,
                pair=placement.pair,
                mode_requested=image_request.mode,
            )
            devices = list(placement.devices)
            hooks = BoardHooks(occupancy, devices, cancelled, deadline, self.pb.Logger)
            try:
                latents, report = await denoise_image(
                    self.family, self.latent_math, self.transport, branch_cond, placed, hooks
                )
            except RunStopped as stopped:
                if stopped.code == "UNAVAILABLE":  # past its deadline: how it was placed, to check the policy by
                    self.pb.Logger.log_warn(
                        f"{self.family.name}: a request placed {placement.mode.value} on devices {devices} by the "
                        f"{decided.rule} rule (predicted {_seconds(decided.predicted_s)}, {_seconds(denoise_s)} to "
                        f"denoise, loads {loads}) ran past its deadline: {stopped}"
                    )
                raise
        summary = {"seed": image_request.seed, **report.as_dict(), "devices": devices, "loads_seen": loads,
                   "placed_by": decided.rule, "predicted_s": decided.predicted_s,
                   "deadline_left_s": None if seconds_left is None else round(seconds_left, 3)}
        self.metrics.record(summary)
        return latents, summary

    def _learn_decode(self, image_request: ImageRequest, seconds: float, images: int) -> None:
        """Fold one decoding's seconds per image into this size's average, which placement subtracts from a
        request's time left (the deadline stops denoising, not decoding)."""
        key = f"{self.family.name}:{image_request.height}x{image_request.width}"
        old = self.decode_s.get(key)
        per_image = seconds / max(images, 1)
        self.decode_s[key] = per_image if old is None else (1 - EWMA_ALPHA) * old + EWMA_ALPHA * per_image

    async def execute(self, requests):
        return list(await asyncio.gather(*(self._execute_one(r) for r in requests)))

    async def _call_through_outage(
        self, model: str, inputs: list, outputs: list[str], cancelled, deadline, before, fields: tuple[str, ...] = ()
    ):
        """A BLS call of the text encoder or the VAE, waited through an outage of that model; ``fields``: the
        request's inputs it was passed, whose refusal is the client's error."""

        def check_cancelled() -> None:
            check_request(cancelled, None, before)  # the deadline ends the wait with StillGone, naming the model

        return await call_through_outage(
            lambda: call_model(self.pb, model, inputs, outputs, fields), self.outage,
            deadline=deadline, check_cancelled=check_cancelled,
        )

    async def _encode(self, request, cancelled, deadline: float | None) -> dict[str, torch.Tensor]:
        """The text encoder's per-branch embeddings (``uncond_<name>``, ``cond_<name>``) of the prompts."""
        given = (self.pb.get_input_tensor_by_name(request, spec.name) for spec in wire.PROMPT_INPUTS)
        inputs = [tensor for tensor in given if tensor is not None]  # the request's own tensors, passed on
        names = [t.name for t in self.family.wire.branch_outputs()]
        fields = tuple(spec.name for spec in wire.PROMPT_INPUTS)
        reply = await self._call_through_outage(
            self.text_encoder, inputs, names, cancelled, deadline, "encoding the prompts", fields
        )
        embeds = {name: from_triton(self.pb.get_output_tensor_by_name(reply, name)).clone() for name in names}
        try:
            check_text_conditioning({n: tuple(t.shape) for n, t in embeds.items()}, self.shapes, self.limits)
        except InvalidParameter as err:
            raise DeviceError(f"{self.text_encoder} answered unexpected embeddings: {err}") from err
        return embeds

    async def _decode(self, latents: torch.Tensor, cancelled, deadline: float | None):
        """The VAE's images (a Triton tensor) of the latents."""
        inputs = [to_triton(wire.LATENTS.name, latents)]
        reply = await self._call_through_outage(
            self.vae, inputs, [wire.IMAGE.name], cancelled, deadline, "decoding the latents"
        )
        image = from_triton(self.pb.get_output_tensor_by_name(reply, wire.IMAGE.name))
        return to_triton(wire.IMAGE.name, image.clone())

    def _deadline_since_arrival(self, key: str | None, deadline: float | None) -> float | None:
        """The request's deadline counted from its arrival at the front (recorded on the board with its
        waiting entry), not from when this instance took it: the time it waited for an instance is spent."""
        arrived_with = None if key is None else self.board.waited_deadline(key)
        if arrived_with is None:
            return deadline
        from_front = time.monotonic() + arrived_with - self.board.clock()
        return from_front if deadline is None else min(deadline, from_front)

    async def _execute_one(self, request):
        timeout_us = request.timeout()
        deadline = time.monotonic() + timeout_us / 1e6 if timeout_us else None
        try:
            key = check_request_key(input_array(request, wire.REQUEST_KEY.name))
        except InvalidParameter as err:
            return error_response(str(err))
        deadline = self._deadline_since_arrival(key, deadline)
        refused = await admit(self.board.loads, self.queues, request.timeout())
        if refused is not None:
            return error_response(refused, "UNAVAILABLE")
        try:
            image_requests = image_requests_of(request, self.defaults, self.limits)
        except InvalidParameter as err:
            return error_response(str(err))
        mark = CancelMark(key) if key is not None else None

        def cancelled() -> bool:
            """The client's cancel: seen by the front (its mark), or by this model when called directly."""
            return (mark is not None and mark.is_set()) or request.is_cancelled()

        latents, schedules = [], []
        try:
            check_request(cancelled, deadline, "encoding the prompts")
            embeds = await self._encode(request, cancelled, deadline)
            for i, image_request in enumerate(image_requests):
                branch_cond = {
                    branch: {
                        t.name: embeds[wire.branch_name(branch, t.name)][i : i + 1] for t in self.family.text_outputs
                    }
                    for branch in (UNCOND, COND)
                }
                image_latents, summary = await self._denoise_placed(
                    image_request, branch_cond, cancelled, deadline, key
                )
                latents.append(image_latents)
                schedules.append(json.dumps(summary))
            # Only a cancel stops a finished run here: the deadline bounds the waiting, not the decoding.
            check_request(cancelled, None, "decoding the latents")
            decode_started = time.monotonic()
            image = await self._decode(torch.cat(latents), cancelled, deadline)
            self._learn_decode(image_requests[0], time.monotonic() - decode_started, len(latents))
        except InputRefused as err:
            return error_response(str(err), "INVALID_ARG")
        except DeviceError as err:
            return error_response(str(err), "INTERNAL")
        except NoDeviceLeft as err:
            return error_response(
                f"no {self.family.name} denoiser device is up ({err}); retry once a device is back", "UNAVAILABLE"
            )
        except (StillGone, Refused) as err:
            return error_response(str(err), "UNAVAILABLE")
        except RunStopped as err:
            self.pb.Logger.log_info(f"{self.family.name}: {err}")
            return error_response(str(err), err.code)
        schedule_tensor = self.pb.Tensor(wire.SCHEDULE.name, np.array(schedules, dtype=object))
        return self.pb.InferenceResponse(output_tensors=[image, schedule_tensor])


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} s"

"""Triton model ``<family>_orchestrator``: the BLS model that runs the denoising loop.

It validates the request, then runs :func:`hybridiff.loop.denoise_image` with a transport whose
devices are the ``<family>_denoiser_<i>`` models, called with ``async_exec`` so that work for
different devices runs at the same time. Stale activations live here between steps, and every
tensor that moves between devices passes through here.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json

import numpy as np
import torch

from .. import wire
from ..admission import QueueLimits, admit
from ..families import get_family
from ..families.base import DenoiseOutput, Family
from ..load import LoadBoard, default_board_path, remove_dead_boards
from ..loop import DenoiseTask, ImageRequest, denoise_image
from ..params import InvalidParameter, parse_image_requests
from ..schedule import COND, UNCOND, Mode, may_yield, place_request, yield_device
from ..validation import check_text_conditioning, model_limits
from .common import (
    error_response,
    from_triton,
    input_array,
    input_tensor,
    model_context,
    to_triton,
    unavailable_response,
)
from .metrics import OrchestratorMetrics


class DeviceError(RuntimeError):
    """A denoiser model answered with an error."""


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
        request = self.pb.InferenceRequest(
            model_name=self.model_names[device], inputs=inputs, requested_output_names=requested, **kwargs
        )
        reply = await request.async_exec()
        if reply.has_error():
            raise DeviceError(f"{self.model_names[device]}: {reply.error().message()}")

        def output(name: str) -> torch.Tensor:
            return from_triton(self.pb.get_output_tensor_by_name(reply, name))

        eps = output(wire.EPS.name) if task.want_eps else None
        compute_seconds = float(output(wire.COMPUTE_SECONDS.name).reshape(-1)[0])
        batched = int(output(wire.BATCHED_REQUESTS.name).reshape(-1)[0])
        return DenoiseOutput(eps, {name: output(name) for name in exports}, compute_seconds, batched)


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        import triton_python_backend_utils as pb_utils

        self.pb = pb_utils
        context = model_context(args)
        params = context.params
        self.family = get_family(params["family"])
        self.sampler = self.family.load_sampler(context.checkpoint)
        self.shapes = self.family.model_shapes(context.checkpoint)
        self.limits = model_limits(params, self.shapes)
        self.transport = BLSTransport(
            self.family,
            params["denoisers"].split(","),
            context.placement.dtype,
            gpu_memory=params.get("bls_memory", "cpu") == "gpu",
        )
        board_path = default_board_path()
        remove_dead_boards(board_path.parent)
        self.board = LoadBoard(board_path, self.transport.num_devices)
        self.metrics = OrchestratorMetrics(self.family.name)
        self.queues = QueueLimits(
            max_per_device=int(params.get("max_per_device", "0")),
            start_timeout_us=int(params.get("start_timeout_us", "0")),
        )

    async def _denoise_placed(self, image_request: ImageRequest, branch_cond) -> tuple[torch.Tensor, dict]:
        """Place the request by the load on the devices (the policy), then run the loop there."""
        guidance = image_request.guidance_scale > 1.0

        def choose(loads: list[int]):
            placement = place_request(image_request.mode, loads, guidance)
            return (placement, loads), placement.devices

        with self.board.occupy(choose) as occupancy:
            placement, loads = occupancy.decision
            placed = dataclasses.replace(
                image_request, mode=placement.mode, device=placement.device, pair=placement.pair
            )
            devices = list(placement.devices)

            def before_step(step: int, schedule) -> None:
                # Only runs that auto placed may change shape; an explicit mode is a promise. Once the
                # run can no longer yield (pipeline started, or already serial), skip the board read.
                if image_request.mode is not Mode.AUTO or not may_yield(schedule, step):
                    return
                device = yield_device(schedule, step, occupancy.loads())
                if device is not None:
                    schedule.continue_serially(step, device)
                    occupancy.update((device,))
                    devices[:] = [device]

            latents, report = await denoise_image(
                self.family, self.sampler, self.transport, branch_cond, placed, before_step
            )
        summary = {
            "seed": image_request.seed,
            **report.as_dict(),
            "mode_requested": image_request.mode.value,
            "devices": devices,
            "loads_seen": loads,
        }
        self.metrics.record(summary)
        return latents, summary

    async def execute(self, requests):
        return list(await asyncio.gather(*(self._execute_one(r) for r in requests)))

    async def _execute_one(self, request):
        refused = await admit(self.board.loads, self.queues, request.timeout())
        if refused is not None:
            return unavailable_response(refused)
        names = [t.name for t in self.family.wire.branch_outputs()]
        embeds = {name: input_tensor(request, name) for name in names}
        try:
            shapes = {name: None if t is None else tuple(t.shape) for name, t in embeds.items()}
            batch = check_text_conditioning(shapes, self.shapes, self.limits)
            scalars = {spec.name: input_array(request, spec.name) for spec in wire.scalar_inputs()}
            image_requests = parse_image_requests(scalars, self.family.defaults, self.limits, batch)
        except InvalidParameter as err:
            return error_response(str(err))
        latents, schedules = [], []
        try:
            for i, image_request in enumerate(image_requests):
                branch_cond = {
                    branch: {
                        t.name: embeds[wire.branch_name(branch, t.name)][i : i + 1] for t in self.family.text_outputs
                    }
                    for branch in (UNCOND, COND)
                }
                image_latents, summary = await self._denoise_placed(image_request, branch_cond)
                latents.append(image_latents)
                schedules.append(json.dumps(summary))
        except DeviceError as err:
            return error_response(str(err), invalid_argument=False)
        schedule_tensor = self.pb.Tensor(wire.SCHEDULE.name, np.array(schedules, dtype=object))
        return self.pb.InferenceResponse(
            output_tensors=[to_triton(wire.LATENTS.name, torch.cat(latents)), schedule_tensor]
        )

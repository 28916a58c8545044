"""Triton model ``<family>_denoiser_<i>``: one device's denoiser, stateless.

A request says what to run: the whole denoiser for the batch of conditionings it carries, or one
pipeline stage fed the stale activations it carries; the response holds the noise prediction
and/or the activations this device hands to the other stage. One model name per device, because
BLS cannot pick a model instance.
"""

from __future__ import annotations

import torch

from .. import wire
from ..batching import run_tasks
from ..families import get_family
from ..families.base import DenoiseOutput
from ..loop import DenoiseTask
from .common import error_response, input_tensor, model_context, response


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        context = model_context(args)
        self.family = get_family(context.params["family"])
        self.denoiser = self.family.load_denoiser(
            context.checkpoint, context.placement.device, context.placement.dtype
        )

    def execute(self, requests):
        """Requests queued while the device was busy arrive together; compatible ones share a forward."""
        responses: list = [None] * len(requests)
        tasks, indices = [], []
        for index, request in enumerate(requests):
            try:
                tasks.append(self._task(request))
                indices.append(index)
            except (ValueError, KeyError) as err:
                responses[index] = error_response(f"denoiser: {err}")
        try:
            outputs = run_tasks(self.denoiser, tasks)
        except (ValueError, KeyError, RuntimeError) as err:
            for index in indices:
                responses[index] = error_response(f"denoiser: {err}")
            return responses
        for index, task, output in zip(indices, tasks, outputs, strict=True):
            responses[index] = self._response(task, output)
        return responses

    def _task(self, request) -> DenoiseTask:
        stage = int(input_tensor(request, wire.STAGE.name).reshape(-1)[0])
        capture_stage = int(input_tensor(request, wire.CAPTURE_STAGE.name).reshape(-1)[0])
        stale = {}
        for spec in self.family.activations:
            value = input_tensor(request, spec.name)
            if value is not None:
                stale[spec.name] = value
        return DenoiseTask(
            sample=input_tensor(request, wire.SAMPLE.name),
            timestep=input_tensor(request, wire.TIMESTEP.name).reshape(-1)[:1],
            cond={spec.name: input_tensor(request, spec.name) for spec in self.family.conditioning},
            stage=None if stage == wire.NO_STAGE else stage,
            stale=stale,
            capture_stage=None if capture_stage == wire.NO_STAGE else capture_stage,
            want_eps=True,
        )

    @staticmethod
    def _response(task: DenoiseTask, output: DenoiseOutput):
        batch = task.sample.shape[0]
        tensors = dict(output.activations)
        if output.eps is not None:
            tensors[wire.EPS.name] = output.eps
        tensors[wire.COMPUTE_SECONDS.name] = torch.full((batch, 1), output.compute_seconds, dtype=torch.float64)
        tensors[wire.BATCHED_REQUESTS.name] = torch.full((batch, 1), output.batched_requests, dtype=torch.int32)
        return response(tensors)

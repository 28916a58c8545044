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
from ..validation import check_denoiser_inputs, model_limits
from .bls import error_response
from .common import input_tensor, model_context, response


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        context = model_context(args)
        self.family = get_family(context.params["family"])
        self.shapes = self.family.model_shapes(context.checkpoint)
        self.limits = model_limits(context.params, self.shapes)
        self.max_device_batch = int(context.params["max_device_batch"])
        self.denoiser = self.family.load_denoiser(
            context.checkpoint, context.instance.device, context.instance.dtype
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
        """The request's task, after its inputs passed the same limits as a public request's (else
        InvalidParameter naming the input)."""
        scalars = (wire.TIMESTEP.name, wire.STAGE.name, wire.CAPTURE_STAGE.name)
        names = [wire.SAMPLE.name, *scalars, *(t.name for t in self.family.conditioning + self.family.activations)]
        tensors = {name: input_tensor(request, name) for name in names}
        values = {name: [] if tensors[name] is None else tensors[name].reshape(-1).tolist() for name in scalars}
        call = check_denoiser_inputs(
            {name: None if t is None else tuple(t.shape) for name, t in tensors.items()},
            *(values[name] for name in scalars),
            self.shapes,
            self.limits,
            self.max_device_batch,
        )
        return DenoiseTask(
            sample=tensors[wire.SAMPLE.name],
            timestep=tensors[wire.TIMESTEP.name].reshape(-1)[:1],
            cond={t.name: tensors[t.name] for t in self.family.conditioning},
            stage=call.stage,
            stale={t.name: tensors[t.name] for t in self.family.activations if tensors[t.name] is not None},
            capture_stage=call.capture_stage,
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

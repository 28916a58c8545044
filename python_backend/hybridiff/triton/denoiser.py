"""Triton model ``<family>_denoiser_<i>``: one device's denoiser, stateless.

A request says what to run: the whole denoiser for the batch of conditionings it carries, or one
pipeline stage fed the stale activations it carries; the response holds the noise prediction
and/or the activations this device hands to the other stage. One model name per device, because
BLS cannot pick a model instance.
"""

from __future__ import annotations

import torch

from ..families import get_family
from .common import error_response, input_tensor, model_context, response


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        context = model_context(args)
        self.family = get_family(context.params["family"])
        self.denoiser = self.family.load_denoiser(
            context.checkpoint, context.placement.device, context.placement.dtype
        )

    def execute(self, requests):
        return [self._execute_one(request) for request in requests]

    def _execute_one(self, request):
        try:
            stage = int(input_tensor(request, "STAGE").item())
            capture_stage = int(input_tensor(request, "CAPTURE_STAGE").item())
            cond = {spec.name: input_tensor(request, spec.name) for spec in self.family.conditioning}
            stale = {}
            for spec in self.family.activations:
                value = input_tensor(request, spec.name)
                if value is not None:
                    stale[spec.name] = value
            output = self.denoiser.run(
                input_tensor(request, "SAMPLE"),
                input_tensor(request, "TIMESTEP"),
                cond,
                stage=None if stage < 0 else stage,
                stale=stale,
                capture_stage=None if capture_stage < 0 else capture_stage,
            )
        except (ValueError, KeyError, RuntimeError) as err:
            return error_response(f"denoiser: {err}")
        tensors = dict(output.activations)
        if output.eps is not None:
            tensors["EPS"] = output.eps
        tensors["COMPUTE_SECONDS"] = torch.tensor([output.compute_seconds], dtype=torch.float64)
        return response(tensors)

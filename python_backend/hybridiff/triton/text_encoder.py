"""Triton model ``<family>_text_encoder``: prompts to per-branch conditioning tensors."""

from __future__ import annotations

from .. import wire
from ..families import get_family
from ..params import InvalidParameter, Limits, parse_prompts
from .bls import error_response, input_array
from .common import model_context, response


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        context = model_context(args)
        family = get_family(context.params["family"])
        self.limits = Limits.from_parameters(context.params)
        self.encoder = family.load_text_encoder(context.checkpoint, context.instance.device, context.instance.dtype)

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                prompts, negatives = parse_prompts(
                    *(input_array(request, spec.name) for spec in wire.PROMPT_INPUTS), self.limits
                )
                responses.append(response(self.encoder.encode(prompts, negatives)))
            except InvalidParameter as err:
                responses.append(error_response(str(err)))
        return responses

"""Triton model ``<family>_vae``: latents to uint8 images (NHWC)."""

from __future__ import annotations

import torch

from .. import wire
from ..families import get_family
from ..params import InvalidParameter
from ..validation import check_vae_latents, model_limits
from .bls import error_response
from .common import input_tensor, model_context, response


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        context = model_context(args)
        family = get_family(context.params["family"])
        self.shapes = family.model_shapes(context.checkpoint)
        self.limits = model_limits(context.params, self.shapes)
        self.decoder = family.load_decoder(context.checkpoint, context.instance.device, context.instance.dtype)

    def execute(self, requests):
        responses = []
        for request in requests:
            latents = input_tensor(request, wire.LATENTS.name)
            try:
                check_vae_latents(None if latents is None else tuple(latents.shape), self.shapes, self.limits)
            except InvalidParameter as err:
                responses.append(error_response(str(err)))
                continue
            image = torch.from_numpy(self.decoder.decode(latents))
            responses.append(response({wire.IMAGE.name: image}))
        return responses

"""Triton model ``<family>_vae``: latents to uint8 images (NHWC)."""

from __future__ import annotations

import torch

from .. import wire
from ..families import get_family
from .common import error_response, input_tensor, model_context, response


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        context = model_context(args)
        family = get_family(context.params["family"])
        self.decoder = family.load_decoder(context.checkpoint, context.placement.device, context.placement.dtype)

    def execute(self, requests):
        responses = []
        for request in requests:
            latents = input_tensor(request, wire.LATENTS.name)
            if latents is None or latents.dim() != 4 or latents.shape[0] == 0:
                responses.append(error_response("LATENTS: expected a non-empty [N, C, H, W] tensor"))
                continue
            image = torch.from_numpy(self.decoder.decode(latents))
            responses.append(response({wire.IMAGE.name: image}))
        return responses

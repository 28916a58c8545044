"""The whole pipeline in one process: the same loop the orchestrator runs, with in-process devices.

Used by tests (parity with diffusers, the stale-activation checks) and by anyone who wants the
Hybridiff schedule without a server. The Triton models split exactly these pieces over processes.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import torch

from .families import get_family
from .host_memory import keep_freed_memory
from .loop import ImageRequest, InProcessTransport, LoopReport, Transport, denoise_image
from .schedule import COND, UNCOND
from .serving_defaults import read_serving_defaults


class LocalPipeline:
    def __init__(
        self,
        family_name: str,
        folder: Path,
        devices: int = 2,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        threaded: bool = False,
    ) -> None:
        device = torch.device(device)
        keep_freed_memory()  # as the server's stubs do, so local timings compare like with like
        self.family = get_family(family_name)
        self.defaults = read_serving_defaults(folder, self.family.defaults)  # with the checkpoint's own applied
        self.text_encoder = self.family.load_text_encoder(folder, device, dtype)
        self.latent_math = self.family.load_latent_math(folder)
        self.decoder = self.family.load_decoder(folder, device, dtype)
        self.denoisers = [self.family.load_denoiser(folder, device, dtype) for _ in range(devices)]
        self.transport: Transport = InProcessTransport(self.denoisers, threaded=threaded)

    def branch_conditioning(self, prompt: str, negative_prompt: str | None) -> dict[str, dict[str, torch.Tensor]]:
        encoded = self.text_encoder.encode([prompt], None if negative_prompt is None else [negative_prompt])
        return {
            branch: {spec.name: encoded[f"{branch}_{spec.name}"] for spec in self.family.text_outputs}
            for branch in (UNCOND, COND)
        }

    def generate(
        self, prompt: str, request: ImageRequest, negative_prompt: str | None = None
    ) -> tuple[np.ndarray, LoopReport, torch.Tensor]:
        """One image: uint8 HWC array, the loop's report, and the final latents."""
        cond = self.branch_conditioning(prompt, negative_prompt)
        latents, report = asyncio.run(denoise_image(self.family, self.latent_math, self.transport, cond, request))
        return self.decoder.decode(latents)[0], report, latents

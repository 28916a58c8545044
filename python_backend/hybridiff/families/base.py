"""What every model family (SDXL, SD3, ...) provides to the serving system.

A family owns the model math: loading a diffusers checkpoint folder, encoding prompts, preparing
latents and per-branch conditioning exactly as the diffusers pipeline does, one denoiser pass
(whole, or one pipeline stage fed stale activations), and decoding. Everything else (the
schedule, the loop, the Triton glue) is shared and family-agnostic.
"""

from __future__ import annotations

import json
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..schedule import COND, UNCOND
from ..stages import StageSplit, run_stage
from ..validation import ModelShapes
from ..wire import FamilyDefaults, FamilyWire, Tensor

Conditioning = dict[str, torch.Tensor]  # one guidance branch's tensors, batch 1


@dataclass(frozen=True)
class DenoiseOutput:
    eps: torch.Tensor | None  # noise (or velocity) prediction; None for a non-final stage
    activations: dict[str, torch.Tensor]  # wire name -> tensor, for the other stages
    compute_seconds: float = 0.0  # time on the device, to tell compute from orchestration overhead
    batched_requests: int = 1  # requests that shared this forward (dynamic batching on the device)


def torch_dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


def images_to_uint8(image: torch.Tensor) -> np.ndarray:
    """[-1, 1] NCHW decoder output to NHWC uint8, rounding as diffusers' ``output_type="pil"`` does."""
    image = (image / 2 + 0.5).clamp(0, 1)
    array = image.cpu().permute(0, 2, 3, 1).float().numpy()
    return (array * 255).round().astype("uint8")


class Denoiser(ABC):
    """One device's copy of the denoiser, runnable whole or as one stage of ``split``."""

    split: StageSplit

    def __init__(self, model: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> None:
        self.model = model.to(device=device, dtype=dtype).eval()
        self.device = device
        self.dtype = dtype

    @abstractmethod
    def _forward(self, sample: torch.Tensor, timestep: torch.Tensor, cond: Conditioning) -> Any:
        """Call the model exactly as the diffusers pipeline does; return its raw output tuple."""

    @abstractmethod
    def _bypass(self, name: str, module: torch.nn.Module, args: tuple, kwargs: dict) -> Any:
        """A cheap value of the right structure for a module whose value this stage never reads."""

    @abstractmethod
    def _pack(self, recorded: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Module outputs a stage exports -> tensors on the wire."""

    @abstractmethod
    def _unpack(self, wire: dict[str, torch.Tensor]) -> dict[str, Any]:
        """Tensors on the wire -> the module outputs they stand for."""

    @torch.inference_mode()
    def run(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        cond: Conditioning,
        stage: int | None = None,
        stale: dict[str, torch.Tensor] | None = None,
        capture_stage: int | None = None,
    ) -> DenoiseOutput:
        """One pass at the batch of ``cond`` (the latent is shared by every branch).

        ``stage=None`` runs the whole model (``capture_stage`` also returns that stage's exports:
        the pipeline warm-up); otherwise only stage ``stage`` computes, fed ``stale`` activations.
        """
        started = time.perf_counter()
        batch = next(iter(cond.values())).shape[0]
        sample = sample.to(self.device, self.dtype).expand(batch, *sample.shape[1:])
        timestep = timestep.to(self.device)
        cond = {k: v.to(self.device, self.dtype) for k, v in cond.items()}
        if stage is None and capture_stage is None:
            eps, activations = self._forward(sample, timestep, cond)[0], {}
        else:
            eps, activations = self._run_stage(sample, timestep, cond, stage, stale or {}, capture_stage)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return DenoiseOutput(eps, activations, time.perf_counter() - started)

    def _run_stage(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        cond: Conditioning,
        stage: int | None,
        stale: dict[str, torch.Tensor],
        capture_stage: int | None,
    ) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
        stale_modules = self._unpack({k: v.to(self.device, self.dtype) for k, v in stale.items()})
        record = self.split.exports[capture_stage] if capture_stage is not None else ()
        output, recorded = run_stage(
            self.model,
            lambda: self._forward(sample, timestep, cond),
            self.split,
            stage,
            stale_modules,
            self._bypass,
            record,
        )
        return (output[0] if output is not None else None), self._pack(recorded)


class TextEncoder(ABC):
    @abstractmethod
    def encode(self, prompts: list[str], negative_prompts: list[str] | None) -> dict[str, torch.Tensor]:
        """Prompts -> per-branch tensors named ``{UNCOND,COND}_{name}`` (batch = len(prompts))."""


def branch_tensors(cond: dict[str, torch.Tensor], uncond: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Name a text encoder's outputs per guidance branch, as :meth:`TextEncoder.encode` returns them."""
    return {**{f"{COND}_{k}": v for k, v in cond.items()}, **{f"{UNCOND}_{k}": v for k, v in uncond.items()}}


class Family(ABC):
    """A model family: its loaders; its tensors and defaults are in :mod:`hybridiff.wire` (``wire``)."""

    wire: FamilyWire

    @property
    def name(self) -> str:
        return self.wire.name

    @property
    def defaults(self) -> FamilyDefaults:
        """The family's own defaults; a checkpoint may override them (:mod:`hybridiff.serving_defaults`)."""
        return self.wire.defaults

    @property
    def text_outputs(self) -> tuple[Tensor, ...]:
        """Per-branch outputs of the text encoder."""
        return self.wire.text_outputs

    @property
    def conditioning(self) -> tuple[Tensor, ...]:
        """Per-branch inputs of the denoiser."""
        return self.wire.conditioning

    @property
    def activations(self) -> tuple[Tensor, ...]:
        """Stale activations between pipeline stages."""
        return self.wire.activations

    @property
    def stage_exports(self) -> tuple[tuple[str, ...], ...]:
        """Wire names of the activations each stage hands on."""
        return self.wire.stage_exports

    def stage_imports(self, stage: int) -> tuple[str, ...]:
        """Wire names of the stale activations stage ``stage`` reads (the other stages' exports)."""
        return self.wire.stage_imports(stage)

    # What a family is made of; the loaders below build each piece from a checkpoint folder.
    text_encoder_class: type[TextEncoder]
    denoiser_class: type[Denoiser]
    denoiser_model_class: type  # the diffusers model: UNet2DConditionModel, SD3Transformer2DModel
    denoiser_subfolder: str
    latent_math_class: type[LatentMath]
    decoder_upcasts: bool  # decode fp16 in fp32 when the VAE config says so (the SDXL pipeline does, SD3's not)

    def load_text_encoder(self, folder: Path, device: torch.device, dtype: torch.dtype) -> TextEncoder:
        return self.text_encoder_class(folder, device, dtype)

    def load_denoiser(self, folder: Path, device: torch.device, dtype: torch.dtype) -> Denoiser:
        model = self.denoiser_model_class.from_pretrained(folder, subfolder=self.denoiser_subfolder, dtype=dtype)
        return self.denoiser_class(model, device, dtype)

    def load_decoder(self, folder: Path, device: torch.device, dtype: torch.dtype) -> VaeDecoder:
        return VaeDecoder(folder, device, dtype, honor_force_upcast=self.decoder_upcasts)

    def load_latent_math(self, folder: Path) -> LatentMath:
        return self.latent_math_class(folder)

    def denoiser_config(self, folder: Path) -> dict[str, Any]:
        return self.denoiser_model_class.load_config(folder, subfolder=self.denoiser_subfolder)

    def _shapes(self, folder: Path, conditioning: dict, activations: dict) -> ModelShapes:
        """:class:`ModelShapes` of this checkpoint: the latent space from its configs, plus the family's tensors."""
        latent_math = self.load_latent_math(folder)
        return ModelShapes(
            family=self.wire,
            latent_channels=latent_math.latent_channels,
            vae_scale_factor=latent_math.vae_scale_factor,
            size_multiple=latent_math.size_multiple,
            max_size=latent_math.max_size,
            conditioning=conditioning,
            activations=activations,
        )

    @abstractmethod
    def model_shapes(self, folder: Path) -> ModelShapes:
        """The shapes of the tensors this checkpoint's models exchange, from its configs (no weights read),
        so that the internal models can refuse what no public request would send them."""


def tokenizer_max_length(folder: Path, subfolder: str = "tokenizer") -> int:
    """A tokenizer's ``model_max_length``: the tokens a CLIP tokenizer pads or truncates every prompt to."""
    config = json.loads((folder / subfolder / "tokenizer_config.json").read_text())
    return int(config["model_max_length"])


class LatentMath(ABC):
    """The pipeline's math between denoiser passes: initial latents, timesteps, extra conditioning
    (SDXL's time ids), input scaling and the scheduler step. It runs where guidance is combined (the
    orchestrator); "scheduler" stays the diffusers scheduler it drives.

    Reads only configs from the checkpoint folder (no weights), so the orchestrator stays light.
    """

    latent_channels: int
    vae_scale_factor: int

    @property
    def max_size(self) -> int | None:
        """The largest image side the model can run at, if it has one (SD3's position table)."""
        return None

    @property
    def size_multiple(self) -> int:
        """Image sides must be multiples of this (the VAE's scale factor, times the patch size for a DiT)."""
        return self.vae_scale_factor

    @abstractmethod
    def new_scheduler(self, steps: int, height: int, width: int):
        """A fresh scheduler with timesteps set (schedulers are stateful: one per image).

        The image size matters to schedulers whose shift depends on the resolution (SD3's dynamic shifting).
        """

    def initial_noise(self, seed: int, height: int, width: int) -> torch.Tensor:
        """Unit Gaussian latents drawn exactly as diffusers' ``prepare_latents`` draws them on the CPU."""
        generator = torch.Generator("cpu").manual_seed(seed)
        shape = (1, self.latent_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
        return torch.randn(shape, generator=generator, dtype=torch.float32)

    def prepare_latents(self, scheduler, seed: int, height: int, width: int) -> torch.Tensor:
        """The first latents: noise scaled to the scheduler's initial sigma, as the SD/SDXL pipelines do."""
        return self.initial_noise(seed, height, width) * scheduler.init_noise_sigma

    def extra_conditioning(self, height: int, width: int) -> Conditioning:
        """Conditioning the orchestrator adds to both branches (SDXL's time ids); none by default."""
        return {}

    def scale_model_input(self, scheduler, latents: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        return scheduler.scale_model_input(latents, timestep)

    def step(self, scheduler, eps: torch.Tensor, timestep: torch.Tensor, latents: torch.Tensor):
        return scheduler.step(eps, timestep, latents, return_dict=False)[0]


def vae_scale_factor(folder: Path) -> int:
    """2 ** (levels - 1), as the diffusers pipelines compute it from the VAE config (no weights read)."""
    from diffusers import AutoencoderKL

    config = AutoencoderKL.load_config(folder, subfolder="vae")
    return 2 ** (len(config["block_out_channels"]) - 1)


class VaeDecoder:
    """``vae/`` of a checkpoint: final latents to uint8 images, undoing the latent normalisation as the pipelines do
    (SDXL: per-channel mean/std when the config has them, else the scaling factor; SD3: scaling and shift factor).

    ``honor_force_upcast``: the SDXL pipeline decodes fp16 in fp32 when the config says so (its VAE overflows);
    the SD3 pipeline never does.
    """

    def __init__(self, folder: Path, device: torch.device, dtype: torch.dtype, honor_force_upcast: bool) -> None:
        from diffusers import AutoencoderKL

        self.vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", dtype=dtype).to(device).eval()
        if honor_force_upcast and dtype == torch.float16 and self.vae.config.force_upcast:
            self.vae.to(torch.float32)
        self.device = device

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor) -> np.ndarray:
        vae = self.vae
        config = vae.config
        latents = latents.to(self.device, vae.dtype)
        mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
        if mean is not None and std is not None:
            mean_t = torch.tensor(mean).view(1, -1, 1, 1).to(latents)
            std_t = torch.tensor(std).view(1, -1, 1, 1).to(latents)
            latents = latents * std_t / config.scaling_factor + mean_t
        else:
            latents = latents / config.scaling_factor
            if getattr(config, "shift_factor", None) is not None:
                latents = latents + config.shift_factor
        return images_to_uint8(vae.decode(latents, return_dict=False)[0])

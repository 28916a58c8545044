"""Stable Diffusion 3: MMDiT transformer, two CLIP encoders and T5, flow matching (FlowMatchEuler).

Mirrors ``diffusers.StableDiffusion3Pipeline`` step for step (prompt encoding, latents, timesteps with the optional
dynamic shift, the transformer call, decoding) so that ``serial`` mode reproduces it. The prediction is a velocity;
rel-MAE is taken on it like on SDXL's noise. The 2-stage split: stage 0 = transformer_blocks[0, n/2); stage 1 =
transformer_blocks[n/2, n) + norm_out + proj_out. The embedders (pos_embed, time_text_embed, context_embedder) are
cheap and run on both devices, so stage 0 needs nothing from stage 1; stage 1 needs only block n/2-1's output, both
streams (the reference code feeds it block n/2's, i.e. its own, which freezes it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline
from diffusers.models.attention import JointTransformerBlock
from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

from ..params import InvalidParameter
from ..stages import StageSplit
from ..validation import FixedShape, ImageTokens, ModelShapes
from ..wire import SD3 as SD3_WIRE
from .base import (
    Conditioning,
    Denoiser,
    Family,
    LatentMath,
    TextEncoder,
    branch_tensors,
    tokenizer_max_length,
    vae_scale_factor,
)
from .schedulers import load_scheduler_config, new_scheduler

# diffusers' default T5 sequence length for SD3 (the pipeline allows up to 512).
MAX_SEQUENCE_LENGTH = 256


def t5_sequence_length(folder: Path) -> int:
    """T5 tokens per prompt: diffusers' default ``max_sequence_length`` (256), or fewer when the checkpoint's
    T5 tokenizer allows fewer (a small model trained on short prompts, where every text token costs)."""
    return min(MAX_SEQUENCE_LENGTH, tokenizer_max_length(folder, "tokenizer_3"))
# Block n/2-1's image-token and text-token streams, as named on the wire.
MIDDLE_HIDDEN, MIDDLE_ENCODER = (t.name for t in SD3_WIRE.activations)


def sd3_split(transformer: SD3Transformer2DModel) -> StageSplit:
    """Blocks [0, n/2) on stage 0; blocks [n/2, n), norm_out and proj_out on stage 1 (which outputs)."""
    n = len(transformer.transformer_blocks)
    if n < 2:
        raise ValueError(f"a 2-stage split needs at least 2 transformer blocks, the model has {n}")
    half = n // 2
    first = tuple(f"transformer_blocks.{i}" for i in range(half))
    second = (*(f"transformer_blocks.{i}" for i in range(half, n)), "norm_out", "proj_out")
    return StageSplit(owned=(first, second), exports=((first[-1],), ()), output_stage=1)


class SD3Denoiser(Denoiser):
    def __init__(self, transformer: SD3Transformer2DModel, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__(transformer, device, dtype)
        self.split = sd3_split(transformer)
        self._middle_export = self.split.exports[0][0]

    def _forward(self, sample: torch.Tensor, timestep: torch.Tensor, cond: Conditioning) -> Any:
        # The pipeline passes the scheduler's timestep as is (no scale_model_input), one per batch row.
        return self.model(
            hidden_states=sample,
            timestep=timestep.expand(sample.shape[0]),
            encoder_hidden_states=cond["PROMPT_EMBEDS"],
            pooled_projections=cond["POOLED_EMBEDS"],
            return_dict=False,
        )

    def _bypass(self, name: str, module: torch.nn.Module, args: tuple, kwargs: dict) -> Any:
        if isinstance(module, JointTransformerBlock):
            # A block returns (encoder_hidden_states, hidden_states); passing its inputs through is enough.
            return kwargs["encoder_hidden_states"], kwargs["hidden_states"]
        return args[0] if args else kwargs["hidden_states"]  # norm_out, proj_out: never read before stage 1 ends

    def _pack(self, recorded: dict[str, Any]) -> dict[str, torch.Tensor]:
        if self._middle_export not in recorded:
            return {}
        encoder, hidden = recorded[self._middle_export]
        return {MIDDLE_HIDDEN: hidden.contiguous(), MIDDLE_ENCODER: encoder.contiguous()}

    def _unpack(self, wire: dict[str, torch.Tensor]) -> dict[str, Any]:
        present = [name for name in (MIDDLE_HIDDEN, MIDDLE_ENCODER) if name in wire]
        if not present:
            return {}
        if len(present) != 2:
            raise ValueError(f"stage 1 needs both {MIDDLE_HIDDEN} and {MIDDLE_ENCODER}, got only {present[0]}")
        return {self._middle_export: (wire[MIDDLE_ENCODER], wire[MIDDLE_HIDDEN])}


class SD3TextEncoder(TextEncoder):
    """CLIP-L, CLIP-G and T5 through diffusers' own ``encode_prompt`` (so embeddings match exactly).

    Prompt length: the CLIP encoders read at most 77 tokens and longer prompts are truncated there, as diffusers
    does (T5 still reads the whole prompt: that is SD3's design). T5's limit, ``max_sequence_length`` tokens
    (diffusers' default 256, end token included), is enforced instead of truncated: a prompt or negative prompt
    that needs more is refused with :class:`InvalidParameter` naming the field and the limit, because silently
    dropping its tail would change the image without the client knowing.
    """

    def __init__(self, folder: Path, device: torch.device, dtype: torch.dtype) -> None:
        self.pipe = StableDiffusion3Pipeline.from_pretrained(
            folder, transformer=None, vae=None, scheduler=None, dtype=dtype
        ).to(device)
        self.device = device
        self.max_sequence_length = t5_sequence_length(folder)

    def check_length(self, field: str, prompts: list[str]) -> None:
        """Raise InvalidParameter if a prompt needs more T5 tokens than ``max_sequence_length``."""
        tokenizer = self.pipe.tokenizer_3
        if tokenizer is None:  # a folder without T5: diffusers feeds zeros, nothing is cut
            return
        for i, ids in enumerate(tokenizer(prompts, add_special_tokens=True, verbose=False).input_ids):
            if len(ids) > self.max_sequence_length:
                which = f"prompt {i}" if len(prompts) > 1 else "prompt"
                raise InvalidParameter(
                    field,
                    f"{which} is {len(ids)} tokens for the T5 text encoder; at most {self.max_sequence_length}"
                    " (max_sequence_length) are allowed: shorten it",
                )

    @torch.inference_mode()
    def encode(self, prompts: list[str], negative_prompts: list[str] | None) -> dict[str, torch.Tensor]:
        self.check_length("PROMPT", prompts)
        if negative_prompts is not None:
            self.check_length("NEGATIVE_PROMPT", negative_prompts)
        embeds, neg_embeds, pooled, neg_pooled = self.pipe.encode_prompt(
            prompt=prompts,
            prompt_2=None,
            prompt_3=None,
            device=self.device,
            do_classifier_free_guidance=True,
            negative_prompt=negative_prompts,
            max_sequence_length=self.max_sequence_length,
        )
        return branch_tensors(
            {"PROMPT_EMBEDS": embeds, "POOLED_EMBEDS": pooled},
            {"PROMPT_EMBEDS": neg_embeds, "POOLED_EMBEDS": neg_pooled},
        )


class SD3LatentMath(LatentMath):
    """Flow matching as StableDiffusion3Pipeline runs it: unit noise at sigma 1, the timestep fed unscaled."""

    def __init__(self, folder: Path) -> None:
        config = SD3Transformer2DModel.load_config(folder, subfolder="transformer")
        self.latent_channels = config["in_channels"]
        self.patch_size = config["patch_size"]
        self.vae_scale_factor = vae_scale_factor(folder)
        self.pos_embed_max_size = config.get("pos_embed_max_size")
        self.scheduler_class, self.scheduler_config = load_scheduler_config(folder)

    @property
    def size_multiple(self) -> int:
        # The pipeline's check_inputs: latents must split into whole patches.
        return self.vae_scale_factor * self.patch_size

    @property
    def max_size(self) -> int | None:
        # The learned position table covers pos_embed_max_size patches per side; beyond it the
        # transformer cannot run, so larger images are refused up front.
        if self.pos_embed_max_size is None:
            return None
        return self.pos_embed_max_size * self.patch_size * self.vae_scale_factor

    def new_scheduler(self, steps: int, height: int, width: int):
        config = self.scheduler_config
        kwargs = {}
        if config.get("use_dynamic_shifting", None):
            # The shift grows with the number of image tokens, as the pipeline computes it.
            patches = self.vae_scale_factor * self.patch_size
            kwargs["mu"] = calculate_shift(
                (height // patches) * (width // patches),
                config.get("base_image_seq_len", 256),
                config.get("max_image_seq_len", 4096),
                config.get("base_shift", 0.5),
                config.get("max_shift", 1.16),
            )
        return new_scheduler(self.scheduler_class, config, steps, **kwargs)

    def prepare_latents(self, scheduler, seed: int, height: int, width: int) -> torch.Tensor:
        return self.initial_noise(seed, height, width)

    def scale_model_input(self, scheduler, latents: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        return latents


class SD3Family(Family):
    wire = SD3_WIRE

    text_encoder_class = SD3TextEncoder
    denoiser_class = SD3Denoiser
    denoiser_model_class = SD3Transformer2DModel
    denoiser_subfolder = "transformer"
    latent_math_class = SD3LatentMath
    decoder_upcasts = False

    def model_shapes(self, folder: Path) -> ModelShapes:
        config = self.denoiser_config(folder)
        patch_size = self.load_latent_math(folder).patch_size
        # CLIP's tokens, then T5's (SD3TextEncoder pads T5 to t5_sequence_length), at T5's width.
        tokens = tokenizer_max_length(folder) + t5_sequence_length(folder)
        text = {
            "PROMPT_EMBEDS": (tokens, config["joint_attention_dim"]),
            "POOLED_EMBEDS": (config["pooled_projection_dim"],),
        }
        width = config["num_attention_heads"] * config["attention_head_dim"]
        return self._shapes(
            folder,
            conditioning=text,
            activations={
                MIDDLE_HIDDEN: ImageTokens(patch_size, width),
                MIDDLE_ENCODER: FixedShape((tokens, config["caption_projection_dim"])),
            },
        )

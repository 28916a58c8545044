"""A random-weight Stable Diffusion XL (base 1.0) architecture checkpoint, built with seeded weights.

Same components, classes and subfolders as ``stabilityai/stable-diffusion-xl-base-1.0``: a ``UNet2DConditionModel``
with SDXL's block layout and micro-conditioning, CLIP-L and projected OpenCLIP-bigG text encoders with their BPE
tokenizers, a 4-channel ``AutoencoderKL`` and a DDIM (default) or Euler scheduler. The command line is
``python -m export.build_checkpoint --family sdxl``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from export.checkpoint_common import (
    TOKENIZER_PAD_TOKENS,
    build_folder,
    make_clip_pair,
    restore_files,
    size_spec,
    write_clip_tokenizers,
)

if TYPE_CHECKING:  # imported lazily at run time: the "already built" path should not pay for loading diffusers
    from diffusers import AutoencoderKL, DDIMScheduler, EulerDiscreteScheduler, UNet2DConditionModel

SCHEDULERS = ("ddim", "euler")

# Scheduler values of the SDXL base checkpoint's scheduler_config.json, shared by DDIM and Euler.
SDXL_SCHEDULER_CONFIG: dict[str, object] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "steps_offset": 1,
    "timestep_spacing": "leading",
}

@dataclass(frozen=True)
class SdxlSize:
    """Dimensions of one checkpoint size; everything else (block types, embeddings) is fixed to SDXL's."""

    unet_channels: tuple[int, int, int]
    transformer_layers: tuple[int, int, int]
    head_dim: int
    unet_norm_groups: int
    addition_time_embed_dim: int
    sample_size: int  # latent side; the pipeline's default image side is 8x this
    te_hidden: int
    te_layers: int
    te2_hidden: int
    te2_layers: int
    te_heads: int  # attention heads of both text encoders
    vae_channels: tuple[int, int, int, int]
    vae_layers_per_block: int
    vae_norm_groups: int
    bpe_merges: int


SIZES: dict[str, SdxlSize] = {
    # For unit tests: every SDXL structural feature at the smallest width; 8x8 latents (64x64 px).
    "tiny": SdxlSize(
        unet_channels=(32, 64, 64),
        transformer_layers=(1, 1, 3),  # balances the two pipeline stages at 8x8 latents
        head_dim=16,
        unet_norm_groups=8,
        addition_time_embed_dim=8,
        sample_size=8,
        te_hidden=32,
        te_layers=2,
        te2_hidden=64,
        te2_layers=2,
        te_heads=2,
        vae_channels=(8, 8, 8, 8),
        vae_layers_per_block=1,
        vae_norm_groups=4,
        bpe_merges=300,
    ),
    # For benchmarks: 64x64 latents (512x512 px). The lowest-resolution block gets the deepest transformer
    # stack (SDXL's 1/2/10 pattern, scaled down) so that the pipeline-parallel stage 0 (down_blocks[2],
    # mid_block, first two up_blocks[0] layers) takes ~50% of a UNet forward on one core.
    "small": SdxlSize(
        unet_channels=(32, 64, 160),
        transformer_layers=(1, 2, 5),
        head_dim=32,
        unet_norm_groups=32,
        addition_time_embed_dim=32,
        sample_size=64,
        te_hidden=64,
        te_layers=2,
        te2_hidden=128,
        te2_layers=3,
        te_heads=2,
        # Decoding 512x512 is bound by the full-resolution convolutions, so the VAE is kept very narrow.
        vae_channels=(8, 8, 16, 16),
        vae_layers_per_block=1,
        vae_norm_groups=8,
        bpe_merges=1000,
    ),
}


# ----------------------------------------------------------------------------------------------------------
# Model components.


def make_unet(spec: SdxlSize, text_embed_dim: int, pooled_dim: int) -> UNet2DConditionModel:
    """UNet with SDXL's block layout, micro-conditioning ("text_time") and linear attention projections."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=spec.sample_size,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=spec.unet_channels,
        layers_per_block=2,
        transformer_layers_per_block=list(spec.transformer_layers),
        # diffusers' historical naming: for SDXL "attention_head_dim" holds the number of heads per block.
        attention_head_dim=[c // spec.head_dim for c in spec.unet_channels],
        norm_num_groups=spec.unet_norm_groups,
        cross_attention_dim=text_embed_dim,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=spec.addition_time_embed_dim,
        # pooled text embedding + 6 micro-conditioning values (original size, crop offset, target size)
        projection_class_embeddings_input_dim=pooled_dim + 6 * spec.addition_time_embed_dim,
    )


def make_vae(spec: SdxlSize) -> AutoencoderKL:
    """KL autoencoder with 4 levels (3 resamplings: scale factor 8) and SDXL's latent scaling."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=spec.vae_channels,
        layers_per_block=spec.vae_layers_per_block,
        norm_num_groups=spec.vae_norm_groups,
        sample_size=spec.sample_size * 8,
        scaling_factor=0.13025,
        force_upcast=True,
    )


def make_scheduler(name: str) -> DDIMScheduler | EulerDiscreteScheduler:
    """SDXL base's noise schedule; DDIM by default (deterministic), Euler as SDXL ships."""
    from diffusers import DDIMScheduler, EulerDiscreteScheduler

    if name == "ddim":
        return DDIMScheduler(**SDXL_SCHEDULER_CONFIG, clip_sample=False, set_alpha_to_one=False)
    if name == "euler":
        return EulerDiscreteScheduler(**SDXL_SCHEDULER_CONFIG, interpolation_type="linear", use_karras_sigmas=False)
    raise ValueError(f"unknown scheduler {name!r}, expected one of {SCHEDULERS}")


# ----------------------------------------------------------------------------------------------------------
# Folder assembly.


def sdxl_mismatch(folder: Path, spec: SdxlSize, scheduler: str) -> str | None:
    """Describe how an existing checkpoint differs from the requested size/scheduler, or None if it matches."""
    unet = json.loads((folder / "unet" / "config.json").read_text())
    sched = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    expected_sched = {"ddim": "DDIMScheduler", "euler": "EulerDiscreteScheduler"}[scheduler]
    if list(unet["block_out_channels"]) != list(spec.unet_channels) or list(
        unet["transformer_layers_per_block"]
    ) != list(spec.transformer_layers):
        return f"its UNet does not have the requested size ({unet['block_out_channels']} channels)"
    if sched["_class_name"] != expected_sched:
        return f"its scheduler is {sched['_class_name']}, not the requested {expected_sched}"
    return None


def write_sdxl_checkpoint(folder: Path, spec: SdxlSize, seed: int, scheduler: str) -> None:
    """Build every component and save the pipeline into ``folder`` (which must be empty)."""
    from diffusers import StableDiffusionXLPipeline

    vocab, tokenizers, tokenizer_files = write_clip_tokenizers(folder, spec.bpe_merges, TOKENIZER_PAD_TOKENS)

    text_encoder, text_encoder_2 = make_clip_pair(
        vocab, (spec.te_hidden, spec.te2_hidden), (spec.te_layers, spec.te2_layers), spec.te_heads, seed, False
    )
    torch.manual_seed(seed + 2)
    unet = make_unet(spec, text_embed_dim=spec.te_hidden + spec.te2_hidden, pooled_dim=spec.te2_hidden)
    torch.manual_seed(seed + 3)
    vae = make_vae(spec)

    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizers["tokenizer"],
        tokenizer_2=tokenizers["tokenizer_2"],
        unet=unet,
        scheduler=make_scheduler(scheduler),
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    # transformers rewrites tokenizers as tokenizer.json; restore the original SDXL file set.
    restore_files(folder, tokenizer_files)


def build_sdxl_checkpoint(
    out_dir: str | Path, size: str = "tiny", seed: int = 0, scheduler: str = "ddim", force: bool = False
) -> Path:
    """Build (or keep, if already complete) an SDXL-architecture checkpoint folder with seeded random weights.

    See :func:`build_folder` for how the folder appears. Returns ``out_dir`` as a Path.
    """
    spec = size_spec(SIZES, size)
    if scheduler not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {scheduler!r}, expected one of {SCHEDULERS}")
    out_dir = Path(out_dir)
    return build_folder(
        out_dir,
        lambda folder: write_sdxl_checkpoint(folder, spec, seed, scheduler),
        lambda: sdxl_mismatch(out_dir, spec, scheduler),
        f"sdxl-{size} checkpoint (seed={seed}, scheduler={scheduler})",
        force,
    )

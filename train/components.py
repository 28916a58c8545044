"""The trained checkpoints' components: the same classes and builders as the built-in random checkpoints
(``export.build_checkpoint`` / ``export.sd3_checkpoint``), at sizes that learn the shape data on one CPU core.

Differences from the built-in ones, all deliberate: 32x32 images with a 3-level VAE (scale factor 4, so 8x8
latents), and tokenizers whose BPE merges also saw the data's words (so "triangle" is one token).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL

from export.checkpoint_common import (
    PROMPT_WORDS,
    TOKENIZER_PAD_TOKENS,
    build_clip_vocab,
    learn_bpe_merges,
    write_clip_tokenizer,
)
from export.sd3_checkpoint import Sd3Size
from export.sdxl_checkpoint import SdxlSize
from train.data import COLOURS, POSITIONS, SHAPES


@dataclass(frozen=True)
class VaeSize:
    channels: tuple[int, ...]  # one per level; scale factor 2 ** (levels - 1)
    norm_groups: int


@dataclass(frozen=True)
class TrainSize:
    """Everything one training size fixes: the image side, the VAE, and each family's denoiser/text encoders."""

    image_size: int
    vae: VaeSize
    sdxl: SdxlSize
    sd3: Sd3Size
    # T5 tokens per prompt for SD3 (the pipeline's max_sequence_length; diffusers' default is 256). The joint
    # transformer attends over every text token, so this sets most of a step's cost for these small models.
    sd3_t5_tokens: int = 256


def _sdxl(channels, layers, head_dim, groups, sample, te, te2, te_layers, merges) -> SdxlSize:
    return SdxlSize(
        unet_channels=channels, transformer_layers=layers, head_dim=head_dim, unet_norm_groups=groups,
        addition_time_embed_dim=8, sample_size=sample, te_hidden=te, te_layers=te_layers, te2_hidden=te2,
        te2_layers=te_layers, te_heads=2, vae_channels=(0, 0, 0, 0), vae_layers_per_block=1, vae_norm_groups=1,
        bpe_merges=merges,
    )


def _sd3(layers, heads, head_dim, sample, te, te2, t5, merges) -> Sd3Size:
    return Sd3Size(
        num_layers=layers, heads=heads, head_dim=head_dim, sample_size=sample, pos_embed_max_size=16,
        te_hidden=te, te2_hidden=te2, te_layers=2, te_heads=2, t5_d_model=t5, t5_layers=2, t5_heads=4,
        t5_d_ff=2 * t5, vae_channels=(0, 0, 0, 0), vae_norm_groups=1, bpe_merges=merges, t5_vocab=600,
    )


TRAIN_SIZES: dict[str, TrainSize] = {
    # For the unit test: a few steps must run in seconds.
    "tiny": TrainSize(
        image_size=16,
        vae=VaeSize(channels=(8, 8, 8), norm_groups=4),
        sdxl=_sdxl((16, 32, 32), (1, 1, 1), 8, 8, 4, 16, 32, 1, 300),
        sd3=_sd3(2, 2, 8, 4, 16, 32, 64, 300),
        sd3_t5_tokens=16,
    ),
    # The built-in "shapes" checkpoints: 32x32 images, 8x8 latents.
    "shapes": TrainSize(
        image_size=32,
        vae=VaeSize(channels=(16, 32, 32), norm_groups=8),
        sdxl=_sdxl((32, 64, 64), (1, 1, 1), 16, 16, 8, 32, 64, 2, 400),
        sd3=_sd3(4, 4, 32, 8, 32, 64, 96, 400),
        sd3_t5_tokens=32,  # 77 CLIP + 32 T5 text tokens per image (captions are at most 10 T5 tokens)
    ),
}


def latent_channels(family: str) -> int:
    return {"sdxl": 4, "sd3": 16}[family]


def make_vae(size: TrainSize, family: str) -> AutoencoderKL:
    """KL autoencoder with the family's latent channels (SDXL 4 with quant convs, SD3 16 without, as the real ones).

    The scaling (and SD3's shift) factor is set from the trained encoder's latents by :func:`set_latent_scale`.
    """
    levels = len(size.vae.channels)
    sd3 = family == "sd3"
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=latent_channels(family),
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=size.vae.channels,
        layers_per_block=1,
        norm_num_groups=size.vae.norm_groups,
        sample_size=size.image_size,
        scaling_factor=1.0,
        shift_factor=0.0 if sd3 else None,
        use_quant_conv=not sd3,
        use_post_quant_conv=not sd3,
        force_upcast=True,
    )


def make_serving_vae(size: TrainSize, family: str) -> AutoencoderKL:
    """The VAE the checkpoints ship: one level more than the training VAE (scale factor 8, as SDXL's and SD3's),
    so the same 8x8 latents decode to 64x64 images, the smallest size the server accepts."""
    wider = TrainSize(size.image_size * 2, VaeSize((*size.vae.channels, size.vae.channels[-1]), size.vae.norm_groups),
                      size.sdxl, size.sd3)
    return make_vae(wider, family)


def data_words() -> list[str]:
    """Every word a caption of the data can hold."""
    words = [*COLOURS, *SHAPES, "a"]
    for phrase in POSITIONS:
        words += phrase.split()
    return words


def write_tokenizers(folder: Path, num_merges: int) -> dict[str, int]:
    """The CLIP BPE tokenizer pair (``tokenizer``, ``tokenizer_2``) in SDXL's file format; returns the vocabulary.

    The merges are learned from the built-in prompt words plus the data's words (repeated, so each becomes one token).
    """
    merges = learn_bpe_merges(PROMPT_WORDS.split() + data_words() * 20, num_merges)
    vocab = build_clip_vocab(merges)
    for name, pad in TOKENIZER_PAD_TOKENS.items():
        write_clip_tokenizer(folder / name, vocab, merges, pad)
    return vocab


def torch_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}

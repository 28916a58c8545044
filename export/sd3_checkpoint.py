"""A random-weight Stable Diffusion 3 (medium) architecture checkpoint, built with seeded weights.

Same components, classes and subfolders as ``stabilityai/stable-diffusion-3-medium-diffusers``: an MMDiT
``SD3Transformer2DModel``, two projected CLIP text encoders (``tokenizer``/``tokenizer_2`` in CLIP's BPE format), a
T5 encoder with a SentencePiece-unigram ``tokenizer_3`` (trained here on the built-in word list, never downloaded),
a 16-channel ``AutoencoderKL`` with SD3's latent scale and shift, and ``FlowMatchEulerDiscreteScheduler``.
The command line is ``python -m export.build_checkpoint --family sd3``.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from export.checkpoint_common import (
    PROMPT_WORDS,
    TOKENIZER_PAD_TOKENS,
    build_folder,
    make_clip_pair,
    restore_files,
    size_spec,
    write_clip_tokenizers,
)

if TYPE_CHECKING:  # imported lazily: the "already built" path should not pay for loading diffusers
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import T5EncoderModel, T5Tokenizer

# SD3 medium's scheduler_config.json: a fixed shift of 3 (no resolution-dependent dynamic shifting).
SD3_SCHEDULER_CONFIG: dict[str, object] = {"num_train_timesteps": 1000, "shift": 3.0}
# SD3's VAE latent normalisation (latents are scaled and shifted, unlike SDXL's scale only).
SD3_VAE_SCALING_FACTOR = 1.5305
SD3_VAE_SHIFT_FACTOR = 0.0609
T5_MODEL_MAX_LENGTH = 512  # the tokenizer's own limit; the pipeline encodes at most 256 tokens (max_sequence_length)
T5_EXTRA_IDS = 100  # T5's sentinel tokens <extra_id_0..99>, last in the vocabulary in reverse order
PATCH_SIZE = 2


@dataclass(frozen=True)
class Sd3Size:
    """Dimensions of one SD3 checkpoint size; the block types and wiring are SD3 medium's."""

    num_layers: int  # even, so the two pipeline stages get n/2 blocks each
    heads: int
    head_dim: int
    sample_size: int  # latent side; the pipeline's default image side is 8x this
    pos_embed_max_size: int  # largest latent side / patch size the position table covers
    te_hidden: int  # CLIP-L stand-in (projection = hidden)
    te2_hidden: int  # CLIP-bigG stand-in
    te_layers: int
    te_heads: int
    t5_d_model: int  # = the transformer's joint_attention_dim, >= te_hidden + te2_hidden (CLIP is zero-padded to it)
    t5_layers: int
    t5_heads: int
    t5_d_ff: int
    vae_channels: tuple[int, int, int, int]
    vae_norm_groups: int
    bpe_merges: int
    t5_vocab: int  # SentencePiece pieces asked for (the small corpus may yield fewer)


SD3_SIZES: dict[str, Sd3Size] = {
    # For unit tests: 4 blocks (so stage 1 bypasses one block and is fed another), 8x8 latents (64x64 px).
    "tiny": Sd3Size(
        num_layers=4,
        heads=2,
        head_dim=16,
        sample_size=8,
        pos_embed_max_size=64,
        te_hidden=32,
        te2_hidden=64,
        te_layers=2,
        te_heads=2,
        t5_d_model=128,
        t5_layers=2,
        t5_heads=4,
        t5_d_ff=256,
        vae_channels=(8, 8, 8, 8),
        vae_norm_groups=4,
        bpe_merges=300,
        t5_vocab=600,
    ),
    # For benchmarks: 64x64 latents (512x512 px: 1024 image tokens + 77 CLIP + 256 T5 tokens), a forward about as
    # costly as the small SDXL U-Net's; the last block is context-pre-only (lighter), which norm_out/proj_out on
    # stage 1 make up for, so the two stages come out about even.
    "small": Sd3Size(
        num_layers=8,
        heads=3,
        head_dim=64,
        sample_size=64,
        pos_embed_max_size=64,
        te_hidden=64,
        te2_hidden=128,
        te_layers=2,
        te_heads=2,
        t5_d_model=256,
        t5_layers=2,
        t5_heads=4,
        t5_d_ff=512,
        vae_channels=(8, 8, 16, 16),
        vae_norm_groups=8,
        bpe_merges=1000,
        t5_vocab=2000,
    ),
}


# ----------------------------------------------------------------------------------------------------------
# T5 tokenizer: a SentencePiece unigram model trained on the built-in word list.


def _t5_training_sentences() -> list[str]:
    """Prompt-like lines over the built-in words, cased as prompts are (T5 is case-sensitive), with punctuation
    and digits so that ordinary prompts need no unknown token."""
    words = PROMPT_WORDS.split()
    lines = [" ".join(words[i : i + 12]) for i in range(0, len(words), 12)]
    lines += [" ".join(w.capitalize() for w in words[i : i + 12]) for i in range(0, len(words), 12)]
    lines.append(" ".join(w.upper() for w in words[:200]))
    lines.append(", . ! ? : ; - ' \" ( ) [ ] / & + = % # @ * _ < > 0 1 2 3 4 5 6 7 8 9 10 100 2024 4k 8k 3d")
    return lines


def train_t5_vocab(vocab_size: int) -> tuple[bytes, list[tuple[str, float]]]:
    """Train a unigram SentencePiece model with T5's special ids (pad 0, eos 1, unk 2, no bos).

    Returns the serialized model (``spiece.model``) and its (piece, log-probability) list. Single-threaded
    training on a fixed corpus is deterministic, so a rebuild gives the same tokenizer.
    """
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_t5_training_sentences()),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="unigram",
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        character_coverage=1.0,
        hard_vocab_limit=False,  # the corpus is small: take the pieces it supports
        num_threads=1,
        minloglevel=2,
    )
    processor = spm.SentencePieceProcessor(model_proto=model.getvalue())
    pieces = [(processor.id_to_piece(i), processor.get_score(i)) for i in range(processor.get_piece_size())]
    return model.getvalue(), pieces


def _proto_field(message: bytes, number: int) -> bytes:
    """The first length-delimited field ``number`` of a serialized protobuf message (b"" if absent).

    Just enough protobuf to read SentencePiece's normalizer out of ``spiece.model`` without a protobuf runtime
    (the installed one is older than the code SentencePiece generated, so its own parser refuses to load).
    """

    def varint(pos: int) -> tuple[int, int]:
        value = shift = 0
        while True:
            byte = message[pos]
            value |= (byte & 0x7F) << shift
            pos, shift = pos + 1, shift + 7
            if byte < 0x80:
                return value, pos

    pos = 0
    while pos < len(message):
        key, pos = varint(pos)
        wire_type = key & 7
        if wire_type == 0:
            _, pos = varint(pos)
        elif wire_type in (1, 5):
            pos += 8 if wire_type == 1 else 4
        elif wire_type == 2:
            length, pos = varint(pos)
            if key >> 3 == number:
                return message[pos : pos + length]
            pos += length
        else:
            raise ValueError(f"unsupported protobuf wire type {wire_type}")
    return b""


def make_t5_tokenizer(folder: Path, vocab_size: int, model_max_length: int = T5_MODEL_MAX_LENGTH) -> T5Tokenizer:
    """Write ``tokenizer_3/`` with the files a downloaded SD3 folder has and return it loaded back from there.

    The tokenizers-backed T5 tokenizer is built from the trained piece list and SentencePiece's precompiled
    nmt_nfkc normalizer (ModelProto.normalizer_spec.precompiled_charsmap), as transformers converts a real
    ``spiece.model``; ``spiece.model`` itself is kept beside it, as in the original folder.
    """
    from transformers import T5Tokenizer, T5TokenizerFast

    model, pieces = train_t5_vocab(vocab_size)
    charsmap = _proto_field(_proto_field(model, 3), 2)
    # T5 keeps its sentinels last, <extra_id_0> with the highest id.
    pieces += [(f"<extra_id_{i}>", 0.0) for i in reversed(range(T5_EXTRA_IDS))]
    tokenizer = T5Tokenizer(
        vocab=pieces,
        extra_ids=T5_EXTRA_IDS,
        model_max_length=model_max_length,
        _spm_precompiled_charsmap=charsmap,
    )
    tokenizer.save_pretrained(folder)
    (folder / "spiece.model").write_bytes(model)
    special = {
        "eos_token": tokenizer.eos_token,
        "pad_token": tokenizer.pad_token,
        "unk_token": tokenizer.unk_token,
        "additional_special_tokens": [f"<extra_id_{i}>" for i in range(T5_EXTRA_IDS)],
    }
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n", encoding="utf-8")
    return T5TokenizerFast.from_pretrained(folder)


# ----------------------------------------------------------------------------------------------------------
# Model components.


def make_transformer(spec: Sd3Size) -> SD3Transformer2DModel:
    """MMDiT with SD3 medium's wiring: joint attention over image and text tokens, last block context-pre-only."""
    from diffusers import SD3Transformer2DModel

    inner = spec.heads * spec.head_dim
    return SD3Transformer2DModel(
        sample_size=spec.sample_size,
        patch_size=PATCH_SIZE,
        in_channels=16,
        out_channels=16,
        num_layers=spec.num_layers,
        attention_head_dim=spec.head_dim,
        num_attention_heads=spec.heads,
        joint_attention_dim=spec.t5_d_model,
        caption_projection_dim=inner,
        pooled_projection_dim=spec.te_hidden + spec.te2_hidden,
        pos_embed_max_size=spec.pos_embed_max_size,
    )


def make_sd3_vae(spec: Sd3Size) -> AutoencoderKL:
    """16-channel KL autoencoder, scale factor 8, no quant convs, SD3's latent scale and shift."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=16,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=spec.vae_channels,
        layers_per_block=1,
        norm_num_groups=spec.vae_norm_groups,
        sample_size=spec.sample_size * 8,
        scaling_factor=SD3_VAE_SCALING_FACTOR,
        shift_factor=SD3_VAE_SHIFT_FACTOR,
        use_quant_conv=False,
        use_post_quant_conv=False,
        force_upcast=True,
    )


def make_t5_encoder(spec: Sd3Size, tokenizer: T5Tokenizer) -> T5EncoderModel:
    """T5 v1.1-style encoder (gated GELU, untied, relative attention) as SD3's T5-XXL, at toy width."""
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=spec.t5_d_model,
        d_kv=spec.t5_d_model // spec.t5_heads,
        d_ff=spec.t5_d_ff,
        num_layers=spec.t5_layers,
        num_heads=spec.t5_heads,
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
        dropout_rate=0.0,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    return T5EncoderModel(config)


def make_flow_scheduler() -> FlowMatchEulerDiscreteScheduler:
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULER_CONFIG)


# ----------------------------------------------------------------------------------------------------------
# Folder assembly.


def sd3_mismatch(folder: Path, spec: Sd3Size) -> str | None:
    """Describe how an existing checkpoint differs from the requested size, or None if it matches."""
    index = json.loads((folder / "model_index.json").read_text())
    if index.get("_class_name") != "StableDiffusion3Pipeline":
        return f"it is a {index.get('_class_name')} checkpoint, not SD3"
    config = json.loads((folder / "transformer" / "config.json").read_text())
    got = (config["num_layers"], config["num_attention_heads"], config["attention_head_dim"])
    if got != (spec.num_layers, spec.heads, spec.head_dim):
        return f"its transformer does not have the requested size ((layers, heads, head_dim) = {got})"
    return None


def write_sd3_checkpoint(folder: Path, spec: Sd3Size, seed: int) -> None:
    """Build every component and save the pipeline into ``folder`` (which must be empty)."""
    from diffusers import StableDiffusion3Pipeline

    # The same CLIP-L / OpenCLIP-bigG tokenizer pair as SDXL (bigG pads with "!").
    vocab, tokenizers, clip_files = write_clip_tokenizers(folder, spec.bpe_merges, TOKENIZER_PAD_TOKENS)
    tokenizer_3 = make_t5_tokenizer(folder / "tokenizer_3", spec.t5_vocab)
    t5_files = {"tokenizer_3": {p.name: p.read_bytes() for p in (folder / "tokenizer_3").iterdir()}}

    # Two projected CLIP towers, as in SD3.
    text_encoder, text_encoder_2 = make_clip_pair(
        vocab, (spec.te_hidden, spec.te2_hidden), (spec.te_layers, spec.te_layers), spec.te_heads, seed, True
    )
    torch.manual_seed(seed + 2)
    text_encoder_3 = make_t5_encoder(spec, tokenizer_3)
    torch.manual_seed(seed + 3)
    transformer = make_transformer(spec)
    torch.manual_seed(seed + 4)
    vae = make_sd3_vae(spec)

    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=make_flow_scheduler(),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizers["tokenizer"],
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizers["tokenizer_2"],
        text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3,
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    # save_pretrained rewrites the tokenizers in its own format; restore the original SD3 file sets.
    restore_files(folder, {**clip_files, **t5_files})
    # transformers 5 names the one T5 tokenizer class T5Tokenizer; the original index says T5TokenizerFast (an alias
    # here, the tokenizer.json-backed class in transformers 4), so both generations load the folder the same way.
    index_path = folder / "model_index.json"
    index = json.loads(index_path.read_text())
    index["tokenizer_3"] = ["transformers", "T5TokenizerFast"]
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def build_sd3_checkpoint(out_dir: str | Path, size: str = "tiny", seed: int = 0, force: bool = False) -> Path:
    """Build (or keep, if already complete) an SD3-architecture checkpoint folder with seeded random weights.

    Laid out like ``stabilityai/stable-diffusion-3-medium-diffusers``. See :func:`export.checkpoint_common.build_folder`
    for how the folder appears. Returns ``out_dir`` as a Path.
    """
    spec = size_spec(SD3_SIZES, size)
    out_dir = Path(out_dir)
    return build_folder(
        out_dir,
        lambda folder: write_sd3_checkpoint(folder, spec, seed),
        lambda: sd3_mismatch(out_dir, spec),
        f"sd3-{size} checkpoint (seed={seed})",
        force,
    )

"""The generated SD3-architecture checkpoint loads like the real one, generates, and builds idempotently."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from export.build_checkpoint import build_sd3_checkpoint, main
from export.sd3_checkpoint import SD3_SIZES, SD3_VAE_SCALING_FACTOR, SD3_VAE_SHIFT_FACTOR

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# The file set of a downloaded stabilityai/stable-diffusion-3-medium-diffusers folder (one weight file each).
SD3_FILES = {
    "model_index.json",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json",
    "text_encoder/model.safetensors",
    "text_encoder_2/config.json",
    "text_encoder_2/model.safetensors",
    "text_encoder_3/config.json",
    "text_encoder_3/model.safetensors",
    "tokenizer/merges.txt",
    "tokenizer/special_tokens_map.json",
    "tokenizer/tokenizer_config.json",
    "tokenizer/vocab.json",
    "tokenizer_2/merges.txt",
    "tokenizer_2/special_tokens_map.json",
    "tokenizer_2/tokenizer_config.json",
    "tokenizer_2/vocab.json",
    "tokenizer_3/special_tokens_map.json",
    "tokenizer_3/spiece.model",
    "tokenizer_3/tokenizer.json",
    "tokenizer_3/tokenizer_config.json",
    "transformer/config.json",
    "transformer/diffusion_pytorch_model.safetensors",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
}
PROMPT = "A photo of an astronaut riding a horse on Mars, highly detailed"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ckpt") / "sd3-tiny"
    assert main(["--family", "sd3", "--size", "tiny", "--out", str(out)]) == 0  # through the CLI
    return out


@pytest.fixture(scope="module")
def pipe(checkpoint: Path):
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(checkpoint)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_folder_has_the_sd3_layout_and_nothing_else(checkpoint: Path) -> None:
    files = {p.relative_to(checkpoint).as_posix() for p in checkpoint.rglob("*") if p.is_file()}
    assert files == SD3_FILES
    assert [p.name for p in checkpoint.parent.iterdir()] == [checkpoint.name]  # no temporary build folder left
    index = json.loads((checkpoint / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusion3Pipeline"
    assert index["tokenizer_3"] == ["transformers", "T5TokenizerFast"]
    assert index["text_encoder_3"] == ["transformers", "T5EncoderModel"]


def test_components_have_sd3_classes_and_structure(pipe) -> None:
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

    assert isinstance(pipe.transformer, SD3Transformer2DModel)
    assert isinstance(pipe.vae, AutoencoderKL)
    assert isinstance(pipe.text_encoder, CLIPTextModelWithProjection)
    assert isinstance(pipe.text_encoder_2, CLIPTextModelWithProjection)
    assert isinstance(pipe.text_encoder_3, T5EncoderModel)
    assert isinstance(pipe.tokenizer, CLIPTokenizer) and isinstance(pipe.tokenizer_2, CLIPTokenizer)
    assert isinstance(pipe.tokenizer_3, T5TokenizerFast)
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler)

    tr = pipe.transformer.config
    te, te2, t5 = pipe.text_encoder.config, pipe.text_encoder_2.config, pipe.text_encoder_3.config
    assert tr.in_channels == tr.out_channels == 16 and tr.patch_size == 2
    assert tr.num_layers == SD3_SIZES["tiny"].num_layers and tr.num_layers % 2 == 0
    assert tr.joint_attention_dim == t5.d_model >= te.hidden_size + te2.hidden_size  # CLIP is zero-padded to T5
    assert tr.pooled_projection_dim == te.projection_dim + te2.projection_dim
    assert tr.caption_projection_dim == tr.num_attention_heads * tr.attention_head_dim
    blocks = pipe.transformer.transformer_blocks
    assert [b.context_pre_only for b in blocks] == [False] * (len(blocks) - 1) + [True]
    assert t5.feed_forward_proj == "gated-gelu"

    vae = pipe.vae.config
    assert pipe.vae_scale_factor == 8 and vae.latent_channels == 16
    assert (vae.scaling_factor, vae.shift_factor) == (SD3_VAE_SCALING_FACTOR, SD3_VAE_SHIFT_FACTOR)
    assert not vae.use_quant_conv and not vae.use_post_quant_conv
    assert tr.sample_size * pipe.vae_scale_factor == 64
    assert pipe.scheduler.config.shift == 3.0 and not pipe.scheduler.config.use_dynamic_shifting


def test_generates_a_finite_non_constant_image_quickly(pipe) -> None:
    import time

    started = time.perf_counter()
    image = pipe(
        PROMPT,
        height=64,
        width=64,
        num_inference_steps=4,
        guidance_scale=7.0,
        generator=torch.Generator("cpu").manual_seed(0),
        output_type="np",
    ).images
    assert time.perf_counter() - started < 1.0  # tiny is for unit tests
    assert image.shape == (1, 64, 64, 3)
    assert np.isfinite(image).all()
    assert image.std() > 1e-3


def test_t5_tokenizer_is_a_real_unigram_t5_tokenizer(pipe) -> None:
    tokenizer = pipe.tokenizer_3
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    assert tokenizer.model_max_length == 512
    assert tokenizer.convert_tokens_to_ids("<extra_id_0>") == len(tokenizer) - 1  # sentinels last, reversed
    ids = tokenizer(PROMPT).input_ids
    assert ids[-1] == tokenizer.eos_token_id and tokenizer.unk_token_id not in ids
    assert len(ids) < 3 * len(PROMPT.split())  # whole words and pieces, not characters
    assert tokenizer("Ｆull moon").input_ids == tokenizer("Full moon").input_ids  # nmt_nfkc normalization
    padded = tokenizer(PROMPT, padding="max_length", max_length=256, truncation=True).input_ids
    assert len(padded) == 256 and padded[-1] == tokenizer.pad_token_id
    for clip, pad in ((pipe.tokenizer, "<|endoftext|>"), (pipe.tokenizer_2, "!")):
        assert clip.model_max_length == 77 and clip.pad_token == pad


def test_rebuild_is_deterministic_and_a_second_build_is_a_no_op(checkpoint: Path, tmp_path: Path, capsys) -> None:
    watched = [checkpoint / "model_index.json", checkpoint / "transformer" / "diffusion_pytorch_model.safetensors"]
    before = [p.stat().st_mtime_ns for p in watched]
    assert build_sd3_checkpoint(checkpoint, size="tiny") == checkpoint
    assert [p.stat().st_mtime_ns for p in watched] == before
    assert "nothing to do" in capsys.readouterr().out
    again = build_sd3_checkpoint(tmp_path / "again", size="tiny")
    for name in SD3_FILES:
        assert (again / name).read_bytes() == (checkpoint / name).read_bytes(), name


def test_existing_folder_of_another_size_or_family_is_refused(checkpoint: Path, sdxl_tiny: Path) -> None:
    with pytest.raises(FileExistsError, match="force"):
        build_sd3_checkpoint(checkpoint, size="small")
    with pytest.raises(FileExistsError, match="not SD3"):
        build_sd3_checkpoint(sdxl_tiny, size="tiny")


def test_small_has_an_even_split_and_1024_tokens_at_512px() -> None:
    from export.sd3_checkpoint import make_transformer

    spec = SD3_SIZES["small"]
    assert spec.num_layers % 2 == 0
    assert spec.t5_d_model >= spec.te_hidden + spec.te2_hidden
    with torch.device("meta"):
        transformer = make_transformer(spec)
    latent_side = transformer.config.sample_size
    assert latent_side * 8 == 512 and (latent_side // transformer.config.patch_size) ** 2 == 1024
    assert transformer.config.pos_embed_max_size * 2 * 8 >= 1024  # positions cover the 1024 px default limit

"""The generated SDXL-architecture checkpoint loads like the real one, generates, and builds idempotently."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

import export.sdxl_checkpoint as sdxl_module
from export.build_checkpoint import build_sdxl_checkpoint
from export.sdxl_checkpoint import SIZES, make_scheduler

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# The file set of a downloaded stabilityai/stable-diffusion-xl-base-1.0 folder (fp32 weights only).
SDXL_FILES = {
    "model_index.json",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json",
    "text_encoder/model.safetensors",
    "text_encoder_2/config.json",
    "text_encoder_2/model.safetensors",
    "tokenizer/merges.txt",
    "tokenizer/special_tokens_map.json",
    "tokenizer/tokenizer_config.json",
    "tokenizer/vocab.json",
    "tokenizer_2/merges.txt",
    "tokenizer_2/special_tokens_map.json",
    "tokenizer_2/tokenizer_config.json",
    "tokenizer_2/vocab.json",
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
}
PROMPT = "A photo of an astronaut riding a horse on Mars, highly detailed"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_sdxl_checkpoint(tmp_path_factory.mktemp("ckpt") / "sdxl-tiny", size="tiny", seed=0)


@pytest.fixture(scope="module")
def pipe(checkpoint: Path):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(checkpoint)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_folder_has_the_sdxl_layout_and_nothing_else(checkpoint: Path) -> None:
    files = {p.relative_to(checkpoint).as_posix() for p in checkpoint.rglob("*") if p.is_file()}
    assert files == SDXL_FILES
    # Only the finished folder is left in the parent: no temporary build directory.
    assert [p.name for p in checkpoint.parent.iterdir()] == [checkpoint.name]
    index = json.loads((checkpoint / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline"
    assert index["force_zeros_for_empty_prompt"] is True


def test_components_have_sdxl_classes_and_structure(pipe) -> None:
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    assert isinstance(pipe.unet, UNet2DConditionModel)
    assert isinstance(pipe.vae, AutoencoderKL)
    assert type(pipe.text_encoder) is CLIPTextModel
    assert isinstance(pipe.text_encoder_2, CLIPTextModelWithProjection)
    assert isinstance(pipe.tokenizer, CLIPTokenizer) and isinstance(pipe.tokenizer_2, CLIPTokenizer)
    assert isinstance(pipe.scheduler, DDIMScheduler)

    unet = pipe.unet.config
    assert tuple(unet.down_block_types) == ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D")
    assert tuple(unet.up_block_types) == ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")
    assert unet.addition_embed_type == "text_time"
    assert unet.layers_per_block == 2 and unet.use_linear_projection
    assert list(unet.transformer_layers_per_block) == list(SIZES["tiny"].transformer_layers)
    assert unet.in_channels == unet.out_channels == 4
    te, te2 = pipe.text_encoder.config, pipe.text_encoder_2.config
    assert unet.cross_attention_dim == te.hidden_size + te2.hidden_size
    assert unet.projection_class_embeddings_input_dim == te2.projection_dim + 6 * unet.addition_time_embed_dim
    # up_blocks[0] has the three resnet/attention pairs the pipeline-parallel stage split relies on.
    assert len(pipe.unet.up_blocks[0].resnets) == len(pipe.unet.up_blocks[0].attentions) == 3

    assert pipe.vae_scale_factor == 8 and pipe.vae.config.latent_channels == 4
    assert pipe.vae.config.scaling_factor == 0.13025 and pipe.vae.config.force_upcast
    assert unet.sample_size * pipe.vae_scale_factor == 64

    sched = pipe.scheduler.config
    assert (sched.beta_start, sched.beta_end, sched.beta_schedule) == (0.00085, 0.012, "scaled_linear")
    assert (sched.steps_offset, sched.timestep_spacing, sched.prediction_type) == (1, "leading", "epsilon")
    assert not sched.clip_sample and not sched.set_alpha_to_one


def test_generates_a_finite_non_constant_image(pipe) -> None:
    image = pipe(
        PROMPT,
        height=64,
        width=64,
        num_inference_steps=2,
        guidance_scale=5.0,
        generator=torch.Generator("cpu").manual_seed(0),
        output_type="np",
    ).images
    assert image.shape == (1, 64, 64, 3)
    assert np.isfinite(image).all()
    assert image.std() > 1e-3


def test_tokenizers_split_words_and_truncate_to_77(pipe) -> None:
    for tokenizer, pad in ((pipe.tokenizer, "<|endoftext|>"), (pipe.tokenizer_2, "!")):
        assert tokenizer.model_max_length == 77 and tokenizer.pad_token == pad
        ids = tokenizer(PROMPT).input_ids
        assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
        assert tokenizer.unk_token_id not in ids[1:-1]
        assert len(ids) < 3 * len(PROMPT.split())  # real BPE merges, not one token per character
        long = tokenizer(
            PROMPT * 30, padding="max_length", max_length=tokenizer.model_max_length, truncation=True
        ).input_ids
        assert len(long) == 77 and long[-1] == tokenizer.eos_token_id
        padded = tokenizer(PROMPT, padding="max_length", max_length=77).input_ids
        assert len(padded) == 77 and padded[-1] == tokenizer.convert_tokens_to_ids(pad)


def test_second_build_leaves_the_folder_untouched(checkpoint: Path, capsys: pytest.CaptureFixture[str]) -> None:
    watched = [checkpoint / "model_index.json", checkpoint / "unet" / "diffusion_pytorch_model.safetensors"]
    before = [p.stat().st_mtime_ns for p in watched]
    assert build_sdxl_checkpoint(checkpoint, size="tiny", seed=0) == checkpoint
    assert [p.stat().st_mtime_ns for p in watched] == before
    assert "nothing to do" in capsys.readouterr().out


def test_existing_folder_of_another_size_is_refused(checkpoint: Path) -> None:
    with pytest.raises(FileExistsError, match="force"):
        build_sdxl_checkpoint(checkpoint, size="small")


def test_folder_that_is_not_a_checkpoint_is_never_replaced(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a checkpoint"):
        build_sdxl_checkpoint(tmp_path, size="tiny", force=True)
    assert (tmp_path / "notes.txt").read_text() == "keep me"


def test_crashed_build_leaves_no_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def crash(folder: Path, *args: object) -> None:
        (folder / "model_index.json").write_text("{}")
        raise RuntimeError("disk full")

    monkeypatch.setattr(sdxl_module, "write_sdxl_checkpoint", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        build_sdxl_checkpoint(tmp_path / "sdxl-tiny", size="tiny")
    assert list(tmp_path.iterdir()) == []


def test_euler_scheduler_shares_the_sdxl_schedule() -> None:
    ddim, euler = make_scheduler("ddim"), make_scheduler("euler")
    assert type(euler).__name__ == "EulerDiscreteScheduler"
    for key in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "steps_offset", "timestep_spacing"):
        assert euler.config[key] == ddim.config[key]
    torch.testing.assert_close(euler.alphas_cumprod, ddim.alphas_cumprod)

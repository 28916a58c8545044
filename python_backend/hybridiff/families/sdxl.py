"""Stable Diffusion XL: U-Net, two CLIP text encoders, text_time conditioning, DDIM/Euler.

Mirrors ``diffusers.StableDiffusionXLPipeline`` step for step (prompt encoding, time ids, latents,
UNet call, decoding) so that ``serial`` mode reproduces it, and names the 2-stage split of the
paper: stage 0 = down_blocks[2], mid_block, up_blocks[0] resnets/attentions 0-1 (the middle);
stage 1 = everything else (head and tail, which keep their skip connections on one device).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
from diffusers.models.unets.unet_2d_blocks import CrossAttnDownBlock2D, DownBlock2D

from ..stages import StageSplit
from ..validation import FeatureMap, ModelShapes
from ..wire import SDXL as SDXL_WIRE
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

MIDDLE_ACT, HEAD_ACT = (t.name for t in SDXL_WIRE.activations)  # stage 0 hands on MIDDLE, stage 1 HEAD


def sdxl_split(unet: UNet2DConditionModel) -> StageSplit:
    """The paper's 2-stage split, in execution order, for a UNet of SDXL's block layout."""
    n_down, n_up = len(unet.down_blocks), len(unet.up_blocks)
    middle = [f"down_blocks.{n_down - 1}", "mid_block"]
    up0 = unet.up_blocks[0]
    for i in range(len(up0.resnets) - 1):
        middle.append(f"up_blocks.0.resnets.{i}")
        middle.append(f"up_blocks.0.attentions.{i}")
    last = len(up0.resnets) - 1
    head = ["conv_in", *[f"down_blocks.{i}" for i in range(n_down - 1)]]
    tail = [f"up_blocks.0.resnets.{last}", f"up_blocks.0.attentions.{last}"]
    if up0.upsamplers is not None:
        tail.append("up_blocks.0.upsamplers")
    tail += [f"up_blocks.{i}" for i in range(1, n_up)] + ["conv_norm_out", "conv_out"]
    return StageSplit(
        owned=(tuple(middle), tuple(head + tail)),
        exports=((middle[-1],), (head[-1],)),
        output_stage=1,
    )


class SDXLDenoiser(Denoiser):
    def __init__(self, unet: UNet2DConditionModel, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__(unet, device, dtype)
        self.split = sdxl_split(unet)
        self._head_export = self.split.exports[1][0]
        self._middle_export = self.split.exports[0][0]
        modules = dict(unet.named_modules())
        head_block = modules[self._head_export]
        self._head_skips = len(head_block.resnets) + (1 if head_block.downsamplers is not None else 0)

    def _forward(self, sample: torch.Tensor, timestep: torch.Tensor, cond: Conditioning) -> Any:
        return self.model(
            sample,
            timestep,
            encoder_hidden_states=cond["PROMPT_EMBEDS"],
            timestep_cond=None,
            added_cond_kwargs={"text_embeds": cond["TEXT_EMBEDS"], "time_ids": cond["TIME_IDS"]},
            return_dict=False,
        )

    def _bypass(self, name: str, module: torch.nn.Module, args: tuple, kwargs: dict) -> Any:
        hidden = args[0] if args else kwargs["hidden_states"]
        if isinstance(module, (DownBlock2D, CrossAttnDownBlock2D)):
            # The skip tuple's length matters (up blocks slice it by count), its values do not.
            skips = len(module.resnets) + (1 if module.downsamplers is not None else 0)
            return hidden, (hidden,) * skips
        if name.startswith("up_blocks.0.attentions."):
            return (hidden,)
        return hidden

    def _pack(self, recorded: dict[str, Any]) -> dict[str, torch.Tensor]:
        wire = {}
        if self._middle_export in recorded:
            wire[MIDDLE_ACT] = recorded[self._middle_export][0].contiguous()
        if self._head_export in recorded:
            # Only the hidden states cross; the head block's skips stay with the head stage.
            wire[HEAD_ACT] = recorded[self._head_export][0].contiguous()
        return wire

    def _unpack(self, wire: dict[str, torch.Tensor]) -> dict[str, Any]:
        stale: dict[str, Any] = {}
        if MIDDLE_ACT in wire:
            stale[self._middle_export] = (wire[MIDDLE_ACT],)
        if HEAD_ACT in wire:
            head = wire[HEAD_ACT]
            stale[self._head_export] = (head, (head,) * self._head_skips)
        return stale


class SDXLTextEncoder(TextEncoder):
    """Both CLIP encoders through diffusers' own ``encode_prompt`` (so embeddings match exactly)."""

    def __init__(self, folder: Path, device: torch.device, dtype: torch.dtype) -> None:
        self.pipe = StableDiffusionXLPipeline.from_pretrained(
            folder, unet=None, vae=None, scheduler=None, dtype=dtype
        ).to(device)
        self.device = device

    @torch.inference_mode()
    def encode(self, prompts: list[str], negative_prompts: list[str] | None) -> dict[str, torch.Tensor]:
        embeds, neg_embeds, pooled, neg_pooled = self.pipe.encode_prompt(
            prompt=prompts,
            device=self.device,
            do_classifier_free_guidance=True,
            negative_prompt=negative_prompts,
        )
        return branch_tensors(
            {"PROMPT_EMBEDS": embeds, "TEXT_EMBEDS": pooled}, {"PROMPT_EMBEDS": neg_embeds, "TEXT_EMBEDS": neg_pooled}
        )


class SDXLLatentMath(LatentMath):
    def __init__(self, folder: Path) -> None:
        unet_config = UNet2DConditionModel.load_config(folder, subfolder="unet")
        self.latent_channels = unet_config["in_channels"]
        self.vae_scale_factor = vae_scale_factor(folder)
        self.scheduler_class, self.scheduler_config = load_scheduler_config(folder)

    def new_scheduler(self, steps: int, height: int, width: int):
        return new_scheduler(self.scheduler_class, self.scheduler_config, steps)

    def extra_conditioning(self, height: int, width: int) -> Conditioning:
        # original_size + crops_coords_top_left + target_size, as diffusers' defaults make them.
        time_ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=torch.float32)
        return {"TIME_IDS": time_ids}

    def step(self, scheduler, eps: torch.Tensor, timestep: torch.Tensor, latents: torch.Tensor):
        # eta=0 is what StableDiffusionXLPipeline passes to DDIM.
        kwargs = {"eta": 0.0} if "eta" in scheduler.step.__code__.co_varnames else {}
        return scheduler.step(eps, timestep, latents, **kwargs, return_dict=False)[0]


class SDXLFamily(Family):
    wire = SDXL_WIRE

    text_encoder_class = SDXLTextEncoder
    denoiser_class = SDXLDenoiser
    denoiser_model_class = UNet2DConditionModel
    denoiser_subfolder = "unet"
    latent_math_class = SDXLLatentMath
    decoder_upcasts = True

    def model_shapes(self, folder: Path) -> ModelShapes:
        unet = self.denoiser_config(folder)
        channels = unet["block_out_channels"]
        time_ids = 6  # SDXLLatentMath.extra_conditioning
        # The add-embedding reads the pooled text embedding and the time ids' embeddings side by side.
        text_embeds = unet["projection_class_embeddings_input_dim"] - time_ids * unet["addition_time_embed_dim"]
        text = {
            "PROMPT_EMBEDS": (tokenizer_max_length(folder), unet["cross_attention_dim"]),
            "TEXT_EMBEDS": (text_embeds,),
        }
        # Both exports live at the lowest resolution (sdxl_split): the middle's last output (the deepest
        # block's width) and the output of the head's last block, after its downsampler.
        lowest = len(channels) - 1
        return self._shapes(
            folder,
            conditioning={**text, "TIME_IDS": (time_ids,)},
            activations={MIDDLE_ACT: FeatureMap(channels[-1], lowest), HEAD_ACT: FeatureMap(channels[-2], lowest)},
        )

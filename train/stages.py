"""The three training stages: the VAE, the SDXL-architecture U-Net and the SD3-architecture transformer.

Text encoders and tokenizers are of the built-in checkpoints' classes and are trained jointly with the denoiser
(a frozen random text encoder taught the first attempt to ignore the prompt: see docs/training.md). Caption
dropout for classifier-free guidance uses each pipeline's own unconditional input: zeros for SDXL
(``force_zeros_for_empty_prompt``), the encoded empty prompt for SD3.
"""

from __future__ import annotations

import functools
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL

from export.checkpoint_common import TOKENIZER_PAD_TOKENS, build_folder, make_text_encoder
from export.sd3_checkpoint import make_flow_scheduler, make_t5_encoder, make_t5_tokenizer, make_transformer
from export.sdxl_checkpoint import make_scheduler, make_unet
from train import loop
from train.components import TrainSize, make_serving_vae, make_vae, write_tokenizers
from train.data import ATTRIBUTES, Example, caption, make_batch, mislabel

MAX_TOKENS = 77  # CLIP's context, as the pipelines pad to


@dataclass(frozen=True)
class Hyper:
    """Knobs of one training run (defaults: the committed checkpoints)."""

    steps: int
    batch: int = 32
    lr: float = 5e-4
    text_lr: float = 1e-3  # 0: text encoders frozen at their random initialisation
    drop: float = 0.1  # caption dropout for classifier-free guidance
    mislabel: float = 0.0  # share of captions naming one attribute wrongly (train.data.mislabel)
    mislabel_attributes: tuple[str, ...] = ATTRIBUTES  # which attributes a wrong caption may get wrong
    ema: float = 0.999
    seed: int = 0
    latent_mode: str = "sample"  # "mean": train on the posterior mean (no VAE sampling noise in the target)


def _images(size: TrainSize, seed: int, step: int, batch: int) -> tuple[torch.Tensor, list[Example]]:
    images, examples = make_batch(seed, step * batch, batch, size.image_size)
    return torch.from_numpy(images), examples


def training_captions(examples: list[Example], share: float, seed: int, step: int,
                      attributes: tuple[str, ...] = ATTRIBUTES) -> list[str]:
    """The examples' captions, a ``share`` of them (drawn from (seed, step) alone) naming one attribute wrongly."""
    rng = np.random.default_rng([seed, step, 1])
    return [caption(*mislabel(e.colour, e.shape, e.position, rng, attributes=attributes))
            if rng.random() < share else e.caption for e in examples]


# ----------------------------------------------------------------------------------------------------------
# VAE


def train_vae(size: TrainSize, family: str, state_dir: Path, hyper: Hyper, **run_kwargs) -> AutoencoderKL:
    """Train (or resume, or load if finished) the family's autoencoder; returns it with its latent scale set."""
    folder = state_dir / f"vae-{family}"
    if (folder / "config.json").is_file():
        return AutoencoderKL.from_pretrained(folder)
    torch.manual_seed(hyper.seed)
    vae = make_vae(size, family)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=hyper.lr, weight_decay=0.0)

    def step_fn(step: int) -> torch.Tensor:
        x, _ = _images(size, hyper.seed + 1, step, hyper.batch)
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(
            posterior.mean.shape, generator=loop.step_generator(hyper.seed, step)
        )
        recon = vae.decode(z).sample
        kl = posterior.kl().mean() / posterior.mean[0].numel()
        return F.mse_loss(recon, x) + 1e-3 * kl

    done = loop.run(f"vae-{family}", state_dir / f"vae-{family}.pt", {"vae": vae}, optimizer, step_fn,
                    hyper.steps, **run_kwargs)
    if done < hyper.steps:
        raise SystemExit(f"vae-{family}: stopped at step {done} of {hyper.steps}; run again to resume")
    vae.eval()
    set_latent_scale(vae, size, family, hyper.seed)
    vae.save_pretrained(folder)
    return vae


def train_serving_vae(size: TrainSize, family: str, state_dir: Path, base: AutoencoderKL, hyper: Hyper,
                      **run_kwargs) -> AutoencoderKL:
    """Train the shipped VAE (scale factor 8) into ``base``'s latent space, so the denoiser trained on ``base``'s
    latents draws 2x larger images through it.

    The decoder learns to draw the same example at twice the side (the generator draws it again at 2x) from
    ``base``'s latents of the small one; the encoder learns to give ``base``'s latent distribution for the large one.
    The latent scale and shift are ``base``'s.
    """
    folder = state_dir / f"vae-{family}-x2"
    if (folder / "config.json").is_file():
        return AutoencoderKL.from_pretrained(folder)
    torch.manual_seed(hyper.seed + 5)
    vae = make_serving_vae(size, family)
    base.eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=hyper.lr, weight_decay=0.0)

    def step_fn(step: int) -> torch.Tensor:
        small, _ = _images(size, hyper.seed + 1, step, hyper.batch)
        large, _ = make_batch(hyper.seed + 1, step * hyper.batch, hyper.batch, size.image_size * 2)
        large = torch.from_numpy(large)
        with torch.no_grad():
            target = base.encode(small).latent_dist
        posterior = vae.encode(large).latent_dist
        z = target.mean + target.std * torch.randn(target.mean.shape, generator=loop.step_generator(hyper.seed, step))
        recon = vae.decode(z).sample
        encoder_loss = F.mse_loss(posterior.mean, target.mean) + F.mse_loss(posterior.std, target.std)
        return F.mse_loss(recon, large) + encoder_loss

    done = loop.run(f"vae-{family}-x2", state_dir / f"vae-{family}-x2.pt", {"vae": vae}, optimizer, step_fn,
                    hyper.steps, **run_kwargs)
    if done < hyper.steps:
        raise SystemExit(f"vae-{family}-x2: stopped at step {done} of {hyper.steps}; run again to resume")
    vae.eval()
    vae.register_to_config(scaling_factor=base.config.scaling_factor, shift_factor=base.config.shift_factor)
    vae.save_pretrained(folder)
    return vae


@torch.no_grad()
def set_latent_scale(vae: AutoencoderKL, size: TrainSize, family: str, seed: int) -> None:
    """Set the config's latent scaling (SDXL: 1/RMS) or scaling and shift (SD3: 1/std, mean) as the real VAEs are."""
    x, _ = _images(size, seed + 2, 0, 512)
    z = vae.encode(x).latent_dist.mean
    if family == "sd3":
        vae.register_to_config(shift_factor=round(z.mean().item(), 4), scaling_factor=round(1 / z.std().item(), 4))
    else:
        vae.register_to_config(scaling_factor=round(1 / z.pow(2).mean().sqrt().item(), 4))


@torch.no_grad()
def encode_latents(vae: AutoencoderKL, x: torch.Tensor, generator: torch.Generator, mode: str = "sample"
                   ) -> torch.Tensor:
    """Sampled (or mean) latents, normalised as the pipelines expect them before the final decode.

    Why "mean" exists: these small VAEs' posterior std is as large as the spread of their means, so sampled
    latents carry noise no prompt can predict, a floor under the loss (SD3's flow target holds the latent itself).
    """
    posterior = vae.encode(x).latent_dist
    z = posterior.mean
    if mode == "sample":
        z = z + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
    shift = vae.config.shift_factor or 0.0
    return (z - shift) * vae.config.scaling_factor


# ----------------------------------------------------------------------------------------------------------
# Text encoding, as the pipelines do it


def _clip(tokenizer, encoder, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(penultimate hidden states, pooled output) of one CLIP tower, as ``encode_prompt`` reads them."""
    ids = tokenizer(captions, padding="max_length", max_length=MAX_TOKENS, truncation=True, return_tensors="pt")
    out = encoder(ids.input_ids, output_hidden_states=True)
    return out.hidden_states[-2], out[0]


def sdxl_embeddings(tokenizers, encoders, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """SDXL's prompt_embeds (both towers' penultimate states side by side) and pooled embeds (tower 2)."""
    unique = sorted(set(captions))
    h1, _ = _clip(tokenizers[0], encoders[0], unique)
    h2, pooled = _clip(tokenizers[1], encoders[1], unique)
    index = torch.tensor([unique.index(c) for c in captions])
    return torch.cat([h1, h2], dim=-1)[index], pooled[index]


def sd3_embeddings(tokenizers, encoders, captions: list[str], t5_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """SD3's prompt_embeds (CLIP pair zero-padded to T5's width, then ``t5_tokens`` T5 tokens) and pooled embeds."""
    unique = sorted(set(captions))
    h1, p1 = _clip(tokenizers[0], encoders[0], unique)
    h2, p2 = _clip(tokenizers[1], encoders[1], unique)
    ids = tokenizers[2](unique, padding="max_length", max_length=t5_tokens, truncation=True, return_tensors="pt")
    t5 = encoders[2](ids.input_ids)[0]
    clip = torch.cat([h1, h2], dim=-1)
    clip = F.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
    index = torch.tensor([unique.index(c) for c in captions])
    return torch.cat([clip, t5], dim=-2)[index], torch.cat([p1, p2], dim=-1)[index]


# ----------------------------------------------------------------------------------------------------------
# Denoisers


def _text_parts(family: str, size: TrainSize, folder: Path, seed: int):
    """Tokenizers (written to ``folder``) and freshly initialised text encoders of the family."""
    from transformers import CLIPTokenizer

    spec = size.sdxl if family == "sdxl" else size.sd3
    vocab = write_tokenizers(folder, spec.bpe_merges)
    tokenizers = [CLIPTokenizer.from_pretrained(folder / name) for name in TOKENIZER_PAD_TOKENS]
    te2_hidden, te2_layers = (spec.te2_hidden, spec.te2_layers) if family == "sdxl" else (spec.te2_hidden, 2)
    torch.manual_seed(seed)
    te1 = make_text_encoder(spec.te_hidden, spec.te_layers, spec.te_heads, "quick_gelu", vocab,
                            TOKENIZER_PAD_TOKENS["tokenizer"], with_projection=family == "sd3")
    torch.manual_seed(seed + 1)
    te2 = make_text_encoder(te2_hidden, te2_layers, spec.te_heads, "gelu", vocab,
                            TOKENIZER_PAD_TOKENS["tokenizer_2"], with_projection=True)
    encoders = [te1, te2]
    if family == "sd3":
        tokenizer_3 = make_t5_tokenizer(folder / "tokenizer_3", spec.t5_vocab, size.sd3_t5_tokens)
        tokenizers.append(tokenizer_3)
        torch.manual_seed(seed + 2)
        encoders.append(make_t5_encoder(spec, tokenizer_3))
    return tokenizers, encoders


def denoiser_parts(family: str, size: TrainSize, state_dir: Path, seed: int):
    """Freshly initialised (seeded) denoiser and text encoders, the tokenizers, and the training scheduler."""
    tokenizers, encoders = _text_parts(family, size, state_dir / f"tokenizers-{family}", seed)
    torch.manual_seed(seed + 3)
    if family == "sdxl":
        spec = size.sdxl
        denoiser = make_unet(spec, text_embed_dim=spec.te_hidden + spec.te2_hidden, pooled_dim=spec.te2_hidden)
        scheduler = make_scheduler("ddim")
    else:
        denoiser = make_transformer(size.sd3)
        scheduler = make_flow_scheduler()
    modules = {"denoiser": denoiser, **{f"text_encoder_{i}": e for i, e in enumerate(encoders)}}
    return modules, tokenizers, encoders, scheduler


def train_denoiser(family: str, size: TrainSize, state_dir: Path, vae: AutoencoderKL, hyper: Hyper,
                   **run_kwargs) -> tuple[dict[str, torch.nn.Module], list, int]:
    """Train (or resume) the family's denoiser and text encoders; returns the EMA modules, tokenizers, steps done."""
    modules, tokenizers, encoders, scheduler = denoiser_parts(family, size, state_dir, hyper.seed)
    denoiser = modules["denoiser"]
    embed = sdxl_embeddings if family == "sdxl" else functools.partial(sd3_embeddings, t5_tokens=size.sd3_t5_tokens)
    groups = [{"params": list(denoiser.parameters()), "lr": hyper.lr}]
    if hyper.text_lr > 0:
        groups.append({"params": [p for e in encoders for p in e.parameters()], "lr": hyper.text_lr})
    else:  # frozen text encoders (the first attempt's set-up, kept for comparison)
        for encoder in encoders:
            encoder.requires_grad_(False)
    optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
    emas = {k: loop.Ema(m, hyper.ema) for k, m in modules.items()}
    vae.eval().requires_grad_(False)
    side = size.image_size
    time_ids = torch.tensor([[side, side, 0, 0, side, side]], dtype=torch.float32)
    alphas = scheduler.alphas_cumprod if family == "sdxl" else None

    def step_fn(step: int) -> torch.Tensor:
        gen = loop.step_generator(hyper.seed, step)
        x, examples = _images(size, hyper.seed, step, hyper.batch)
        captions = training_captions(examples, hyper.mislabel, hyper.seed, step, hyper.mislabel_attributes)
        latents = encode_latents(vae, x, gen, hyper.latent_mode)
        dropped = torch.rand(len(captions), generator=gen) < hyper.drop
        noise = torch.randn(latents.shape, generator=gen)
        if family == "sd3":
            captions = ["" if d else c for c, d in zip(captions, dropped.tolist(), strict=True)]
        embeds, pooled = embed(tokenizers, encoders, captions)
        if family == "sdxl":
            keep = (~dropped).float()
            embeds, pooled = embeds * keep[:, None, None], pooled * keep[:, None]
            t = torch.randint(0, 1000, (len(captions),), generator=gen)
            a = alphas[t].view(-1, 1, 1, 1)
            noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
            pred = denoiser(noisy, t, encoder_hidden_states=embeds,
                            added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids.expand(len(t), -1)}).sample
            return F.mse_loss(pred, noise)
        # Rectified flow, SD3's objective: x_s = (1 - s) x0 + s noise, target noise - x0; s drawn as the
        # shifted schedule samples it (uniform, then SD3's shift of 3).
        u = torch.rand(len(captions), generator=gen)
        shift = scheduler.config.shift
        sigma = shift * u / (1 + (shift - 1) * u)
        s = sigma.view(-1, 1, 1, 1)
        noisy = (1 - s) * latents + s * noise
        pred = denoiser(hidden_states=noisy, timestep=sigma * 1000, encoder_hidden_states=embeds,
                        pooled_projections=pooled).sample
        return F.mse_loss(pred, noise - latents)

    recipe = {k: v for k, v in asdict(hyper).items() if k != "steps"}
    recipe["mislabel_attributes"] = list(hyper.mislabel_attributes)
    done = loop.run(f"{family}-denoiser", state_dir / f"{family}-denoiser.pt", modules, optimizer, step_fn,
                    hyper.steps, emas=emas, recipe=recipe, **run_kwargs)
    return {k: e.shadow for k, e in emas.items()}, tokenizers, done


# The hybrid knobs that suit each trained model, written into its serving_defaults.json on export (how they were
# chosen: docs/training.md, "What ships"). A family without an entry keeps the family's knobs.
TRAINED_KNOBS: dict[str, dict[str, float]] = {
    "sdxl": {"slope_window": 8, "eps_slope": 1.5e-3, "tau_cap": 20},
    "sd3": {"slope_window": 8, "eps_slope": 1.5e-2, "tau_cap": 25},
}


def write_model_defaults(family: str, folder: Path) -> Path:
    """The checkpoint's serving defaults: its VAE's image size (it was trained at that size) and its knobs."""
    from hybridiff.families import get_family
    from hybridiff.serving_defaults import write_serving_defaults
    from hybridiff.wire import Limits

    # The size it was trained at, or the smallest a server accepts (a test's 16-pixel model draws at 64).
    side = max(json.loads((folder / "vae" / "config.json").read_text())["sample_size"], Limits().min_size)
    values = {"height": side, "width": side, **TRAINED_KNOBS.get(family, {})}
    return write_serving_defaults(folder, get_family(family).defaults, values)


def export(family: str, out_dir: Path, state_dir: Path, vae: AutoencoderKL, modules: dict, tokenizers: list) -> Path:
    """Save the EMA weights as a diffusers folder laid out exactly like the built-in checkpoints."""
    from diffusers import StableDiffusion3Pipeline, StableDiffusionXLPipeline

    from export.checkpoint_common import restore_files

    tokenizer_dir = state_dir / f"tokenizers-{family}"
    names = ["tokenizer", "tokenizer_2"] + (["tokenizer_3"] if family == "sd3" else [])
    files = {n: {p.name: p.read_bytes() for p in (tokenizer_dir / n).iterdir()} for n in names}

    def write(folder: Path) -> None:
        if family == "sdxl":
            pipe = StableDiffusionXLPipeline(
                vae=vae, text_encoder=modules["text_encoder_0"], text_encoder_2=modules["text_encoder_1"],
                tokenizer=tokenizers[0], tokenizer_2=tokenizers[1], unet=modules["denoiser"],
                scheduler=make_scheduler("ddim"), force_zeros_for_empty_prompt=True, add_watermarker=False,
            )
        else:
            pipe = StableDiffusion3Pipeline(
                transformer=modules["denoiser"], scheduler=make_flow_scheduler(), vae=vae,
                text_encoder=modules["text_encoder_0"], tokenizer=tokenizers[0],
                text_encoder_2=modules["text_encoder_1"], tokenizer_2=tokenizers[1],
                text_encoder_3=modules["text_encoder_2"], tokenizer_3=tokenizers[2],
            )
        pipe.save_pretrained(folder, safe_serialization=True)
        restore_files(folder, files)
        write_model_defaults(family, folder)
        if family == "sd3":
            index_path = folder / "model_index.json"
            index = json.loads(index_path.read_text())
            index["tokenizer_3"] = ["transformers", "T5TokenizerFast"]
            index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")

    return build_folder(Path(out_dir), write, lambda: None, f"trained {family} checkpoint", force=True)


def export_from_state(family: str, size: TrainSize, state_dir: Path, out_dir: Path, seed: int = 0,
                      vae_name: str | None = None) -> tuple[Path, int]:
    """Write ``out_dir`` from the EMA weights of the last saved state (a run may still be going); returns the step.

    ``vae_name``: the VAE folder in ``state_dir`` to ship (default: the serving VAE if trained, else the base one).
    """
    if vae_name is None:
        vae_name = f"vae-{family}-x2" if (state_dir / f"vae-{family}-x2" / "config.json").is_file() else f"vae-{family}"
    vae = AutoencoderKL.from_pretrained(state_dir / vae_name)
    modules, tokenizers, _, _ = denoiser_parts(family, size, state_dir, seed)
    state = torch.load(state_dir / f"{family}-denoiser.pt", map_location="cpu", weights_only=False)
    for key, module in modules.items():
        module.load_state_dict(state["emas"][key])
    return export(family, out_dir, state_dir, vae, modules, tokenizers), state["step"]

"""Build small, seeded, random-weight checkpoints laid out like the real Stable Diffusion XL and SD3 folders.

Why: the serving stack, its tests and its benchmarks need a folder that ``StableDiffusionXLPipeline.from_pretrained``
(or ``StableDiffusion3Pipeline.from_pretrained``) loads exactly as it loads ``stabilityai/stable-diffusion-xl-base-1.0``
(or ``stabilityai/stable-diffusion-3-medium-diffusers``): same component classes, subfolders, config keys and block
structure. Nothing can be downloaded here and the real models are far too big for a CPU box. The weights are random
(so images are noise), yet every code path -- the text encoders, pooled embeddings, micro conditioning,
classifier-free guidance, VAE decode -- runs as with the real model. SD3's own pieces are in ``sd3_checkpoint.py``.

Usage::

    python -m export.build_checkpoint --family sdxl --size tiny --out checkpoints/sdxl-tiny [--seed 0] [--force]
    python -m export.build_checkpoint --family sd3 --size tiny --out checkpoints/sd3-tiny
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # imported lazily at run time: the "already built" path should not pay for loading diffusers
    from diffusers import AutoencoderKL, DDIMScheduler, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

SCHEDULERS = ("ddim", "euler")
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
MODEL_MAX_LENGTH = 77
# SDXL pads the first tokenizer with the end token and the second (OpenCLIP bigG) with "!".
TOKENIZER_PAD_TOKENS = {"tokenizer": EOS_TOKEN, "tokenizer_2": "!"}

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

# Text the tokenizer merges are learned from: common English plus words typical of image prompts, so that
# ordinary prompts are split into a realistic number of tokens rather than one token per byte.
_BPE_TRAINING_TEXT = """
a an the and or but of to in on at by for with from into over under between through after before about above
below is are was were be been being have has had do does did will would can could should may might must this
that these those it its he she they we you i me him her them us my your our their his what which who whom whose
when where why how all any both each few more most other some such no nor not only own same so than too very
just also there here then now up down out off again further once one two three four five six seven eight nine
ten first second new old big small large little long short high low good great best better bad right left light
dark bright black white red green blue yellow orange purple pink brown gray grey golden silver colorful
photo photograph picture image painting drawing sketch illustration portrait landscape render rendering art
artwork artist style detailed details highly realistic photorealistic hyperrealistic cinematic lighting sharp
focus soft beautiful stunning epic dramatic fantasy concept digital oil watercolor canvas studio professional
quality resolution masterpiece trending award winning camera lens shot close view wide angle background
foreground scene night day morning evening sunset sunrise sky cloud clouds sun moon star stars rain snow fog
mist storm water sea ocean river lake beach mountain mountains hill forest tree trees flower flowers garden
field grass city street road building buildings house castle tower bridge village town room window door
table chair car train ship boat plane robot astronaut horse dog cat bird fish dragon lion tiger bear wolf fox
man woman boy girl child people person face eyes hair hand hands smile dress wearing sitting standing riding
walking running flying holding looking playing eating reading mars space planet galaxy universe futuristic
ancient medieval modern vintage retro cyberpunk steampunk magic magical glowing neon shiny metal wooden glass
stone ice fire smoke gold crystal reflection shadow shadows texture pattern cute happy sad scary peaceful
"""


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
# Tokenizers: CLIP's byte-level BPE format (vocab.json + merges.txt), built locally.


def bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2 byte-to-printable-character table: BPE files store bytes as these visible characters."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return dict(sorted(table.items()))


def _merge_pair(symbols: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    """Replace every adjacent occurrence of ``pair`` in ``symbols`` by its concatenation."""
    merged: list[str] = []
    i = 0
    while i < len(symbols):
        if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
            merged.append(symbols[i] + symbols[i + 1])
            i += 2
        else:
            merged.append(symbols[i])
            i += 1
    return tuple(merged)


def learn_bpe_merges(words: Iterable[str], max_merges: int) -> list[tuple[str, str]]:
    """Learn CLIP-style BPE merges (words end in ``</w>``) from ``words``, most frequent pair first.

    Ties break deterministically, and learning continues on pairs seen once, so frequent words end up as single
    tokens as in CLIP's real vocabulary.
    """
    byte_chars = bytes_to_unicode()
    corpus: Counter[tuple[str, ...]] = Counter()
    for word in words:
        symbols = [byte_chars[b] for b in word.lower().encode("utf-8")]
        if symbols:
            symbols[-1] += "</w>"
            corpus[tuple(symbols)] += 1
    merges: list[tuple[str, str]] = []
    while len(merges) < max_merges:
        pairs: Counter[tuple[str, str]] = Counter()
        for symbols, freq in corpus.items():
            for pair in zip(symbols, symbols[1:], strict=False):
                pairs[pair] += freq
        if not pairs:
            break
        best = max(pairs.items(), key=lambda item: (item[1], item[0]))[0]
        merges.append(best)
        merged: Counter[tuple[str, ...]] = Counter()
        for symbols, freq in corpus.items():
            merged[_merge_pair(symbols, best)] += freq
        corpus = merged
    return merges


def build_clip_vocab(merges: Sequence[tuple[str, str]]) -> dict[str, int]:
    """CLIP vocab order: 256 byte symbols, the same with ``</w>``, one token per merge, then the two specials."""
    byte_symbols = list(bytes_to_unicode().values())
    tokens = byte_symbols + [s + "</w>" for s in byte_symbols] + [a + b for a, b in merges]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    vocab: dict[str, int] = {}
    for token in tokens:
        vocab.setdefault(token, len(vocab))
    return vocab


def write_clip_tokenizer(
    folder: Path, vocab: dict[str, int], merges: Sequence[tuple[str, str]], pad_token: str
) -> None:
    """Write the four files a downloaded SDXL tokenizer folder has (no tokenizer.json, like the original)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merge_lines = "".join(f"{a} {b}\n" for a, b in merges)
    (folder / "merges.txt").write_text("#version: 0.2\n" + merge_lines, encoding="utf-8")
    special = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "unk_token": EOS_TOKEN, "pad_token": pad_token}
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": MODEL_MAX_LENGTH,
        "do_lower_case": True,
        "add_prefix_space": False,
        "errors": "replace",
        **special,
    }
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n", encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


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


def make_text_encoder(
    hidden: int, layers: int, heads: int, act: str, vocab: dict[str, int], pad_token: str, with_projection: bool
) -> CLIPTextModel | CLIPTextModelWithProjection:
    """CLIP text tower; eos_token_id is the real end token so the pooled output is read at the first one."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        projection_dim=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=MODEL_MAX_LENGTH,
        hidden_act=act,
        bos_token_id=vocab[BOS_TOKEN],
        eos_token_id=vocab[EOS_TOKEN],
        pad_token_id=vocab[pad_token],
    )
    model_cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return model_cls(config)


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


def _is_complete(folder: Path) -> bool:
    """A folder only ever appears by renaming a finished build, so model_index.json marks it complete."""
    return (folder / "model_index.json").is_file()


def _mismatch(folder: Path, spec: SdxlSize, scheduler: str) -> str | None:
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


def write_clip_tokenizers(
    folder: Path, num_merges: int, pad_tokens: dict[str, str]
) -> tuple[dict[str, int], dict[str, CLIPTokenizer], dict[str, dict[str, bytes]]]:
    """Write one CLIP BPE tokenizer folder per entry of ``pad_tokens`` (subfolder -> pad token), all sharing one
    vocabulary learned from the built-in prompt words.

    Returns the vocabulary, the tokenizers loaded back through ``from_pretrained`` (the path a downloaded checkpoint
    takes, so the in-memory tokenizers are the real thing) and the files written, for :func:`restore_files`.
    """
    from transformers import CLIPTokenizer

    merges = learn_bpe_merges(_BPE_TRAINING_TEXT.split(), num_merges)
    vocab = build_clip_vocab(merges)
    for name, pad in pad_tokens.items():
        write_clip_tokenizer(folder / name, vocab, merges, pad)
    tokenizers = {name: CLIPTokenizer.from_pretrained(folder / name) for name in pad_tokens}
    files = {name: {p.name: p.read_bytes() for p in (folder / name).iterdir()} for name in pad_tokens}
    return vocab, tokenizers, files


def restore_files(folder: Path, files: dict[str, dict[str, bytes]]) -> None:
    """Replace each subfolder of ``folder`` named in ``files`` by exactly those files.

    ``save_pretrained`` rewrites tokenizers in its own format; this restores the file set of the original checkpoint.
    """
    for name, contents in files.items():
        shutil.rmtree(folder / name)
        (folder / name).mkdir()
        for filename, data in contents.items():
            (folder / name / filename).write_bytes(data)


def _write_checkpoint(folder: Path, spec: SdxlSize, seed: int, scheduler: str) -> None:
    """Build every component and save the pipeline into ``folder`` (which must be empty)."""
    from diffusers import StableDiffusionXLPipeline

    vocab, tokenizers, tokenizer_files = write_clip_tokenizers(folder, spec.bpe_merges, TOKENIZER_PAD_TOKENS)

    torch.manual_seed(seed)
    # OpenAI CLIP ViT-L (quick_gelu) and OpenCLIP bigG (gelu, projected pooled output), as in SDXL.
    text_encoder = make_text_encoder(
        spec.te_hidden,
        spec.te_layers,
        spec.te_heads,
        act="quick_gelu",
        vocab=vocab,
        pad_token=TOKENIZER_PAD_TOKENS["tokenizer"],
        with_projection=False,
    )
    torch.manual_seed(seed + 1)
    text_encoder_2 = make_text_encoder(
        spec.te2_hidden,
        spec.te2_layers,
        spec.te_heads,
        act="gelu",
        vocab=vocab,
        pad_token=TOKENIZER_PAD_TOKENS["tokenizer_2"],
        with_projection=True,
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


def _make_readable(folder: Path) -> None:
    """Weight files are saved with mode 0600; give everything the umask-derived mode a download would have."""
    umask = os.umask(0)
    os.umask(umask)
    for path in folder.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def _move_into_place(built: Path, out_dir: Path) -> None:
    """Put ``built`` at ``out_dir`` with renames only, so no reader ever sees a half-written checkpoint."""
    if not out_dir.exists():
        try:
            built.rename(out_dir)
        except OSError:
            if not _is_complete(out_dir):
                raise
            # A concurrent build of the same folder finished first; keep its result.
        return
    stale = out_dir.with_name(f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}")
    out_dir.rename(stale)
    built.rename(out_dir)
    shutil.rmtree(stale, ignore_errors=True)


def build_folder(
    out_dir: Path, write: Callable[[Path], None], mismatch: Callable[[], str | None], label: str, force: bool
) -> Path:
    """Build (or keep, if already complete) a checkpoint folder: ``write(folder)`` fills an empty folder.

    The folder is built next to ``out_dir`` under a hidden temporary name and renamed into place at the end, so an
    interrupted build never leaves a folder that looks usable. ``mismatch()`` describes how an existing complete
    folder differs from the request (None: it matches). Returns ``out_dir``.
    """
    if _is_complete(out_dir) and not force:
        problem = mismatch()
        if problem is not None:
            raise FileExistsError(f"{out_dir} exists but {problem}; rebuild it with force=True (--force)")
        print(f"{out_dir}: complete checkpoint already present, nothing to do (use --force to rebuild)")
        return out_dir

    if out_dir.exists() and not _is_complete(out_dir) and (not out_dir.is_dir() or any(out_dir.iterdir())):
        # Builds appear by rename, so this is not one of ours (a typo'd --out?): never delete it.
        raise FileExistsError(f"{out_dir} exists and is not a checkpoint folder; refusing to replace it")

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    building = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    building.mkdir()
    try:
        write(building)
        _make_readable(building)
        _move_into_place(building, out_dir)
    finally:
        if building.exists():
            shutil.rmtree(building, ignore_errors=True)
    print(f"{out_dir}: built {label}")
    return out_dir


def build_sdxl_checkpoint(
    out_dir: str | Path, size: str = "tiny", seed: int = 0, scheduler: str = "ddim", force: bool = False
) -> Path:
    """Build (or keep, if already complete) an SDXL-architecture checkpoint folder with seeded random weights.

    See :func:`build_folder` for how the folder appears. Returns ``out_dir`` as a Path.
    """
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}, expected one of {sorted(SIZES)}")
    if scheduler not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {scheduler!r}, expected one of {SCHEDULERS}")
    spec = SIZES[size]
    out_dir = Path(out_dir)
    return build_folder(
        out_dir,
        lambda folder: _write_checkpoint(folder, spec, seed, scheduler),
        lambda: _mismatch(out_dir, spec, scheduler),
        f"sdxl-{size} checkpoint (seed={seed}, scheduler={scheduler})",
        force,
    )


def build_sd3_checkpoint(out_dir: str | Path, size: str = "tiny", seed: int = 0, force: bool = False) -> Path:
    """Build (or keep, if already complete) an SD3-architecture checkpoint folder with seeded random weights.

    Laid out like ``stabilityai/stable-diffusion-3-medium-diffusers``; the SD3 pieces live in
    :mod:`export.sd3_checkpoint` (imported here lazily: it imports this module's shared helpers).
    """
    from export.sd3_checkpoint import SD3_SIZES, sd3_mismatch, write_sd3_checkpoint

    if size not in SD3_SIZES:
        raise ValueError(f"unknown size {size!r}, expected one of {sorted(SD3_SIZES)}")
    spec = SD3_SIZES[size]
    out_dir = Path(out_dir)
    return build_folder(
        out_dir,
        lambda folder: write_sd3_checkpoint(folder, spec, seed),
        lambda: sd3_mismatch(out_dir, spec),
        f"sd3-{size} checkpoint (seed={seed})",
        force,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", choices=["sdxl", "sd3"], default="sdxl")
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny", help="same names for both families")
    parser.add_argument("--out", type=Path, required=True, help="checkpoint folder to create")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scheduler", choices=SCHEDULERS, default="ddim", help="SDXL only (SD3: FlowMatchEuler)")
    parser.add_argument("--force", action="store_true", help="rebuild even if a complete folder exists")
    args = parser.parse_args(argv)
    try:
        if args.family == "sd3":
            build_sd3_checkpoint(args.out, size=args.size, seed=args.seed, force=args.force)
        else:
            build_sdxl_checkpoint(args.out, size=args.size, seed=args.seed, scheduler=args.scheduler, force=args.force)
    except FileExistsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

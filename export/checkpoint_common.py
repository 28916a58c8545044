"""What the SDXL and SD3 checkpoint builders share: CLIP's BPE tokenizers and text towers, and folder assembly.

Both families use the same CLIP-L / OpenCLIP-bigG tokenizer pair, learned here from the built-in prompt words
(nothing is downloaded), and both folders appear atomically through :func:`build_folder`.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import torch

if TYPE_CHECKING:  # imported lazily at run time: the "already built" path should not pay for loading transformers
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

Spec = TypeVar("Spec")

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
MODEL_MAX_LENGTH = 77
# SDXL pads the first tokenizer with the end token and the second (OpenCLIP bigG) with "!".
TOKENIZER_PAD_TOKENS = {"tokenizer": EOS_TOKEN, "tokenizer_2": "!"}

# Text the tokenizer merges are learned from: common English plus words typical of image prompts, so that
# ordinary prompts are split into a realistic number of tokens rather than one token per byte.
PROMPT_WORDS = """
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
# CLIP text towers.


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


def make_clip_pair(
    vocab: dict[str, int], hidden: tuple[int, int], layers: tuple[int, int], heads: int, seed: int, project_first: bool
) -> tuple[CLIPTextModel | CLIPTextModelWithProjection, CLIPTextModelWithProjection]:
    """OpenAI CLIP ViT-L (quick_gelu) and OpenCLIP bigG (gelu, projected pooled output) stand-ins, seeded ``seed``
    and ``seed + 1``, as both families use them; SDXL's first tower has no projection, SD3's has."""
    torch.manual_seed(seed)
    first = make_text_encoder(
        hidden[0], layers[0], heads, "quick_gelu", vocab, TOKENIZER_PAD_TOKENS["tokenizer"], project_first
    )
    torch.manual_seed(seed + 1)
    second = make_text_encoder(hidden[1], layers[1], heads, "gelu", vocab, TOKENIZER_PAD_TOKENS["tokenizer_2"], True)
    return first, second


def write_clip_tokenizers(
    folder: Path, num_merges: int, pad_tokens: dict[str, str]
) -> tuple[dict[str, int], dict[str, CLIPTokenizer], dict[str, dict[str, bytes]]]:
    """Write one CLIP BPE tokenizer folder per entry of ``pad_tokens`` (subfolder -> pad token), all sharing one
    vocabulary learned from the built-in prompt words.

    Returns the vocabulary, the tokenizers loaded back through ``from_pretrained`` (the path a downloaded checkpoint
    takes, so the in-memory tokenizers are the real thing) and the files written, for :func:`restore_files`.
    """
    from transformers import CLIPTokenizer

    merges = learn_bpe_merges(PROMPT_WORDS.split(), num_merges)
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


# ----------------------------------------------------------------------------------------------------------
# Folder assembly.


def size_spec(sizes: Mapping[str, Spec], size: str) -> Spec:
    """The dimensions named ``size``, or a ValueError that lists the known names."""
    if size not in sizes:
        raise ValueError(f"unknown size {size!r}, expected one of {sorted(sizes)}")
    return sizes[size]


def _is_complete(folder: Path) -> bool:
    """A folder only ever appears by renaming a finished build, so model_index.json marks it complete."""
    return (folder / "model_index.json").is_file()


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

"""Procedural caption-image data: one coloured shape on a plain dark background, captioned
``a {colour} {shape} {position}`` (e.g. "a red circle on the left").

Deterministic by seed: :func:`make_example` draws the same picture for the same (seed, index). The held-out
combinations (:data:`HELD_OUT`) never appear in training batches, yet each of their colours, shapes and positions
does, so the model must compose them.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.9, 0.1, 0.1),
    "green": (0.1, 0.8, 0.1),
    "blue": (0.15, 0.25, 0.95),
    "yellow": (0.95, 0.9, 0.1),
}
SHAPES = ("circle", "square", "triangle")
# Phrase -> centre of the object as a fraction of the image side (x, y); y grows downwards.
POSITIONS: dict[str, tuple[float, float]] = {
    "on the left": (0.25, 0.5),
    "on the right": (0.75, 0.5),
    "at the top": (0.5, 0.25),
    "at the bottom": (0.5, 0.75),
    "in the center": (0.5, 0.5),
}
ATTRIBUTES = ("colour", "shape", "position")
BACKGROUND = (0.2, 0.2, 0.2)
# Object half-size (circle radius, square half-side, triangle half-base) and centre jitter, fractions of the side.
HALF_SIZE_RANGE = (0.16, 0.2)
JITTER = 0.04

# Combinations training never shows: every colour, shape and position still appears in other combinations.
HELD_OUT: frozenset[tuple[str, str, str]] = frozenset(
    {
        ("red", "circle", "on the left"),
        ("green", "square", "on the right"),
        ("blue", "triangle", "at the top"),
        ("yellow", "circle", "at the bottom"),
        ("red", "triangle", "in the center"),
        ("blue", "square", "on the left"),
        ("green", "circle", "at the top"),
        ("yellow", "triangle", "on the right"),
    }
)
ALL_COMBINATIONS: tuple[tuple[str, str, str], ...] = tuple(itertools.product(COLOURS, SHAPES, POSITIONS))
TRAIN_COMBINATIONS: tuple[tuple[str, str, str], ...] = tuple(c for c in ALL_COMBINATIONS if c not in HELD_OUT)
HELD_OUT_COMBINATIONS: tuple[tuple[str, str, str], ...] = tuple(c for c in ALL_COMBINATIONS if c in HELD_OUT)
# Image i of an evaluation (train.evaluate, bench.fidelity) is drawn with seed EVAL_SEED_BASE + i by default: the
# seeds the shipped models were chosen on; --seed-base scores them on others.
EVAL_SEED_BASE = 1000


@dataclass(frozen=True)
class Example:
    """One picture (float32 HWC in [0, 1]) with its caption and the labels it was drawn from."""

    image: np.ndarray
    caption: str
    colour: str
    shape: str
    position: str


def caption(colour: str, shape: str, position: str) -> str:
    return f"a {colour} {shape} {position}"


def draw(colour: str, shape: str, position: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """Draw one shape (hard edges) at the position's anchor, jittered, on the plain background."""
    for name, allowed in (("colour", COLOURS), ("shape", SHAPES), ("position", POSITIONS)):
        value = {"colour": colour, "shape": shape, "position": position}[name]
        if value not in allowed:
            raise ValueError(f"unknown {name} {value!r}; allowed: {list(allowed)}")
    half = rng.uniform(*HALF_SIZE_RANGE) * size
    ax, ay = POSITIONS[position]
    cx = (ax + rng.uniform(-JITTER, JITTER)) * size
    cy = (ay + rng.uniform(-JITTER, JITTER)) * size
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    dx, dy = xs - cx, ys - cy
    if shape == "circle":
        mask = dx * dx + dy * dy <= half * half
    elif shape == "square":
        mask = (np.abs(dx) <= half) & (np.abs(dy) <= half)
    else:  # triangle pointing up: apex at the top, base 2*half wide at the bottom, 2*half tall
        t = (dy + half) / (2 * half)  # 0 at the apex, 1 at the base
        mask = (t >= 0) & (t <= 1) & (np.abs(dx) <= t * half)
    image = np.empty((size, size, 3), dtype=np.float32)
    image[:] = BACKGROUND
    image[mask] = COLOURS[colour]
    return image


def make_example(
    seed: int, index: int, size: int = 32, combinations: tuple[tuple[str, str, str], ...] = TRAIN_COMBINATIONS
) -> Example:
    """The ``index``-th example of the stream ``seed``: same arguments, same picture."""
    rng = np.random.default_rng([seed, index])
    colour, shape, position = combinations[int(rng.integers(len(combinations)))]
    return Example(draw(colour, shape, position, size, rng), caption(colour, shape, position), colour, shape, position)


def mislabel(
    colour: str, shape: str, position: str, rng: np.random.Generator,
    combinations: tuple[tuple[str, str, str], ...] = TRAIN_COMBINATIONS,
    attributes: tuple[str, ...] = ATTRIBUTES,
) -> tuple[str, str, str]:
    """The combination with one attribute named wrongly: what a wrong caption of its picture would say.

    Why: a model trained on captions that always match converges to drawing the caption without guidance, so
    classifier-free guidance stops mattering. Web captions are often wrong; guidance, favouring pictures the caption
    fits better than the unconditional prediction does, is what removes the share of wrong captions the conditional
    model learns (docs/training.md). The attribute is drawn uniformly from ``attributes``, then the wrong value; the
    result stays in ``combinations`` (a wrong caption never names a held-out combination).
    """
    labels = (colour, shape, position)
    options: dict[int, list[tuple[str, str, str]]] = {}  # attribute index -> the wrong captions it allows
    for index, (name, values) in enumerate(zip(ATTRIBUTES, (COLOURS, SHAPES, POSITIONS), strict=True)):
        if name in attributes:
            for value in values:
                changed = labels[:index] + (value,) + labels[index + 1:]
                if value != labels[index] and changed in combinations:
                    options.setdefault(index, []).append(changed)
    wrong_indices = sorted(options)
    choices = options[wrong_indices[int(rng.integers(len(wrong_indices)))]]
    return choices[int(rng.integers(len(choices)))]


def make_batch(
    seed: int, start: int, count: int, size: int = 32,
    combinations: tuple[tuple[str, str, str], ...] = TRAIN_COMBINATIONS,
) -> tuple[np.ndarray, list[Example]]:
    """Examples ``start .. start+count-1`` of stream ``seed``: images as float32 NCHW in [-1, 1], and the examples."""
    examples = [make_example(seed, start + i, size, combinations) for i in range(count)]
    images = np.stack([e.image for e in examples]).transpose(0, 3, 1, 2) * 2 - 1
    return images.astype(np.float32), examples

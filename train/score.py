"""Prompt-adherence scorer for the shape data, analytic: it knows how :mod:`train.data` draws.

The background is estimated from the image border; the object is every pixel far from it. Colour is the palette
colour nearest the object's median pixel, position the anchor nearest its centroid, and shape follows from how much
of its bounding box it fills (square ~1, circle ~pi/4, triangle ~1/2).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from train.data import COLOURS, POSITIONS, SHAPES

ATTRIBUTES = ("colour", "shape", "position")
NONE = "none"  # the scorer's answer when it finds no object
_CAPTION = re.compile(r"^a (\w+) (\w+) (.+)$")
# Fill ratios between the shapes' ideal values (triangle 0.5, circle 0.785, square 1.0).
_TRIANGLE_MAX_FILL = 0.64
_CIRCLE_MAX_FILL = 0.89
_OBJECT_DISTANCE = 0.3  # RGB distance (0..1 scale) from the background that counts as object
_MIN_OBJECT_FRACTION = 0.01


@dataclass(frozen=True)
class Reading:
    colour: str
    shape: str
    position: str

    def as_dict(self) -> dict[str, str]:
        return {"colour": self.colour, "shape": self.shape, "position": self.position}


def parse_caption(text: str) -> dict[str, str]:
    """Labels of a caption of the data's grammar; ValueError names the part it does not know."""
    match = _CAPTION.match(text.strip().lower())
    if not match:
        raise ValueError(f"caption {text!r} is not of the form 'a {{colour}} {{shape}} {{position}}'")
    colour, shape, position = match.groups()
    if colour not in COLOURS or shape not in SHAPES or position not in POSITIONS:
        raise ValueError(
            f"caption {text!r}: colour in {list(COLOURS)}, shape in {SHAPES}, position in {list(POSITIONS)}"
        )
    return {"colour": colour, "shape": shape, "position": position}


def read_image(image: np.ndarray) -> Reading:
    """What the picture shows. ``image``: HWC, uint8 or float in [0, 1]."""
    img = image.astype(np.float32) / 255.0 if image.dtype == np.uint8 else image.astype(np.float32)
    h, w, _ = img.shape
    border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])
    background = np.median(border, axis=0)
    mask = np.linalg.norm(img - background, axis=-1) > _OBJECT_DISTANCE
    if mask.sum() < _MIN_OBJECT_FRACTION * h * w:
        return Reading(NONE, NONE, NONE)
    pixel = np.median(img[mask], axis=0)
    colour = min(COLOURS, key=lambda c: float(np.sum((np.asarray(COLOURS[c]) - pixel) ** 2)))
    ys, xs = np.nonzero(mask)
    cx, cy = (xs.mean() + 0.5) / w, (ys.mean() + 0.5) / h
    position = min(POSITIONS, key=lambda p: (POSITIONS[p][0] - cx) ** 2 + (POSITIONS[p][1] - cy) ** 2)
    box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
    fill = mask.sum() / box
    shape = "triangle" if fill < _TRIANGLE_MAX_FILL else "circle" if fill < _CIRCLE_MAX_FILL else "square"
    return Reading(colour, shape, position)


def score(images: list[np.ndarray], captions: list[str]) -> dict[str, float]:
    """Fraction of images whose reading matches the caption, per attribute, plus colour+position and all three."""
    hits = {name: 0 for name in (*ATTRIBUTES, "colour+position", "all")}
    for image, text in zip(images, captions, strict=True):
        want = parse_caption(text)
        got = read_image(image).as_dict()
        ok = {a: got[a] == want[a] for a in ATTRIBUTES}
        for a in ATTRIBUTES:
            hits[a] += ok[a]
        hits["colour+position"] += ok["colour"] and ok["position"]
        hits["all"] += all(ok.values())
    n = max(len(images), 1)
    return {name: count / n for name, count in hits.items()}

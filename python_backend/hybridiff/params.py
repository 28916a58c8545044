"""Request validation that names the bad field, by the rules of the wire definition (:mod:`hybridiff.wire`).

Plain Python over numpy arrays, so every rule is unit-tested without a server; the Triton models
turn :class:`InvalidParameter` into an INVALID_ARG error for that one request.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from .schedule import HybridKnobs, Mode
from .validation import InvalidParameter
from .wire import MAX_SEED, FamilyDefaults, Limits, RequestInput, scalar_inputs

__all__ = ["InvalidParameter", "Limits", "parse_image_requests", "parse_prompts"]



@dataclass(frozen=True)
class ImageRequest:
    """One image's parameters, validated (:func:`parse_image_requests`). Plain data: the public front parses
    requests too, without torch."""

    seed: int
    steps: int
    guidance_scale: float
    height: int
    width: int
    mode: Mode
    knobs: HybridKnobs
    device: int = 0  # where single-device steps run
    pair: tuple[int, int] = (0, 1)  # where parallel steps run
    mode_requested: Mode | None = None  # what the client asked for when ``mode`` was chosen for it (auto)


def decode_strings(field: str, array: np.ndarray | None) -> list[str] | None:
    if array is None:
        return None
    values = []
    for item in np.asarray(array, dtype=object).reshape(-1):
        if isinstance(item, bytes):
            try:
                item = item.decode("utf-8")
            except UnicodeDecodeError as err:
                raise InvalidParameter(field, "must be UTF-8 text") from err
        values.append(str(item))
    return values


def parse_prompts(
    prompt: np.ndarray | None, negative: np.ndarray | None, limits: Limits
) -> tuple[list[str], list[str] | None]:
    """Prompts and negative prompts (one negative may serve every prompt)."""
    prompts = decode_strings("PROMPT", prompt)
    if not prompts:
        raise InvalidParameter("PROMPT", f"batch is empty; send 1 to {limits.max_batch} prompts")
    if len(prompts) > limits.max_batch:
        raise InvalidParameter("PROMPT", f"{len(prompts)} prompts; at most {limits.max_batch} per request")
    negatives = decode_strings("NEGATIVE_PROMPT", negative)
    if negatives is not None:
        if len(negatives) == 1:
            negatives = negatives * len(prompts)
        elif len(negatives) != len(prompts):
            raise InvalidParameter(
                "NEGATIVE_PROMPT", f"{len(negatives)} given for {len(prompts)} prompts; send 1 or one per prompt"
            )
    return prompts, negatives


def _scalar(field: str, array: np.ndarray | None, kind: type, default):
    if array is None:
        return default
    values = np.asarray(array).reshape(-1)
    if values.size != 1:
        raise InvalidParameter(field, f"expected one value, got {values.size}")
    value = values[0]
    if kind is str:
        return decode_strings(field, values)[0]
    if kind is int:
        if isinstance(value, (float, np.floating)) and not float(value).is_integer():
            raise InvalidParameter(field, f"must be an integer, got {value}")
        return int(value)
    value = float(value)
    if not math.isfinite(value):
        raise InvalidParameter(field, f"must be finite, got {value}")
    return value


def _check_range(field: str, value: float, low: float, high: float | None = None) -> None:
    if value < low or (high is not None and value > high):
        upper = f"{high}" if high is not None else "inf"
        raise InvalidParameter(field, f"{value} outside the allowed range [{low}, {upper}]")


def parse_input(spec: RequestInput, array: np.ndarray | None, defaults: FamilyDefaults, limits: Limits):
    """One scalar input: its value or default, checked against the wire definition's rules."""
    value = _scalar(spec.name, array, spec.python_type, spec.default_for(defaults))
    if spec.choices:
        if value not in spec.choices:
            raise InvalidParameter(spec.name, f"unknown {spec.field} {value!r}; one of {', '.join(spec.choices)}")
        return value
    if spec.multiple_of and value % getattr(limits, spec.multiple_of):
        raise InvalidParameter(spec.name, f"{value} is not a multiple of {getattr(limits, spec.multiple_of)}")
    low, high = spec.bounds(limits)
    _check_range(spec.name, value, low if low is not None else -math.inf, high)
    return value


def parse_image_requests(
    inputs: Mapping[str, np.ndarray | None],
    defaults: FamilyDefaults,
    limits: Limits,
    batch: int,
    allowed_modes: tuple[Mode, ...] = tuple(Mode),
) -> list[ImageRequest]:
    """Validate every parameter but the prompts (rules from :mod:`hybridiff.wire`); one request per prompt."""
    values = {spec.name: parse_input(spec, inputs.get(spec.name), defaults, limits) for spec in scalar_inputs()}
    _check_range("SEED", values["SEED"], 0, MAX_SEED - batch)
    names = [m.value for m in allowed_modes]
    if values["MODE"] not in names:
        raise InvalidParameter("MODE", f"unknown mode {values['MODE']!r}; one of {', '.join(names)}")
    knobs = HybridKnobs(
        values["SLOPE_WINDOW"], values["EPS_SLOPE"], values["K"], values["TAU_CAP"], values["PIPELINE_WARMUP"]
    )
    return [
        ImageRequest(
            seed=values["SEED"] + i,
            steps=values["STEPS"],
            guidance_scale=values["GUIDANCE_SCALE"],
            height=values["HEIGHT"],
            width=values["WIDTH"],
            mode=Mode(values["MODE"]),
            knobs=knobs,
        )
        for i in range(batch)
    ]

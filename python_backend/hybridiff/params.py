"""Request parameters: names on the wire, defaults, and validation that names the bad field.

Plain Python over numpy arrays, so every rule is unit-tested without a server; the Triton models
turn :class:`InvalidParameter` into an INVALID_ARG error for that one request.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from .families.base import FamilyDefaults
from .loop import ImageRequest
from .schedule import HybridKnobs, Mode

MAX_SEED = 2**63 - 1


class InvalidParameter(ValueError):
    """A request parameter outside its allowed range; the message names the field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclass(frozen=True)
class Limits:
    """Server-side bounds, set per deployment in the orchestrator's config parameters."""

    max_height: int = 1024
    max_width: int = 1024
    min_size: int = 64
    max_steps: int = 200
    max_batch: int = 8
    size_multiple: int = 8  # the VAE's scale factor

    def as_parameters(self) -> dict[str, str]:
        """The deployment's bounds as model config parameters (``size_multiple`` is the model's own)."""
        return {name: str(getattr(self, name)) for name in DEPLOYMENT_LIMITS}

    @classmethod
    def from_parameters(cls, params: Mapping[str, str]) -> Limits:
        """The bounds a model's config parameters carry; a parameter left out keeps its default."""
        return cls(**{name: int(params[name]) for name in DEPLOYMENT_LIMITS if name in params})


# The Limits fields a deployment sets; every internal model receives them in its config parameters.
DEPLOYMENT_LIMITS = ("max_height", "max_width", "min_size", "max_steps", "max_batch")


# Wire name -> (kind, description). Every one but PROMPT is optional.
PARAMETERS: dict[str, tuple[str, str]] = {
    "PROMPT": ("BYTES", "text prompt(s), one image each"),
    "NEGATIVE_PROMPT": ("BYTES", "negative prompt(s); absent = zero embeddings as diffusers does"),
    "SEED": ("INT64", "seed of the first image; image i uses seed + i"),
    "STEPS": ("INT64", "denoising steps"),
    "GUIDANCE_SCALE": ("FP64", "classifier-free guidance scale; <= 1 turns guidance off"),
    "HEIGHT": ("INT64", "image height in pixels"),
    "WIDTH": ("INT64", "image width in pixels"),
    "MODE": ("BYTES", "serial | cfg_parallel | pipeline | hybrid | auto (default: by load)"),
    "SLOPE_WINDOW": ("INT64", "L: rel-MAE values the slope is taken over"),
    "EPS_SLOPE": ("FP64", "slope threshold that marks tau1"),
    "K": ("INT64", "pipeline steps after tau1"),
    "TAU_CAP": ("INT64", "tau1 when no slope qualifies before it"),
    "PIPELINE_WARMUP": ("INT64", "`pipeline` mode: whole-model steps before stale activations"),
}


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


def parse_image_requests(
    inputs: Mapping[str, np.ndarray | None],
    defaults: FamilyDefaults,
    limits: Limits,
    batch: int,
    allowed_modes: tuple[Mode, ...] = tuple(Mode),
) -> list[ImageRequest]:
    """Validate every parameter but the prompts; one :class:`ImageRequest` per prompt."""
    seed = _scalar("SEED", inputs.get("SEED"), int, 0)
    _check_range("SEED", seed, 0, MAX_SEED - batch)
    steps = _scalar("STEPS", inputs.get("STEPS"), int, defaults.steps)
    _check_range("STEPS", steps, 1, limits.max_steps)
    guidance = _scalar("GUIDANCE_SCALE", inputs.get("GUIDANCE_SCALE"), float, defaults.guidance_scale)
    _check_range("GUIDANCE_SCALE", guidance, 0.0, 100.0)
    sizes = {}
    for field, default, maximum in (
        ("HEIGHT", defaults.height, limits.max_height),
        ("WIDTH", defaults.width, limits.max_width),
    ):
        value = _scalar(field, inputs.get(field), int, default)
        if value % limits.size_multiple:
            raise InvalidParameter(field, f"{value} is not a multiple of {limits.size_multiple}")
        _check_range(field, value, limits.min_size, maximum)
        sizes[field] = value
    mode_name = _scalar("MODE", inputs.get("MODE"), str, Mode.AUTO.value)
    names = [m.value for m in allowed_modes]
    if mode_name not in names:
        raise InvalidParameter("MODE", f"unknown mode {mode_name!r}; one of {', '.join(names)}")
    knobs = defaults.knobs
    window = _scalar("SLOPE_WINDOW", inputs.get("SLOPE_WINDOW"), int, knobs.window)
    _check_range("SLOPE_WINDOW", window, 1, 1000)
    eps_slope = _scalar("EPS_SLOPE", inputs.get("EPS_SLOPE"), float, knobs.eps_slope)
    _check_range("EPS_SLOPE", eps_slope, 0.0, 1.0)
    k = _scalar("K", inputs.get("K"), int, knobs.k)
    _check_range("K", k, 0, limits.max_steps)
    tau_cap = _scalar("TAU_CAP", inputs.get("TAU_CAP"), int, knobs.tau_cap)
    _check_range("TAU_CAP", tau_cap, 0, limits.max_steps)
    warmup = _scalar("PIPELINE_WARMUP", inputs.get("PIPELINE_WARMUP"), int, knobs.pipeline_warmup)
    _check_range("PIPELINE_WARMUP", warmup, 1, limits.max_steps)
    hybrid_knobs = HybridKnobs(window, eps_slope, k, tau_cap, warmup)
    return [
        ImageRequest(
            seed=seed + i,
            steps=steps,
            guidance_scale=guidance,
            height=sizes["HEIGHT"],
            width=sizes["WIDTH"],
            mode=Mode(mode_name),
            knobs=hybrid_knobs,
        )
        for i in range(batch)
    ]

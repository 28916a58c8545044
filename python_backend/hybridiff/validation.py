"""What the internal models accept: every tensor held to what a public request could have produced.

The public model (the orchestrator) checks a request's parameters (:mod:`hybridiff.params`) and then
builds every tensor its internal models exchange itself. A client that calls ``<family>_text_encoder``,
``<family>_denoiser_<i>`` or ``<family>_vae`` directly skips that, so each of those models checks
its inputs here against the checkpoint's shapes (:class:`ModelShapes`) and the deployment's
:class:`Limits` (which reach every model through its generated config parameters): no direct call
allocates more than a public request may. A bad input raises :class:`InvalidParameter` naming it
and the allowed range; the Triton glue answers INVALID_ARG.

Plain Python over shapes (tuples of ints) and a few scalar values, torch-free, so every rule is
unit-tested without a server. Triton itself enforces each input's dtype and rank from the generated
config (:mod:`hybridiff.wire`); the checks repeat the rank because they read the dimensions.
:class:`InvalidParameter` lives here so that :mod:`hybridiff.params` (the public request's rules)
and these checks raise the same error.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

from . import wire
from .inflight import REQUEST_KEY
from .schedule import COND, UNCOND
from .wire import FamilyWire, Limits

Shape = tuple[int, ...]


class InvalidParameter(ValueError):
    """An input outside its allowed range; the message names the field (or tensor) and the range."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclass(frozen=True)
class FeatureMap:
    """``[channels, ceil(h / 2**levels), ceil(w / 2**levels)]`` for latents of h x w: a U-Net level
    (each stride-2 convolution rounds an odd side up)."""

    channels: int
    levels: int

    def shape(self, latent_height: int, latent_width: int) -> Shape:
        factor = 2**self.levels
        return (self.channels, -(-latent_height // factor), -(-latent_width // factor))


@dataclass(frozen=True)
class ImageTokens:
    """``[(h / patch) * (w / patch), dim]``: a transformer's image-token stream."""

    patch: int
    dim: int

    def shape(self, latent_height: int, latent_width: int) -> Shape:
        return ((latent_height // self.patch) * (latent_width // self.patch), self.dim)


@dataclass(frozen=True)
class FixedShape:
    """The same shape at every image size (e.g. a text-token stream)."""

    dims: Shape

    def shape(self, latent_height: int, latent_width: int) -> Shape:
        return self.dims


ActivationShape = FeatureMap | ImageTokens | FixedShape


@dataclass(frozen=True)
class ModelShapes:
    """A family's wire tensors (:class:`~hybridiff.wire.FamilyWire`) at the sizes one checkpoint gives them:
    per sample, the batch dimension left out.

    Read from the checkpoint's configs by :meth:`hybridiff.families.base.Family.model_shapes`.
    """

    family: FamilyWire
    latent_channels: int
    vae_scale_factor: int
    size_multiple: int  # image sides in pixels are multiples of this (see LatentMath.size_multiple)
    max_size: int | None  # the largest image side the model can run at, if it has one
    conditioning: Mapping[str, Shape]  # every per-branch denoiser input (the text encoder's outputs among them)
    activations: Mapping[str, ActivationShape]  # stale activations between pipeline stages

    def __post_init__(self) -> None:
        """Every tensor of the family gets a shape, of the rank the wire gives it."""
        family = self.family
        for tensors, shapes in ((family.conditioning, self.conditioning), (family.activations, self.activations)):
            names = [t.name for t in tensors]
            if sorted(names) != sorted(shapes):
                raise ValueError(f"{family.name}: shapes for {sorted(shapes)}, the wire has {names}")
            for tensor in tensors:
                shape = shapes[tensor.name]
                rank = 1 + len(shape if isinstance(shape, tuple) else shape.shape(1, 1))
                if rank != tensor.rank:
                    raise ValueError(f"{family.name}: {tensor.name} has rank {tensor.rank} on the wire, not {rank}")

    @property
    def text_outputs(self) -> dict[str, Shape]:
        """The text encoder's per-branch outputs (sent to the orchestrator as ``uncond_``/``cond_`` + name)."""
        return {t.name: self.conditioning[t.name] for t in self.family.text_outputs}

    @property
    def num_stages(self) -> int:
        return len(self.family.stage_exports)

    def stage_imports(self, stage: int) -> tuple[str, ...]:
        return self.family.stage_imports(stage)


def model_limits(params: Mapping[str, str], shapes: ModelShapes) -> Limits:
    """The deployment's limits from a model's config parameters, narrowed to what the model can run."""
    limits = Limits.from_parameters(params)
    model_max = shapes.max_size if shapes.max_size is not None else max(limits.max_height, limits.max_width)
    return replace(
        limits,
        max_height=min(limits.max_height, model_max),
        max_width=min(limits.max_width, model_max),
        size_multiple=shapes.size_multiple,
    )


# --- single rules ------------------------------------------------------------------------------


def _present(field: str, shape: Shape | None) -> Shape:
    if shape is None:
        raise InvalidParameter(field, "missing; this input is required")
    return tuple(int(d) for d in shape)


def _check_rank(field: str, shape: Shape, layout: Sequence[str]) -> None:
    if len(shape) != len(layout):
        raise InvalidParameter(
            field, f"rank {len(shape)} (shape {list(shape)}); expected rank {len(layout)}: [{', '.join(layout)}]"
        )


def check_batch(field: str, batch: int, max_batch: int) -> None:
    if not 1 <= batch <= max_batch:
        raise InvalidParameter(field, f"batch of {batch}; allowed 1 to {max_batch}")


def check_same_batch(field: str, batch: int, reference_field: str, reference_batch: int) -> None:
    if batch != reference_batch:
        raise InvalidParameter(
            field, f"batch of {batch}, but {reference_field} has {reference_batch}; both need the same batch"
        )


def check_sample_shape(field: str, shape: Shape, expected: Shape) -> None:
    """``shape`` without its batch dimension must equal ``expected``."""
    _check_rank(field, shape, ["batch", *(str(d) for d in expected)])
    if tuple(shape[1:]) != tuple(expected):
        raise InvalidParameter(field, f"shape {list(shape)}; expected [batch, {', '.join(map(str, expected))}]")


def check_latent_side(field: str, axis: str, side: int, maximum: int, shapes: ModelShapes, limits: Limits) -> None:
    """A latent side (``side`` latents = ``side * vae_scale_factor`` pixels) of an image size the public
    request accepts: a multiple of ``limits.size_multiple`` pixels within ``[min_size, maximum]``."""
    scale, multiple = shapes.vae_scale_factor, limits.size_multiple
    low = math.ceil(limits.min_size / multiple) * multiple
    high = maximum // multiple * multiple
    pixels = side * scale
    if pixels % multiple or not low <= pixels <= high:
        raise InvalidParameter(
            field,
            f"{axis} of {side} latents ({pixels} pixels); allowed {low // scale} to {high // scale} latents in "
            f"steps of {multiple // scale} ({low} to {high} pixels, multiples of {multiple})",
        )


def check_latents(
    field: str, shape: Shape | None, shapes: ModelShapes, limits: Limits, max_batch: int
) -> tuple[int, int, int]:
    """``[batch, channels, height, width]`` latents of an image the public request could ask for.

    Returns (batch, height, width) in latents.
    """
    shape = _present(field, shape)
    _check_rank(field, shape, ["batch", "channels", "height", "width"])
    batch, channels, height, width = shape
    check_batch(field, batch, max_batch)
    if channels != shapes.latent_channels:
        raise InvalidParameter(field, f"{channels} channels; the model takes {shapes.latent_channels}")
    check_latent_side(field, "height", height, limits.max_height, shapes, limits)
    check_latent_side(field, "width", width, limits.max_width, shapes, limits)
    return batch, height, width


def _one_value(field: str, values: Sequence[float], batch: int) -> float:
    """Per-row scalars (``[batch, 1]``) that must all be equal: the model reads one per request."""
    if len(values) != batch:
        raise InvalidParameter(field, f"{len(values)} values; expected one per row: shape [{batch}, 1]")
    if any(v != values[0] for v in values):
        raise InvalidParameter(field, f"rows differ ({sorted(set(values))}); every row must carry the same value")
    return values[0]


def check_stage(field: str, values: Sequence[int], batch: int, num_stages: int) -> int | None:
    """A stage index: ``NO_STAGE`` (-1) or 0 to ``num_stages - 1``; returns None for ``NO_STAGE``."""
    value = _one_value(field, values, batch)
    if value != wire.NO_STAGE and not 0 <= value < num_stages:
        raise InvalidParameter(field, f"{value}; allowed {wire.NO_STAGE} (none) or 0 to {num_stages - 1}")
    return None if value == wire.NO_STAGE else int(value)


# --- per model -----------------------------------------------------------------------------------


def check_text_conditioning(inputs: Mapping[str, Shape | None], shapes: ModelShapes, limits: Limits) -> int:
    """The per-branch embeddings the text encoder answered the orchestrator (checked there, so that a wrong
    answer is an error naming the tensor, not a failure deep in the loop): each present, all with one batch
    of 1 to ``max_batch`` prompts (the uncond and cond branches row for row) and the checkpoint's shapes.
    Returns the batch."""
    reference: tuple[str, int] | None = None
    for branch in (UNCOND, COND):
        for name, expected in shapes.text_outputs.items():
            field = wire.branch_name(branch, name)
            shape = _present(field, inputs.get(field))
            check_sample_shape(field, shape, expected)
            check_batch(field, shape[0], limits.max_batch)
            if reference is None:
                reference = (field, shape[0])
            check_same_batch(field, shape[0], *reference)
    assert reference is not None, "a family has text outputs"
    return reference[1]


@dataclass(frozen=True)
class DenoiserCall:
    """What a valid denoiser request asks for (the rest is in its tensors)."""

    batch: int
    stage: int | None
    capture_stage: int | None


def check_denoiser_inputs(
    inputs: Mapping[str, Shape | None],
    timestep: Sequence[float],
    stage: Sequence[int],
    capture_stage: Sequence[int],
    shapes: ModelShapes,
    limits: Limits,
    max_device_batch: int,
) -> DenoiserCall:
    """One denoiser request: the shared latent at an allowed image size, one timestep and stage per
    request, the conditioning and exactly the stale activations its stage reads, shaped for that
    latent. ``inputs`` maps every tensor input to its shape (None when absent); ``timestep``,
    ``stage`` and ``capture_stage`` are those inputs' values (one per row)."""
    sample = wire.SAMPLE.name
    batch, height, width = check_latents(sample, inputs.get(sample), shapes, limits, max_device_batch)
    for field in (wire.TIMESTEP.name, wire.STAGE.name, wire.CAPTURE_STAGE.name):
        shape = _present(field, inputs.get(field))
        check_sample_shape(field, shape, (1,))
        check_same_batch(field, shape[0], sample, batch)
    for value in timestep:
        if not math.isfinite(value):
            raise InvalidParameter(wire.TIMESTEP.name, f"must be finite, got {value}")
    _one_value(wire.TIMESTEP.name, timestep, batch)
    run_stage = check_stage(wire.STAGE.name, stage, batch, shapes.num_stages)
    capture = check_stage(wire.CAPTURE_STAGE.name, capture_stage, batch, shapes.num_stages)
    if run_stage is not None and capture is not None:
        raise InvalidParameter(
            wire.CAPTURE_STAGE.name,
            f"{capture} with {wire.STAGE.name} {run_stage}; a capture runs the whole model: send "
            f"{wire.STAGE.name} {wire.NO_STAGE}",
        )
    for name, expected in shapes.conditioning.items():
        shape = _present(name, inputs.get(name))
        check_sample_shape(name, shape, expected)
        check_same_batch(name, shape[0], sample, batch)
    reads = shapes.stage_imports(run_stage) if run_stage is not None else ()
    for name, rule in shapes.activations.items():
        shape = inputs.get(name)
        if name not in reads:
            if shape is not None:
                which = f"stage {run_stage}" if run_stage is not None else f"a whole-model pass (STAGE {wire.NO_STAGE})"
                raise InvalidParameter(name, f"not read by {which}; leave it out")
            continue
        if shape is None:
            raise InvalidParameter(name, f"missing; stage {run_stage} reads it (the other stage's activations)")
        check_sample_shape(name, shape, rule.shape(height, width))
        check_same_batch(name, shape[0], sample, batch)
    return DenoiserCall(batch, run_stage, capture)


def check_vae_latents(shape: Shape | None, shapes: ModelShapes, limits: Limits) -> int:
    """The VAE's latents: at most ``max_batch`` images (one per prompt) of an allowed size. Returns the batch."""
    batch, _, _ = check_latents(wire.LATENTS.name, shape, shapes, limits, limits.max_batch)
    return batch


def check_request_key(values: Sequence[bytes] | None) -> str | None:
    """The orchestrator's ``REQUEST_KEY`` (from the public front; absent on a direct call): 32 lowercase hex
    digits, since it names a cancel-mark file (:class:`hybridiff.inflight.CancelMark`)."""
    if values is None:
        return None
    key = values[0].decode(errors="replace") if isinstance(values[0], bytes) else str(values[0])
    if len(values) != 1 or not REQUEST_KEY.fullmatch(key):
        raise InvalidParameter(wire.REQUEST_KEY.name, "one key of 32 lowercase hex digits (set by the public front)")
    return key

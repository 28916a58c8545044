"""Every tensor on the wire, defined once.

The public request (inputs with their defaults and limits, outputs), the tensors between the public front,
the orchestrator and the internal models (text encoder, denoisers, VAE) and each family's own tensors
live here. Everything
that names a tensor derives from these tables: the repository generator (``export/make_repository.py``),
the orchestrator's BLS requests and the denoiser's parsing (``triton/``), request validation
(``params.py``), the client's fields (``client/generate.py``) and the README's request table
(``python -m hybridiff.wire --markdown``; a test compares them).

Torch-free on purpose: the client imports it without torch.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from .schedule import COND, UNCOND, HybridKnobs, Mode

MAX_SEED = 2**63 - 1

# Wire types as Triton names them; MODEL is FP16 on GPU deployments and FP32 on CPU (set per deployment).
BYTES, INT32, INT64, FP32, FP64, UINT8, MODEL = "BYTES", "INT32", "INT64", "FP32", "FP64", "UINT8", "MODEL"


@dataclass(frozen=True)
class Limits:
    """Server-side bounds on a request, set per deployment when the repository is generated."""

    max_height: int = 1024
    max_width: int = 1024
    min_size: int = 64
    max_steps: int = 200
    max_batch: int = 8  # prompts per request
    size_multiple: int = 8  # the VAE's scale factor (times the patch size for a DiT)

    def as_parameters(self) -> dict[str, str]:
        """The deployment's bounds as model config parameters (``size_multiple`` is the model's own)."""
        return {name: str(getattr(self, name)) for name in DEPLOYMENT_LIMITS}

    @classmethod
    def from_parameters(cls, params: Mapping[str, str]) -> Limits:
        """The bounds a model's config parameters carry; a parameter left out keeps its default."""
        return cls(**{name: int(params[name]) for name in DEPLOYMENT_LIMITS if name in params})


# The Limits a deployment sets. Every internal model gets them in its config parameters, because each
# holds its inputs to them (hybridiff.validation): a direct call may not ask more than a public request.
DEPLOYMENT_LIMITS = ("max_height", "max_width", "min_size", "max_steps", "max_batch")


@dataclass(frozen=True)
class FamilyDefaults:
    """What a request gets for the inputs it leaves out."""

    steps: int
    guidance_scale: float
    height: int
    width: int
    knobs: HybridKnobs


@dataclass(frozen=True)
class Tensor:
    """A tensor between models: ``shape`` includes the leading (batch) dimension, -1 = any size."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    optional: bool = False

    @property
    def rank(self) -> int:
        return len(self.shape)

    def renamed(self, name: str) -> Tensor:
        return Tensor(name, self.dtype, self.shape, self.optional)


Bound = float | str  # a number, or the name of a :class:`Limits` field


@dataclass(frozen=True)
class RequestInput:
    """One input of the public request: its wire tensor, meaning, default and allowed values.

    ``default`` names a :class:`FamilyDefaults` attribute (dotted for the knobs) or is a literal;
    ``low``/``high`` are numbers or :class:`Limits` field names.
    """

    name: str
    dtype: str
    description: str
    default: object = None  # None: absent means "not given" (see the description)
    low: Bound | None = None
    high: Bound | None = None
    multiple_of: str | None = None  # a Limits field
    choices: tuple[str, ...] = ()
    per_prompt: bool = False  # one value per prompt ([n]) rather than a scalar ([1])
    note: str = ""  # extra words for the README's "Allowed" column
    shown_default: str = ""  # the README's "Default" cell where the value alone says too little

    @property
    def field(self) -> str:
        """The keyword the Python client uses (``--flag`` on its command line)."""
        return self.name.lower()

    @property
    def tensor(self) -> Tensor:
        return Tensor(self.name, self.dtype, (-1,), optional=self.name != "PROMPT")

    @property
    def python_type(self) -> type:
        return {BYTES: str, INT64: int, FP64: float}[self.dtype]

    def default_for(self, defaults: FamilyDefaults) -> object:
        if not isinstance(self.default, str) or self.dtype == BYTES:
            return self.default
        value: object = defaults
        for part in self.default.split("."):
            value = getattr(value, part)
        return value

    def bounds(self, limits: Limits) -> tuple[float | None, float | None]:
        def resolve(bound: Bound | None) -> float | None:
            return getattr(limits, bound) if isinstance(bound, str) else bound

        return resolve(self.low), resolve(self.high)


REQUEST_INPUTS: tuple[RequestInput, ...] = (
    RequestInput("PROMPT", BYTES, "text prompt(s), one image each", low=1, high="max_batch", per_prompt=True,
                 note="SD3: at most the checkpoint's T5 length each (256; built-in model 32)",
                 shown_default="required"),
    RequestInput("NEGATIVE_PROMPT", BYTES, "negative prompt(s)", per_prompt=True,
                 note="1, or one per prompt; SD3: at most the T5 length each",
                 shown_default="absent: zero embeddings, as diffusers does"),
    RequestInput("SEED", INT64, "seed of the first image; image i uses seed + i", default=0, low=0, high=MAX_SEED,
                 note="minus the number of prompts"),
    RequestInput("STEPS", INT64, "denoising steps", default="steps", low=1, high="max_steps"),
    RequestInput("GUIDANCE_SCALE", FP64, "classifier-free guidance scale; <= 1 turns guidance off",
                 default="guidance_scale", low=0.0, high=100.0),
    RequestInput("HEIGHT", INT64, "image height in pixels", default="height", low="min_size", high="max_height",
                 multiple_of="size_multiple"),
    RequestInput("WIDTH", INT64, "image width in pixels", default="width", low="min_size", high="max_width",
                 multiple_of="size_multiple"),
    RequestInput("MODE", BYTES, "how to spread each image over the devices; `auto` chooses by the load",
                 default=Mode.AUTO.value, choices=tuple(m.value for m in Mode)),
    RequestInput("SLOPE_WINDOW", INT64, "L: rel-MAE values the slope is taken over", default="knobs.window",
                 low=1, high=1000),
    RequestInput("EPS_SLOPE", FP64, "a slope in [0, eps_slope) marks tau1", default="knobs.eps_slope",
                 low=0.0, high=1.0),
    RequestInput("K", INT64, "pipeline steps after tau1 (tau2 = tau1 + k)", default="knobs.k", low=0,
                 high="max_steps"),
    RequestInput("TAU_CAP", INT64, "tau1 when no slope qualifies before it", default="knobs.tau_cap", low=0,
                 high="max_steps"),
    RequestInput("PIPELINE_WARMUP", INT64, "`pipeline` mode: whole-model steps before stale activations",
                 default="knobs.pipeline_warmup", low=1, high="max_steps"),
)
REQUEST = {spec.name: spec for spec in REQUEST_INPUTS}
PROMPT_INPUTS = tuple(REQUEST[n] for n in ("PROMPT", "NEGATIVE_PROMPT"))


def scalar_inputs() -> tuple[RequestInput, ...]:
    """The request inputs of one value each; the prompts are the others (the public model counts them and
    passes them on to the text encoder)."""
    return tuple(spec for spec in REQUEST_INPUTS if not spec.per_prompt)


# Public outputs, one row per image.
IMAGE = Tensor("IMAGE", UINT8, (-1, -1, -1, 3))
SCHEDULE = Tensor("SCHEDULE", BYTES, (-1,))
RESPONSE_OUTPUTS = (IMAGE, SCHEDULE)
RESPONSE_DESCRIPTIONS = {
    "IMAGE": "the images, NHWC RGB",
    "SCHEDULE": "one JSON per image: the schedule that ran (mode, tau1/tau2, phases, timings, failovers)",
}

# Public front -> orchestrator: the client's request as it came, plus the key the front marks the request's
# cancel under (hybridiff.inflight.CancelMark: Triton 2.51 does not pass a client's cancel on to a BLS call).
# Optional: a direct call of the orchestrator has no front, and no key.
REQUEST_KEY = Tensor("REQUEST_KEY", BYTES, (1,), optional=True)

# Orchestrator -> VAE.
LATENTS = Tensor("LATENTS", FP32, (-1, -1, -1, -1))

# Orchestrator <-> denoiser of one device. Every input carries the request's guidance branches as its
# first dimension, so Triton's dynamic batcher can queue requests that meet on a device together.
SAMPLE = Tensor("SAMPLE", FP32, (-1, -1, -1, -1))  # latents stay FP32 for the scheduler
TIMESTEP = Tensor("TIMESTEP", FP32, (-1, 1))
STAGE = Tensor("STAGE", INT32, (-1, 1))  # -1: the whole model
CAPTURE_STAGE = Tensor("CAPTURE_STAGE", INT32, (-1, 1))  # -1: none; else also return that stage's exports
EPS = Tensor("EPS", MODEL, (-1, -1, -1, -1))
COMPUTE_SECONDS = Tensor("COMPUTE_SECONDS", FP64, (-1, 1))
BATCHED_REQUESTS = Tensor("BATCHED_REQUESTS", INT32, (-1, 1))
NO_STAGE = -1


@dataclass(frozen=True)
class FamilyWire:
    """A family's own tensors and defaults (the model math is in ``families/``)."""

    name: str
    defaults: FamilyDefaults
    text_outputs: tuple[Tensor, ...]  # per guidance branch, from the text encoder
    extra_conditioning: tuple[Tensor, ...]  # added by the orchestrator (SDXL's time ids)
    activations: tuple[Tensor, ...]  # stale activations between pipeline stages
    stage_exports: tuple[tuple[str, ...], ...]  # the activations each stage hands on

    @property
    def conditioning(self) -> tuple[Tensor, ...]:
        """Per-branch inputs of the denoiser."""
        return self.text_outputs + self.extra_conditioning

    def branch_outputs(self) -> tuple[Tensor, ...]:
        """The text encoder's outputs as named on the wire: ``uncond_<name>`` and ``cond_<name>``."""
        return tuple(t.renamed(branch_name(b, t.name)) for b in (UNCOND, COND) for t in self.text_outputs)

    def stage_imports(self, stage: int) -> tuple[str, ...]:
        """The stale activations stage ``stage`` reads (the other stages' exports)."""
        return tuple(n for s, names in enumerate(self.stage_exports) if s != stage for n in names)

    def denoiser_inputs(self) -> tuple[Tensor, ...]:
        optional = tuple(Tensor(t.name, t.dtype, t.shape, optional=True) for t in self.activations)
        return (SAMPLE, TIMESTEP, STAGE, CAPTURE_STAGE, *self.conditioning, *optional)

    def denoiser_outputs(self) -> tuple[Tensor, ...]:
        return (EPS, *self.activations, COMPUTE_SECONDS, BATCHED_REQUESTS)


def branch_name(branch: str, name: str) -> str:
    return f"{branch}_{name}"


SDXL = FamilyWire(
    name="sdxl",
    defaults=FamilyDefaults(50, 5.0, 512, 512, HybridKnobs(window=12, eps_slope=0.4e-3, k=5, tau_cap=15)),
    text_outputs=(Tensor("PROMPT_EMBEDS", MODEL, (-1, -1, -1)), Tensor("TEXT_EMBEDS", MODEL, (-1, -1))),
    extra_conditioning=(Tensor("TIME_IDS", MODEL, (-1, -1)),),
    activations=(Tensor("MIDDLE_ACT", MODEL, (-1, -1, -1, -1)), Tensor("HEAD_ACT", MODEL, (-1, -1, -1, -1))),
    stage_exports=(("MIDDLE_ACT",), ("HEAD_ACT",)),
)
SD3 = FamilyWire(
    name="sd3",
    defaults=FamilyDefaults(50, 7.0, 512, 512, HybridKnobs(window=15, eps_slope=0.5e-3, k=5, tau_cap=40)),
    text_outputs=(Tensor("PROMPT_EMBEDS", MODEL, (-1, -1, -1)), Tensor("POOLED_EMBEDS", MODEL, (-1, -1))),
    extra_conditioning=(),
    # Block n/2-1's image-token and text-token streams; stage 1 hands nothing back.
    activations=(Tensor("MIDDLE_HIDDEN", MODEL, (-1, -1, -1)), Tensor("MIDDLE_ENCODER", MODEL, (-1, -1, -1))),
    stage_exports=(("MIDDLE_HIDDEN", "MIDDLE_ENCODER"), ()),
)
FAMILIES = {f.name: f for f in (SDXL, SD3)}


# --- The README's request table ----------------------------------------------------------------------


def _number(value: object) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if value == MAX_SEED:
        return "2^63-1"
    return str(value)


def _bound(bound: Bound | None, limits: Limits) -> str:
    if isinstance(bound, str):
        return f"`{bound}` ({getattr(limits, bound)})"
    return _number(bound)


def _default_cell(spec: RequestInput) -> str:
    if spec.shown_default:
        return spec.shown_default
    values = {f.name.upper(): spec.default_for(f.defaults) for f in FAMILIES.values()}
    if len(set(values.values())) == 1:
        value = next(iter(values.values()))
        return f"`{value}`" if isinstance(value, str) else _number(value)
    return ", ".join(f"{_number(v)} ({name})" for name, v in values.items())


def _allowed_cell(spec: RequestInput, limits: Limits) -> str:
    if spec.choices:
        return ", ".join(f"`{c}`" for c in spec.choices)
    parts = []
    if spec.low is not None or spec.high is not None:
        low = _bound(spec.low, limits) if spec.low is not None else "-inf"
        high = _bound(spec.high, limits) if spec.high is not None else "inf"
        parts.append(f"{low} to {high}")
    if spec.multiple_of:
        parts.append(f"multiple of {getattr(limits, spec.multiple_of)} (SD3: 16)")
    if spec.note:
        parts.append(spec.note)
    return "; ".join(parts) if parts else "-"


def _rows() -> Iterator[str]:
    limits = Limits()
    for spec in REQUEST_INPUTS:
        shape = "[1]" if not spec.per_prompt else ("[n]" if spec.name == "PROMPT" else "[1 or n]")
        yield (
            f"| `{spec.name}` | {spec.dtype} {shape} | {_default_cell(spec)} | {_allowed_cell(spec, limits)} "
            f"| {spec.description} |"
        )
    for tensor in RESPONSE_OUTPUTS:
        shape = ", ".join("n" if i == 0 else ("3" if d == 3 else "?") for i, d in enumerate(tensor.shape))
        yield f"| `{tensor.name}` (output) | {tensor.dtype} [{shape}] | | | {RESPONSE_DESCRIPTIONS[tensor.name]} |"


def markdown_table() -> str:
    """The request/response table the README shows (between its ``wire-table`` markers)."""
    head = ["| Input | Type | Default | Allowed | Meaning |", "|---|---|---|---|---|"]
    return "\n".join(head + list(_rows()))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Print the wire definition as the README's Markdown table.")
    parser.add_argument("--markdown", action="store_true", help="the request/response table (default)")
    parser.parse_args(argv)
    print(markdown_table())


if __name__ == "__main__":
    main()

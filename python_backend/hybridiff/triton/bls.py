"""What the models that call each other through BLS share, torch-free (the public front imports it).

* **Error codes.** Triton 2.51 hands a BLS caller every error of the model it called as INTERNAL,
  whatever code that model answered (measured on the bundled server: INVALID_ARG, UNAVAILABLE,
  CANCELLED, NOT_FOUND all arrived as INTERNAL). So the internal models write their code at the
  start of the message (:func:`error_response`: ``"[INVALID_ARG] STEPS: ..."``) and the caller reads
  it back (:func:`bls_exec`, :func:`decode_error`); only the public front answers the client without
  it (:func:`public_error_response`). An error without that mark is Triton's own (a dead stub, a
  model not loaded, a full queue).
* **A callee that is gone** (its stub died, or it is unloaded or loading while the supervisor brings
  it back) as opposed to an error of the request: :func:`device_gone`.
* **A request's cancellation and deadline**, checked between the steps of a run: :func:`check_request`.
* **The config parameters**, which name the models a model calls: :func:`config_parameters`.

``triton_python_backend_utils`` exists only inside the stub, so it is imported there, never here at
module level (the tests import this module directly).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from pathlib import Path

from .. import wire
from ..admission import TRITON_QUEUE_FULL
from ..params import ImageRequest, parse_image_requests, parse_prompts
from ..wire import FamilyDefaults, Limits

CODES = ("UNKNOWN", "INTERNAL", "NOT_FOUND", "INVALID_ARG", "UNAVAILABLE", "UNSUPPORTED", "ALREADY_EXISTS", "CANCELLED")
_CODED = re.compile(r"\[(" + "|".join(CODES) + r")\] ")
# Triton's own errors that BLS hands on as INTERNAL although the server answers them UNAVAILABLE.
_TRITON_UNAVAILABLE = (TRITON_QUEUE_FULL, "Request timeout expired")

# What Triton answers when a model's process is gone or its model is (re)loading, as opposed to
# an error in the request: "Stub process '<model>_0_0' is not healthy.", "Request for unknown
# model: '<model>' is not found", "... has no available versions", "Model '<model>' is not ready".
_GONE_CODES = ("UNAVAILABLE", "NOT_FOUND")
_REQUEST_CODES = ("INVALID_ARG", "UNSUPPORTED", "ALREADY_EXISTS")
_GONE_MESSAGES = ("not healthy", "unknown model", "not found", "no available versions", "ready state",
                  "not ready", "unavailable", "stub process")


def _pb():
    import triton_python_backend_utils as pb_utils

    return pb_utils


def config_parameters(model_config: dict) -> dict[str, str]:
    """A model's generated config parameters (among them the models it calls: ``orchestrator``, ``text_encoder``,
    ``denoisers``, ``vae``)."""
    return {k: v["string_value"] for k, v in model_config.get("parameters", {}).items()}


def resolve_checkpoint(value: str, model_dir: str) -> Path:
    """Checkpoint paths in configs may be relative to the model repository (so both can move).

    Triton's ``args["model_repository"]`` is the model's own folder inside the repository.
    """
    path = Path(value)
    if not path.is_absolute():
        path = (Path(model_dir).parent / path).resolve()
    if not (path / "model_index.json").exists():
        raise FileNotFoundError(f"no diffusers checkpoint (model_index.json) at {path}")
    return path


def input_array(request, name: str):
    """An input as numpy (strings and small scalars), or None when the client left it out."""
    import triton_python_backend_utils as pb_utils

    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy()


def image_requests_of(request, defaults: FamilyDefaults, limits: Limits) -> list[ImageRequest]:
    """A public request's images, validated by the request rules (:mod:`hybridiff.params`); raises
    InvalidParameter naming the field. The front prices them, the orchestrator runs them."""
    prompts, _ = parse_prompts(*(input_array(request, spec.name) for spec in wire.PROMPT_INPUTS), limits)
    scalars = {spec.name: input_array(request, spec.name) for spec in wire.scalar_inputs()}
    return parse_image_requests(scalars, defaults, limits, len(prompts))


def encode_error(message: str, code: str) -> str:
    """``message`` marked with its code, for a BLS caller (which would otherwise see INTERNAL)."""
    return f"[{code}] {message}"


def decode_error(code: str, message: str) -> tuple[str, str, bool]:
    """``(code, message, ours)`` of an error a BLS call answered: the code an internal model marked the
    message with (mark removed; ``ours`` True), else Triton's own error with the code BLS lost restored
    where it is known (a full queue, an expired queue timeout: UNAVAILABLE)."""
    marked = _CODED.match(message)
    if marked:
        return marked.group(1), message[marked.end():], True
    if any(fragment in message for fragment in _TRITON_UNAVAILABLE):
        return "UNAVAILABLE", message, False
    return code, message, False


def device_gone(code: str, message: str) -> bool:
    """Whether an internal model's error means it is gone (fail over, or wait) rather than a bad request."""
    if code in _REQUEST_CODES:
        return False
    lowered = message.lower()
    return code in _GONE_CODES or any(pattern in lowered for pattern in _GONE_MESSAGES)


def model_gone(model: str, code: str, message: str, ours: bool) -> bool:
    """Whether a call of ``model`` failed because ``model`` itself is gone: Triton's own error (not one the
    model answered, which may quote another model's outage) that names it (``'<model>'`` or its stub
    ``'<model>_<instance>'``) and means gone (:func:`device_gone`)."""
    return not ours and f"'{model}" in message and device_gone(code, message)


def code_name(pb, code: int) -> str:
    """The ``pb_utils.TritonError`` name of an error code."""
    return next((n for n in CODES if getattr(pb.TritonError, n, None) == code), "UNKNOWN")


async def bls_exec(pb, request) -> tuple[object | None, str, str, bool]:
    """Run one BLS request: ``(reply, "", "", False)``, or ``(None, code name, message, ours)`` when it
    failed, whether the call itself raised (e.g. the model is gone) or the model answered an error;
    ``ours``: the model answered it with its code (:func:`decode_error`)."""
    try:
        reply = await request.async_exec()
    except pb.TritonModelException as err:
        return (None, *decode_error("INTERNAL", str(err)))
    if reply.has_error():
        return (None, *decode_error(code_name(pb, reply.error().code()), reply.error().message()))
    return reply, "", "", False


def error_response(message: str, code: str = "INVALID_ARG"):
    """An internal model's error answer, its code marked in the message for the BLS caller: INVALID_ARG for a
    bad request, UNAVAILABLE for a retryable refusal (server full, device gone, deadline), CANCELLED, INTERNAL."""
    return public_error_response(encode_error(message, code), code)


def public_error_response(message: str, code: str):
    """An error answer to the client (the public front's): HTTP 400 for INVALID_ARG, 503 for UNAVAILABLE."""
    pb = _pb()
    return pb.InferenceResponse(error=pb.TritonError(message, getattr(pb.TritonError, code)))


class RunStopped(RuntimeError):
    """The run stopped between steps: cancelled by the client, or past its deadline."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code  # a pb_utils.TritonError code name


def check_request(cancelled: Callable[[], bool], deadline: float | None, before: str) -> None:
    """Raise :class:`RunStopped` if the request was cancelled or its ``deadline`` (``time.monotonic``;
    None: not checked) passed; ``before`` names what would have run next."""
    if cancelled():
        raise RunStopped("CANCELLED", f"request cancelled by the client; stopped before {before}")
    if deadline is not None and time.monotonic() > deadline:
        raise RunStopped(
            "UNAVAILABLE",
            f"deadline exceeded: the request's timeout passed before {before} (Request timeout expired); "
            "retry with a longer timeout or fewer steps",
        )

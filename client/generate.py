"""Send a prompt to the server over HTTP or gRPC, write the PNG, print the schedule and latency.

    python -m client.generate --prompt "a red fox" --mode hybrid --protocol grpc --out fox.png

``--timeout`` bounds the whole run on the server (Triton's ``timeout`` request parameter) and the
wait here. Over gRPC, Ctrl-C cancels the request on the server, which stops within one step.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hybridiff import wire  # torch-free: the one definition of the request

DEFAULT_URLS = {"http": "localhost:8000", "grpc": "localhost:8001"}
NUMPY_TYPES = {wire.BYTES: np.object_, wire.INT64: np.int64, wire.FP64: np.float64}


def request_fields() -> dict[str, wire.RequestInput]:
    """Keyword -> request input, for every input but the prompts (``generate``'s positional argument)."""
    return {spec.field: spec for spec in wire.REQUEST_INPUTS if spec.name != "PROMPT"}


@dataclass
class Generation:
    images: np.ndarray  # [N, H, W, 3] uint8
    schedules: list[dict]
    latency_s: float


def _module(protocol: str):
    if protocol == "http":
        import tritonclient.http as module
    elif protocol == "grpc":
        import tritonclient.grpc as module
    else:
        raise ValueError(f"protocol must be http or grpc, got {protocol!r}")
    return module


def build_inputs(protocol: str, prompts: list[str], **fields) -> list:
    """Triton inputs for a request; fields left as None are not sent (the server's defaults apply)."""
    module = _module(protocol)
    known = request_fields()
    arrays = {("PROMPT", wire.BYTES): np.array([p.encode() for p in prompts], dtype=np.object_)}
    for field, value in fields.items():
        if value is None:
            continue
        if field not in known:
            raise TypeError(f"unknown request field {field!r}; known: {', '.join(known)}")
        spec = known[field]
        values = value if isinstance(value, list) and spec.per_prompt else [value]
        encoded = [v.encode() if isinstance(v, str) else v for v in values]
        arrays[(spec.name, spec.dtype)] = np.array(encoded, dtype=NUMPY_TYPES[spec.dtype])
    inputs = []
    for (name, triton_type), array in arrays.items():
        tensor = module.InferInput(name, list(array.shape), triton_type)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


def make_client(protocol: str, url: str | None = None, **kwargs):
    return _module(protocol).InferenceServerClient(url or DEFAULT_URLS[protocol], **kwargs)


def _requested_outputs(module) -> list:
    return [module.InferRequestedOutput("IMAGE"), module.InferRequestedOutput("SCHEDULE")]


def _generation(result, started: float) -> Generation:
    latency = time.perf_counter() - started
    schedules = [json.loads(s) for s in result.as_numpy("SCHEDULE").reshape(-1)]
    return Generation(result.as_numpy("IMAGE"), schedules, latency)


class PendingGeneration:
    """A gRPC request in flight: :meth:`result` waits for it, :meth:`cancel` cancels it on the server."""

    def __init__(self, client, model: str, inputs: list, timeout_s: float | None) -> None:
        import tritonclient.grpc as module

        self._done = threading.Event()
        self._result = self._error = None
        # The client waits a little longer than the server may run, to receive its deadline error.
        kwargs = {} if timeout_s is None else {"timeout": int(timeout_s * 1e6), "client_timeout": timeout_s + 5.0}
        self._started = time.perf_counter()
        self._call = client.async_infer(model, inputs, self._finish, outputs=_requested_outputs(module), **kwargs)

    def _finish(self, result, error) -> None:
        self._result, self._error = result, error
        self._done.set()

    def done(self, wait_s: float = 0.0) -> bool:
        return self._done.wait(wait_s)

    def cancel(self) -> None:
        self._call.cancel()

    def result(self, wait_s: float | None = None) -> Generation:
        """The images; raises InferenceServerException on a server error (CANCELLED after a cancel)."""
        if not self._done.wait(wait_s):
            raise TimeoutError(f"no answer within {wait_s} s")
        if self._error is not None:
            raise self._error
        return _generation(self._result, self._started)


def start_generate(client, model: str, prompts: list[str], timeout_s: float | None = None, **fields):
    """Send one request over gRPC without waiting (``client`` is a tritonclient.grpc client)."""
    return PendingGeneration(client, model, build_inputs("grpc", prompts, **fields), timeout_s)


def generate(client, protocol: str, model: str, prompts: list[str], timeout_s: float | None = None, **fields):
    """One request; raises tritonclient's InferenceServerException on a server-side error.

    ``timeout_s`` bounds the run on the server as well as the wait here. Over gRPC an interrupt
    (Ctrl-C) while waiting cancels the request on the server before it propagates.
    """
    if protocol == "grpc":
        pending = start_generate(client, model, prompts, timeout_s, **fields)
        try:
            while not pending._done.wait(0.1):
                pass
        except KeyboardInterrupt:
            pending.cancel()
            raise
        return pending.result()
    module = _module(protocol)
    kwargs = {} if timeout_s is None else {"timeout": int(timeout_s * 1e6)}
    started = time.perf_counter()
    inputs = build_inputs(protocol, prompts, **fields)
    result = client.infer(model, inputs, outputs=_requested_outputs(module), **kwargs)
    return _generation(result, started)


# What Triton 2.51 answers while a model is down and being brought back (measured, docs/operations.md):
# the request held by a killed stub gets INTERNAL "Stub process '<instance>' is not healthy."; while the
# supervisor has the model unloaded, requests get "Model '<name>' is not ready" (INTERNAL) or "Request for
# unknown model: '<family>' has no available versions" (NOT_FOUND / 404). The public model itself waits
# for a text encoder or VAE being brought back, so a client meets these when a public-model process died.
# Nothing on the server can turn the first into UNAVAILABLE: the process that held the request is gone.
# All of these pass once the model is back, so they are retried.
RETRYABLE_MESSAGES = ("is not healthy", "is not ready", "has no available versions")
RETRYABLE_STATUSES = ("StatusCode.UNAVAILABLE", "503")
# The run's own deadline passed (answered UNAVAILABLE, as Triton's queue timeouts are): the same request
# with the same timeout would only run out again.
NOT_RETRYABLE_MESSAGE = "deadline exceeded"


def is_retryable(error: BaseException) -> bool:
    """True for a failure that a later try may not meet: a model down or being reloaded, a busy server."""
    message = getattr(error, "message", None)
    text = (message() if callable(message) else str(error)) or ""
    if NOT_RETRYABLE_MESSAGE in text:
        return False
    status = getattr(error, "status", None)
    status = status() if callable(status) else None
    if status in RETRYABLE_STATUSES:
        return True
    return any(fragment in text for fragment in RETRYABLE_MESSAGES)


def backoff_delays(retries: int, base_s: float = 1.0, cap_s: float = 16.0) -> list[float]:
    """Seconds to wait before each retry: doubling from ``base_s``, at most ``cap_s`` each.

    The defaults (4 retries: 1 + 2 + 4 + 8 = 15 s, plus the tries) outlast the reload of a small model.
    """
    if retries < 0:
        raise ValueError(f"retries must be >= 0, got {retries}")
    return [min(cap_s, base_s * 2**i) for i in range(retries)]


def generate_with_retry(
    client,
    protocol: str,
    model: str,
    prompts: list[str],
    *,
    retries: int = 4,
    backoff_s: float = 1.0,
    sleep=time.sleep,
    on_retry=None,
    **kwargs,
) -> Generation:
    """``generate``, retried after a retryable failure (``is_retryable``) with a bounded back-off.

    Any other error, or the last retryable one, is raised. ``on_retry(attempt, error, delay)`` is
    called before each wait, e.g. to print it.
    """
    for attempt, delay in enumerate([*backoff_delays(retries, backoff_s), None], start=1):
        try:
            return generate(client, protocol, model, prompts, **kwargs)
        except Exception as err:
            if delay is None or not is_retryable(err):
                raise
            if on_retry is not None:
                on_retry(attempt, err, delay)
            sleep(delay)
    raise AssertionError("unreachable")


def save_png(image: np.ndarray, path: Path) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)


def _summary(schedule: dict) -> str:
    parts = [f"mode {schedule['mode_run']}"]
    if schedule["mode_run"] != schedule["mode_requested"]:
        parts[0] += f" (asked {schedule['mode_requested']})"
    parts.append(f"tau1={schedule['tau1']} tau2={schedule['tau2']} ({schedule['tau_source']})")
    parts.append("steps " + ", ".join(f"{k} {v}" for k, v in schedule["phase_steps"].items()))
    parts.append("time " + ", ".join(f"{k} {v:.3f}s" for k, v in schedule["phase_seconds"].items()))
    parts.append(f"overhead {schedule['overhead_seconds']:.3f}s (load checks {schedule['placement_seconds']:.4f}s)")
    for failover in schedule.get("failover", []):
        parts.append(f"device {failover['device']} failed at step {failover['step']}, "
                     f"went on on device {failover['continued_on']}")
    return "; ".join(parts)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Generate an image with the Hybridiff Triton server.")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--family", default="sdxl", help="the public model (family) to call: sdxl or sd3")
    parser.add_argument("--protocol", choices=["http", "grpc"], default="http")
    parser.add_argument("--url", help="host:port (default localhost:8000 for http, :8001 for grpc)")
    parser.add_argument("--out", type=Path, default=Path("out/image.png"))
    parser.add_argument("--show-curve", action="store_true", help="also print the rel-MAE curve")
    parser.add_argument("--timeout", type=float, default=None, help="seconds the whole run may take on the server")
    parser.add_argument("--retries", type=int, default=4,
                        help="retries after a retryable failure (a model being brought back), with back-off")
    for field, spec in request_fields().items():
        parser.add_argument(f"--{field.replace('_', '-')}", type=spec.python_type, default=None, help=spec.description)
    args = parser.parse_args(argv)
    fields = {field: getattr(args, field) for field in request_fields()}
    client = make_client(args.protocol, args.url)
    try:
        result = generate_with_retry(
            client, args.protocol, args.family, [args.prompt], retries=args.retries, timeout_s=args.timeout,
            on_retry=lambda n, err, delay: print(f"try {n} failed ({err}); retrying in {delay:.0f} s"), **fields,
        )
    except KeyboardInterrupt:
        cancelled = ": request cancelled on the server" if args.protocol == "grpc" else ""
        raise SystemExit(f"interrupted{cancelled}") from None
    finally:
        client.close()
    for i, (image, schedule) in enumerate(zip(result.images, result.schedules, strict=True)):
        path = args.out if len(result.images) == 1 else args.out.with_stem(f"{args.out.stem}-{i}")
        save_png(image, path)
        print(f"wrote {path} ({image.shape[1]}x{image.shape[0]}, seed {schedule['seed']})")
        print(_summary(schedule))
        if args.show_curve:
            print("rel_mae: " + " ".join("-" if m is None else f"{m:.4f}" for m in schedule["rel_mae"]))
    print(f"latency {result.latency_s:.3f} s over {args.protocol}")


if __name__ == "__main__":
    main()

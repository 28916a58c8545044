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

DEFAULT_URLS = {"http": "localhost:8000", "grpc": "localhost:8001"}

# Request field -> (wire name, numpy dtype). Matches hybridiff.params.PARAMETERS.
FIELDS = {
    "negative_prompt": ("NEGATIVE_PROMPT", np.object_),
    "seed": ("SEED", np.int64),
    "steps": ("STEPS", np.int64),
    "guidance_scale": ("GUIDANCE_SCALE", np.float64),
    "height": ("HEIGHT", np.int64),
    "width": ("WIDTH", np.int64),
    "mode": ("MODE", np.object_),
    "slope_window": ("SLOPE_WINDOW", np.int64),
    "eps_slope": ("EPS_SLOPE", np.float64),
    "k": ("K", np.int64),
    "tau_cap": ("TAU_CAP", np.int64),
    "pipeline_warmup": ("PIPELINE_WARMUP", np.int64),
}


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
    arrays = {"PROMPT": np.array([p.encode() for p in prompts], dtype=np.object_)}
    for field, value in fields.items():
        if value is None:
            continue
        if field not in FIELDS:
            raise TypeError(f"unknown request field {field!r}")
        name, dtype = FIELDS[field]
        arrays[name] = np.array([value.encode() if isinstance(value, str) else value], dtype=dtype)
    inputs = []
    for name, array in arrays.items():
        triton_type = "BYTES" if array.dtype == np.object_ else {
            np.dtype(np.int64): "INT64",
            np.dtype(np.float64): "FP64",
        }[array.dtype]
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
    for field, (_, dtype) in FIELDS.items():
        kind = {np.object_: str, np.int64: int, np.float64: float}[dtype]
        parser.add_argument(f"--{field.replace('_', '-')}", type=kind, default=None)
    args = parser.parse_args(argv)
    fields = {field: getattr(args, field) for field in FIELDS}
    client = make_client(args.protocol, args.url)
    try:
        result = generate(client, args.protocol, args.family, [args.prompt], timeout_s=args.timeout, **fields)
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

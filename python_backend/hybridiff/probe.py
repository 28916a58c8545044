"""Health probe: can this server still make an image with every part of every family?

    python -m hybridiff.probe --url 127.0.0.1:8000 [--family sdxl --family sd3] [--timeout 60]

Readiness (:mod:`hybridiff.readiness`, the cheap check) says a model is down once the supervisor
has unloaded it to bring it back; a request finds what readiness cannot see (a device that fails a
pass, a family that cannot make an image). So the probe runs the readiness check on every model of
each family, then sends one tiny request per family (1 step, the smallest size, ``cfg_parallel`` so the
text encoder, both denoisers of the pair and the VAE all run) and reads the
response's schedule. It exits 0 when everything answered, 1 with one line per failure otherwise, so
Kubernetes (an ``exec`` probe) or a person can use it as is. Plain ``urllib``: no client library,
no torch import, quick to start in a busy pod.

Families default to those of ``HYBRIDIFF_MODELS`` (``family=folder,...``, the container's setting, so
the probe needs no admin endpoint in a pod), else to those the server's statistics list (every model
``X`` with an ``X_text_encoder``); the models of a family are read from the configs (the public front's
``orchestrator`` parameter, the orchestrator's ``text_encoder``, ``denoisers`` and ``vae``), so the probe
checks what the server was configured with.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from .admission import FULL, TRITON_QUEUE_FULL
from .readiness import http_ready, not_ready

# Limits.min_size, a multiple of every family's size step (8 for SDXL, 16 for SD3); a test keeps it so.
PROBE_SIDE = 64
PROBE_MODE = "cfg_parallel"
PROBE_PROMPT = "probe"


class ProbeError(RuntimeError):
    """One part of the server failed; the message says which and how."""


class ServerFull(ProbeError):
    """The server refused the probe's request for load (503 "server full" or Triton's full queue)."""


# How a refusal for load reads: the orchestrator's admission, and Triton's bounded queue.
FULL_TEXTS = (FULL, TRITON_QUEUE_FULL)


def probe_request() -> dict[str, Any]:
    """KServe v2 JSON body of the probe's request: only the schedule comes back (the image is small anyway)."""

    def tensor(name: str, datatype: str, value: Any) -> dict[str, Any]:
        return {"name": name, "shape": [1], "datatype": datatype, "data": [value]}

    return {
        "inputs": [
            tensor("PROMPT", "BYTES", PROBE_PROMPT),
            tensor("SEED", "INT64", 0),
            tensor("STEPS", "INT64", 1),
            tensor("HEIGHT", "INT64", PROBE_SIDE),
            tensor("WIDTH", "INT64", PROBE_SIDE),
            tensor("MODE", "BYTES", PROBE_MODE),
        ],
        "outputs": [{"name": "SCHEDULE"}],
    }


def schedule_problems(family: str, schedule: dict[str, Any]) -> list[str]:
    """What is wrong with the probe request's schedule (empty when nothing is)."""
    problems = []
    if schedule.get("mode_run") != PROBE_MODE:
        problems.append(f"{family}: ran {schedule.get('mode_run')!r} instead of {PROBE_MODE!r}")
    failover = schedule.get("failover") or []
    if failover:
        problems.append(f"{family}: the request failed over between devices: {json.dumps(failover)}")
    resubmitted = schedule.get("resubmitted") or []
    if resubmitted:
        problems.append(f"{family}: the request was sent again, its orchestrator gone: {json.dumps(resubmitted)}")
    return problems


# The config parameters that name the models a model calls (export/make_repository.py): the public front names
# the orchestrator, the orchestrator the text encoder, the denoisers and the VAE.
CALLED_MODELS = ("orchestrator", "text_encoder", "denoisers", "vae")


def family_models(family: str, config: Callable[[str], dict[str, Any]]) -> list[str]:
    """The public model and every model it calls, directly or through the models it calls, from their configs'
    parameters, in the order met."""
    models = [family]
    for model in models:  # grows while it is walked: each new model's config is read in turn
        parameters = config(model).get("parameters", {})
        for key in CALLED_MODELS:
            called = parameters.get(key, {}).get("string_value", "").split(",")
            models += [m for m in called if m and m not in models]
    return models


class Probe:
    """HTTP calls against one server, each bounded by ``timeout`` seconds."""

    def __init__(self, url: str, timeout: float) -> None:
        self.base = url if url.startswith(("http://", "https://")) else f"http://{url}"
        self.timeout = timeout

    def _call(self, path: str, body: dict[str, Any] | None = None) -> tuple[int, bytes]:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.base + path, data=data, method="GET" if data is None else "POST")
        if data is not None:
            request.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as err:
            return err.code, err.read()
        except (urllib.error.URLError, OSError) as err:  # refused, reset, timed out
            raise ProbeError(f"{path}: no answer from {self.base}: {getattr(err, 'reason', err)}") from None

    def _json(self, path: str, body: dict[str, Any] | None = None) -> Any:
        status, payload = self._call(path, body)
        if status == 503 and any(text in _error_text(payload) for text in FULL_TEXTS):
            raise ServerFull(f"{path}: refused for load: {_error_text(payload)}")
        if status != 200:
            raise ProbeError(f"{path}: HTTP {status}: {_error_text(payload)}")
        return json.loads(payload)

    def ready(self, path: str) -> None:
        status, payload = self._call(path)
        if status != 200:
            raise ProbeError(f"{path}: not ready (HTTP {status}) {_error_text(payload)}".rstrip())

    def families(self) -> list[str]:
        """Every model ``X`` with an ``X_text_encoder``, from the statistics API: open to anyone, unlike the
        repository index, which sits behind the admin key."""
        names = {entry["name"] for entry in self._json("/v2/models/stats").get("model_stats", [])}
        return sorted(name for name in names if f"{name}_text_encoder" in names)

    def config(self, model: str) -> dict[str, Any]:
        return self._json(f"/v2/models/{model}/config")

    def generate(self, family: str) -> dict[str, Any]:
        response = self._json(f"/v2/models/{family}/infer", probe_request())
        outputs = {out["name"]: out for out in response.get("outputs", [])}
        if "SCHEDULE" not in outputs or not outputs["SCHEDULE"].get("data"):
            raise ProbeError(f"{family}: the response has no SCHEDULE")
        return json.loads(outputs["SCHEDULE"]["data"][0])


def _error_text(payload: bytes) -> str:
    try:
        return str(json.loads(payload).get("error", ""))
    except (ValueError, AttributeError):
        return payload.decode(errors="replace")[:200]


def configured_families(env: Mapping[str, str] = os.environ) -> list[str]:
    """The families named in ``HYBRIDIFF_MODELS`` (``family=folder,...``), in order; empty when unset."""
    items = [item.strip() for item in env.get("HYBRIDIFF_MODELS", "").split(",") if item.strip()]
    return [item.split("=", 1)[0].strip() for item in items]


def run_probe(url: str, families: Sequence[str] = (), timeout: float = 60.0,
              busy: list[str] | None = None) -> list[str]:
    """Every problem found, one line each (empty: the server can serve every family).

    A family whose public model refuses the probe's request because the server is full (its admission,
    or Triton's bounded queue) is busy, not broken: it goes to ``busy``, not to the problems, so that an
    overloaded pod is neither restarted by its liveness probe nor taken out of its Service."""
    probe = Probe(url, timeout)
    try:
        probe.ready("/v2/health/live")
        probe.ready("/v2/health/ready")
        families = list(families) or configured_families() or probe.families()
    except ProbeError as err:
        return [str(err)]
    if not families:
        return ["no family found in the repository index (pass --family)"]
    problems = []
    ready = http_ready(url.split("://", 1)[-1])
    for family in families:
        try:
            down = not_ready(family_models(family, probe.config), ready)
            if down:
                raise ProbeError(f"{family}: not ready: {', '.join(down)}")
            problems += schedule_problems(family, probe.generate(family))
        except ServerFull as err:
            if busy is not None:
                busy.append(f"{family}: {err}")
        except ProbeError as err:
            problems.append(f"{family}: {err}" if not str(err).startswith(family) else str(err))
    return problems


def build_parser() -> argparse.ArgumentParser:
    """The command line (the Kubernetes manifests' probe commands are checked against it)."""
    parser = argparse.ArgumentParser(prog="python -m hybridiff.probe", description=__doc__.split("\n")[0])
    parser.add_argument("--url", default="127.0.0.1:8000", help="the server's HTTP host:port (default %(default)s)")
    parser.add_argument("--family", action="append", default=[], help="a family to check (default: all served)")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per HTTP call (default %(default)s)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    start = time.monotonic()
    busy: list[str] = []
    problems = run_probe(args.url, args.family, args.timeout, busy)
    elapsed = time.monotonic() - start
    if problems:
        for line in problems:
            print(f"probe FAILED: {line}", file=sys.stderr)
        return 1
    for line in busy:
        print(f"probe busy: {line}", file=sys.stderr)
    print(f"probe ok: every model ready, one {PROBE_MODE} image per family ({len(busy)} refused for load), "
          f"{elapsed:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

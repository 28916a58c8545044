"""Locust users for the Hybridiff server, over HTTP and gRPC.

    locust -f loadtest/locustfile.py --headless -u 4 -r 4 -t 60s --host 127.0.0.1:8000 HttpImageUser

Each user sends a mix of prompts and sizes, back to back; the mode comes from ``LOADTEST_MODE``
(default ``auto``; ``mix`` picks one per request). ``loadtest/run.py`` drives these users through a
concurrency sweep and checks every image against the same request run alone.
"""

from __future__ import annotations

import os
import random
import time

# tritonclient.grpc needs grpc's gevent integration before any channel exists under Locust.
import grpc.experimental.gevent as grpc_gevent

grpc_gevent.init_gevent()

from locust import User, constant, task  # noqa: E402

from client.generate import generate, make_client  # noqa: E402

PROMPTS = [
    "a lighthouse on a cliff at sunset, oil painting",
    "a red fox sitting in fresh snow, photograph",
    "a futuristic city street at night with neon signs",
    "a bowl of ripe peaches on a wooden table",
]
MODES = ["serial", "cfg_parallel", "hybrid", "auto"]


def request_fields(rng: random.Random, mode: str) -> tuple[int, dict]:
    """A random request of the mix: prompt index and fields (seed fixed per prompt and size).

    ``LOADTEST_SIZES`` (default 256,320) and ``LOADTEST_STEPS`` (default 20) shape the mix.
    """
    sizes = [int(s) for s in os.environ.get("LOADTEST_SIZES", "256,320").split(",")]
    steps = int(os.environ.get("LOADTEST_STEPS", "20"))
    prompt = rng.randrange(len(PROMPTS))
    size = rng.choice(sizes)
    chosen = rng.choice(MODES) if mode == "mix" else mode
    fields = {"mode": chosen, "seed": 1000 * prompt + size, "steps": steps, "height": size, "width": size}
    return prompt, fields


class ImageUser(User):
    """One client that sends requests back to back (closed loop), reporting each to Locust."""

    abstract = True
    protocol = "http"
    wait_time = constant(0)
    model = os.environ.get("LOADTEST_MODEL", "sdxl")

    started = 0  # users started in this process: user i always sends the same sequence of requests

    def on_start(self) -> None:
        # The same request sequence for user i in every level and mode, so modes are compared on
        # identical work.
        self.index = ImageUser.started
        self.rng = random.Random(f"{self.protocol}-{self.index}")
        ImageUser.started += 1
        self.mode = os.environ.get("LOADTEST_MODE", "auto")
        self.client = make_client(self.protocol, self.host, **self._client_options())
        # Set by the sweep runner: a callback that records results and says when to stop.
        self.sink = getattr(self.environment, "hybridiff_sink", None)

    def _client_options(self) -> dict:
        if self.protocol == "http":
            return {"connection_timeout": 600.0, "network_timeout": 600.0}
        return {}

    def on_stop(self) -> None:
        self.client.close()

    @task
    def generate_image(self) -> None:
        if self.sink is not None and not self.sink.may_start(self.index):
            time.sleep(0.05)
            return
        prompt, fields = request_fields(self.rng, self.mode)
        started = time.perf_counter()
        exception, result = None, None
        try:
            result = generate(self.client, self.protocol, self.model, [PROMPTS[prompt]], timeout_s=600, **fields)
        except Exception as err:  # reported to Locust as a failure
            exception = err
        elapsed_ms = 1000 * (time.perf_counter() - started)
        self.environment.events.request.fire(
            request_type=self.protocol,
            name=fields["mode"],
            response_time=elapsed_ms,
            response_length=0 if result is None else result.images.nbytes,
            exception=exception,
            context={},
        )
        if self.sink is not None:
            self.sink.record(prompt, fields, elapsed_ms / 1000, result, exception)


class HttpImageUser(ImageUser):
    protocol = "http"


class GrpcImageUser(ImageUser):
    protocol = "grpc"

"""Locust users for the Hybridiff server, over HTTP and gRPC.

    locust -f loadtest/locustfile.py --headless -u 4 -r 4 -t 60s --host 127.0.0.1:8000 HttpImageUser

Each user sends a mix of prompts and sizes, back to back; the mode comes from ``LOADTEST_MODE``
(default ``auto``; ``mix`` picks one per request). ``loadtest/run.py`` drives these users through a
concurrency sweep and checks every image against the same request run alone.
"""

from __future__ import annotations

import os
import time

# tritonclient.grpc needs grpc's gevent integration before any channel exists under Locust.
import grpc.experimental.gevent as grpc_gevent

grpc_gevent.init_gevent()

from locust import User, constant, task  # noqa: E402

from client.generate import generate, make_client  # noqa: E402
from loadtest.levels import PROMPTS, user_requests  # noqa: E402


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
        ImageUser.started += 1
        self.client = make_client(self.protocol, self.host, **self._client_options())
        # Set by the sweep runner: records results, says when to stop and where this level starts in
        # the user's sequence (the second half of a level continues where the first stopped).
        self.sink = getattr(self.environment, "hybridiff_sink", None)
        first = 0 if self.sink is None else self.sink.first_request
        self.requests = user_requests(self.protocol, self.index, os.environ.get("LOADTEST_MODE", "auto"), first)

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
        prompt, fields = next(self.requests)
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

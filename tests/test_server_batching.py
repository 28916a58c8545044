"""Requests that meet on a device share its forwards (Triton's dynamic batcher), and keep their images.

A server of its own: one device, so that the four requests its orchestrator instances hold all meet there
(on two devices the count rule puts two on each, and two requests step in alternation: with no batching
delay they meet only by chance), and a batching delay that also catches steps arriving in alternation."""

from __future__ import annotations

from pathlib import Path

import pytest

from client.generate import generate, make_client
from export.make_repository import Deployment, write_repository
from hybridiff.params import Limits
from tests.helpers import in_parallel, max_pixel_diff
from tools.triton_process import TritonServer

pytestmark = pytest.mark.server

PROMPT = "a watercolor fox in a snowy forest"
BASE = dict(negative_prompt="blurry", steps=30, height=64, width=64, guidance_scale=5.0, mode="serial")
INSTANCES = 4


@pytest.fixture(scope="module")
def server(sdxl_tiny, tmp_path_factory):
    repo = tmp_path_factory.mktemp("repo") / "model_repository"
    deployment = Deployment(devices=1, kind="cpu", orchestrator_instances=INSTANCES, batch_delay_us=10_000,
                            limits=Limits(max_height=64, max_width=64, max_steps=30))
    write_repository(repo, {"sdxl": Path(sdxl_tiny)}, deployment)
    with TritonServer(repo, ready_timeout=240) as running:
        yield running
        print(running.logs()[-4000:])


def call(server, protocol: str, seed: int):
    url = server.http_url if protocol == "http" else server.grpc_url
    client = make_client(protocol, url)
    try:
        return generate(client, protocol, "sdxl", [PROMPT], **BASE, seed=seed)
    finally:
        client.close()


def test_serial_requests_meeting_on_a_device_are_batched_and_keep_their_images(server):
    seeds = [30 + i for i in range(INSTANCES)]
    results = in_parallel([lambda i=i: call(server, "grpc" if i % 2 else "http", seeds[i]) for i in range(len(seeds))])
    schedules = [r.schedules[0] for r in results]
    assert all(s["devices"] == [0] for s in schedules), schedules
    assert sum(s["batched_steps"] for s in schedules) > 0, schedules
    for seed, result in zip(seeds, results, strict=True):
        solo = call(server, "http", seed)
        assert solo.schedules[0]["batched_steps"] == 0
        assert max_pixel_diff(result.images[0], solo.images[0]) <= 1

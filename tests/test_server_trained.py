"""The built-in trained SDXL model on the real tritonserver: a request that leaves size and knobs out gets the
checkpoint's own defaults (serving_defaults.json), and the image is the in-process run's at those defaults."""

from __future__ import annotations

from pathlib import Path

import pytest

from client.generate import generate, make_client
from export.make_repository import Deployment, write_repository
from hybridiff.local import LocalPipeline
from hybridiff.loop import ImageRequest
from hybridiff.schedule import Mode
from hybridiff.serving_defaults import read_serving_defaults
from tests.helpers import max_pixel_diff
from tools.triton_process import TritonServer
from train.data import HELD_OUT_COMBINATIONS, caption
from train.score import read_image

pytestmark = pytest.mark.server

MODEL = Path(__file__).resolve().parents[1] / "models" / "sdxl-shapes"
COLOUR, SHAPE, POSITION = HELD_OUT_COMBINATIONS[0]
PROMPT = caption(COLOUR, SHAPE, POSITION)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    repo = tmp_path_factory.mktemp("repo") / "model_repository"
    write_repository(repo, {"sdxl": MODEL}, Deployment(devices=2, kind="cpu"))
    with TritonServer(repo, ready_timeout=240) as running:
        yield running
        print(running.logs()[-4000:])


def test_a_request_without_size_or_knobs_gets_the_checkpoints_defaults(server):
    client = make_client("http", server.http_url)
    try:
        result = generate(client, "http", "sdxl", [PROMPT], mode="hybrid", seed=1000)
    finally:
        client.close()
    local = LocalPipeline("sdxl", MODEL, devices=2)
    d = read_serving_defaults(MODEL, local.family.defaults)
    request = ImageRequest(seed=1000, steps=d.steps, guidance_scale=d.guidance_scale, height=d.height, width=d.width,
                           mode=Mode.HYBRID, knobs=d.knobs)
    expected, report, _ = local.generate(PROMPT, request)
    assert result.images.shape == (1, 64, 64, 3)
    schedule = result.schedules[0]
    assert (schedule["tau1"], schedule["tau_source"]) == (report.schedule["tau1"], "slope")
    assert max_pixel_diff(result.images[0], expected) <= 1
    assert read_image(result.images[0]).colour == COLOUR

"""SD3 on the real tritonserver, beside SDXL in one repository: every mode over HTTP and gRPC equals the
in-process run, both families serve requests at the same time, and SD3's own bad input is INVALID_ARG."""

from __future__ import annotations

import dataclasses
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from tritonclient.utils import InferenceServerException

from client.generate import generate, make_client
from export.make_repository import Deployment, write_repository
from hybridiff.families.sd3 import MAX_SEQUENCE_LENGTH
from hybridiff.params import Limits
from tests.helpers import max_pixel_diff
from tools.triton_process import TritonServer

pytestmark = pytest.mark.server

PROMPT = "a watercolor fox in a snowy forest"
STEPS = 8
BASE = dict(negative_prompt="blurry", seed=3, steps=STEPS, height=64, width=64, guidance_scale=7.0)
HYBRID_KNOBS = dict(slope_window=3, eps_slope=0.5e-3, k=4, tau_cap=3)
MODES = ("serial", "cfg_parallel", "pipeline", "hybrid")
TOO_LONG = "a " * MAX_SEQUENCE_LENGTH  # + the end token: one T5 token over the limit


@pytest.fixture(scope="module")
def server(sdxl_tiny, sd3_tiny, tmp_path_factory):
    repo = tmp_path_factory.mktemp("repo") / "model_repository"
    deployment = Deployment(devices=2, kind="cpu", limits=Limits(max_height=256, max_width=256, max_steps=64))
    write_repository(repo, {"sdxl": Path(sdxl_tiny), "sd3": Path(sd3_tiny)}, deployment)
    with TritonServer(repo, ready_timeout=240) as running:
        yield running
        print(running.logs()[-4000:])


def call(server, protocol: str, family: str = "sd3", prompts: list[str] | None = None, **fields):
    url = server.http_url if protocol == "http" else server.grpc_url
    client = make_client(protocol, url)
    try:
        return generate(client, protocol, family, prompts or [PROMPT], **{**BASE, **fields})
    finally:
        client.close()




@pytest.fixture(scope="module")
def local_images(sd3_tiny) -> dict[str, np.ndarray]:
    """The same SD3 requests run in process: what the server must reproduce."""
    from hybridiff.local import LocalPipeline
    from hybridiff.loop import ImageRequest
    from hybridiff.schedule import HybridKnobs, Mode

    local = LocalPipeline("sd3", sd3_tiny)
    base = ImageRequest(seed=3, steps=STEPS, guidance_scale=7.0, height=64, width=64, mode=Mode.SERIAL,
                        knobs=HybridKnobs(window=3, eps_slope=0.5e-3, k=4, tau_cap=3))
    return {mode: local.generate(PROMPT, dataclasses.replace(base, mode=Mode(mode)), "blurry")[0] for mode in MODES}


@pytest.mark.parametrize("protocol", ["http", "grpc"])
@pytest.mark.parametrize("mode", MODES)
def test_every_sd3_mode_over_both_protocols_equals_the_local_run(server, local_images, protocol, mode):
    result = call(server, protocol, mode=mode, **HYBRID_KNOBS)
    image, schedule = result.images[0], result.schedules[0]
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8
    assert schedule["mode_run"] == mode and len(schedule["phases"]) == STEPS
    assert max_pixel_diff(image, local_images[mode]) <= 1
    if mode == "cfg_parallel":
        assert max_pixel_diff(image, local_images["serial"]) <= 1
    if mode in ("hybrid", "pipeline"):
        assert schedule["phase_steps"].get("pipeline", 0) >= 1
        assert schedule["bytes_to_devices"] > 0
    if mode == "hybrid":
        assert schedule["tau1"] is not None and schedule["tau2"] == min(schedule["tau1"] + 4, STEPS - 1)


def test_sdxl_and_sd3_in_flight_together_each_equal_their_solo_run(server):
    requests = {
        "sdxl": dict(family="sdxl", mode="hybrid", guidance_scale=5.0, **HYBRID_KNOBS),
        "sd3": dict(family="sd3", mode="hybrid", **HYBRID_KNOBS),
    }
    solo = {name: call(server, "grpc", **fields).images[0] for name, fields in requests.items()}
    results: dict[str, np.ndarray] = {}
    spans: dict[str, tuple[float, float]] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(requests))

    def run(name: str, protocol: str) -> None:
        try:
            barrier.wait(timeout=30)
            started = time.perf_counter()
            results[name] = call(server, protocol, **requests[name]).images[0]
            spans[name] = (started, time.perf_counter())
        except BaseException as err:  # surfaced below
            errors.append(err)

    threads = [threading.Thread(target=run, args=("sdxl", "http")), threading.Thread(target=run, args=("sd3", "grpc"))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not errors, errors
    (a_start, a_end), (b_start, b_end) = spans["sdxl"], spans["sd3"]
    assert a_start < b_end and b_start < a_end  # the two requests really overlapped
    for name in requests:
        assert np.array_equal(results[name], solo[name]), name


@pytest.mark.parametrize("protocol", ["http", "grpc"])
@pytest.mark.parametrize(
    "fields,field,expected",
    [
        ({"prompts": [TOO_LONG]}, "PROMPT", f"{MAX_SEQUENCE_LENGTH + 1} tokens"),
        ({"negative_prompt": TOO_LONG}, "NEGATIVE_PROMPT", f"at most {MAX_SEQUENCE_LENGTH}"),
        ({"height": 72}, "HEIGHT", "72 is not a multiple of 16"),
        ({"width": 40}, "WIDTH", "40 is not a multiple of 16"),
    ],
)
def test_sd3_bad_input_is_invalid_arg_naming_the_field_and_the_server_keeps_serving(
    server, protocol, fields, field, expected
):
    with pytest.raises(InferenceServerException) as raised:
        call(server, protocol, mode="serial", **fields)
    message = str(raised.value)
    assert f"{field}:" in message and expected in message, message
    assert raised.value.status() in ("400", "StatusCode.INVALID_ARGUMENT"), raised.value.status()
    assert call(server, protocol, mode="serial", steps=2).images.shape == (1, 64, 64, 3)


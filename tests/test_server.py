"""The real tritonserver on a generated repository: every mode over HTTP and gRPC, concurrency,
bad input. One server for the module (it takes a few seconds to load every model)."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
from tritonclient.utils import InferenceServerException

from client.generate import generate, make_client
from export.make_repository import Deployment, write_repository
from hybridiff.params import Limits
from hybridiff.tritonserver import TritonServer

pytestmark = pytest.mark.server

PROMPT = "a watercolor fox in a snowy forest"
BASE = dict(negative_prompt="blurry", seed=3, steps=8, height=64, width=64, guidance_scale=5.0)
HYBRID_KNOBS = dict(slope_window=3, eps_slope=0.4e-3, k=4, tau_cap=3)


@pytest.fixture(scope="module")
def server(sdxl_tiny, tmp_path_factory):
    repo = tmp_path_factory.mktemp("repo") / "model_repository"
    deployment = Deployment(devices=2, kind="cpu", limits=Limits(max_height=256, max_width=256, max_steps=64))
    write_repository(repo, {"sdxl": Path(sdxl_tiny)}, deployment)
    with TritonServer(repo, ready_timeout=240) as running:
        yield running
        print(running.logs()[-4000:])


def call(server, protocol: str, **fields):
    url = server.http_url if protocol == "http" else server.grpc_url
    client = make_client(protocol, url)
    try:
        return generate(client, protocol, "sdxl", [PROMPT], **{**BASE, **fields})
    finally:
        client.close()


def max_diff(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())


@pytest.fixture(scope="module")
def serial_image(server):
    return call(server, "http", mode="serial").images[0]


@pytest.fixture(scope="module")
def local_images(sdxl_tiny):
    """The same requests run in process: what the server must reproduce."""
    import dataclasses

    from hybridiff.local import LocalPipeline
    from hybridiff.loop import ImageRequest
    from hybridiff.schedule import HybridKnobs, Mode

    local = LocalPipeline("sdxl", sdxl_tiny)
    base = ImageRequest(seed=3, steps=8, guidance_scale=5.0, height=64, width=64, mode=Mode.SERIAL,
                        knobs=HybridKnobs(window=3, eps_slope=0.4e-3, k=4, tau_cap=3))
    return {
        mode: local.generate(PROMPT, dataclasses.replace(base, mode=Mode(mode)), "blurry")[0]
        for mode in ("serial", "hybrid", "pipeline")
    }


@pytest.mark.parametrize("protocol", ["http", "grpc"])
@pytest.mark.parametrize("mode", ["serial", "cfg_parallel", "pipeline", "hybrid"])
def test_every_mode_over_both_protocols(server, serial_image, local_images, protocol, mode):
    result = call(server, protocol, mode=mode, **HYBRID_KNOBS)
    image, schedule = result.images[0], result.schedules[0]
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8
    assert schedule["mode_run"] == mode
    assert len(schedule["phases"]) == 8
    if mode in ("serial", "cfg_parallel"):
        assert max_diff(image, serial_image) <= 1
        assert max_diff(image, local_images["serial"]) <= 1
    else:
        assert max_diff(image, local_images[mode]) <= 1
    if mode == "hybrid":
        assert schedule["tau1"] is not None and schedule["tau2"] == min(schedule["tau1"] + 4, 7)
        assert schedule["phase_steps"].get("pipeline", 0) >= 1
        assert schedule["bytes_to_devices"] > 0


def test_hybrid_k0_equals_cfg_parallel(server):
    partition = call(server, "grpc", mode="cfg_parallel").images[0]
    hybrid = call(server, "grpc", mode="hybrid", **{**HYBRID_KNOBS, "k": 0}).images[0]
    assert np.array_equal(partition, hybrid)


def test_concurrent_requests_in_different_modes_equal_their_solo_runs(server, serial_image):
    solo_hybrid = call(server, "http", mode="hybrid", **HYBRID_KNOBS).images[0]
    results: dict[str, np.ndarray] = {}
    errors: list[BaseException] = []

    def run(name: str, protocol: str, **fields) -> None:
        try:
            results[name] = call(server, protocol, **fields).images[0]
        except BaseException as err:  # surfaced below
            errors.append(err)

    threads = [
        threading.Thread(target=run, args=("serial", "grpc"), kwargs={"mode": "serial"}),
        threading.Thread(target=run, args=("hybrid", "http"), kwargs={"mode": "hybrid", **HYBRID_KNOBS}),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not errors, errors
    assert np.array_equal(results["serial"], serial_image)
    assert np.array_equal(results["hybrid"], solo_hybrid)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_no_guidance_says_which_mode_ran(server, protocol):
    result = call(server, protocol, mode="hybrid", guidance_scale=1.0)
    assert result.schedules[0]["mode_run"] == "serial"
    assert result.schedules[0]["guidance"] is False


@pytest.mark.parametrize(
    "fields,field,allowed",
    [
        ({"steps": 0}, "STEPS", "[1, 64]"),
        ({"height": 60}, "HEIGHT", "multiple of 8"),
        ({"width": 512}, "WIDTH", "[64, 256]"),
        ({"mode": "turbo"}, "MODE", "serial, cfg_parallel, pipeline, hybrid, auto"),
        ({"k": -1}, "K", "[0, 64]"),
        ({"guidance_scale": -2.0}, "GUIDANCE_SCALE", "[0.0, 100.0]"),
        ({"seed": -5}, "SEED", "outside the allowed range"),
    ],
)
@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_bad_parameters_are_invalid_arg_naming_the_field(server, protocol, fields, field, allowed):
    with pytest.raises(InferenceServerException) as raised:
        call(server, protocol, **fields)
    message = str(raised.value)
    assert field in message and allowed in message
    status = raised.value.status()
    assert status in ("400", "StatusCode.INVALID_ARGUMENT"), status


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_empty_batch_is_refused_and_the_server_keeps_serving(server, protocol):
    url = server.http_url if protocol == "http" else server.grpc_url
    client = make_client(protocol, url)
    try:
        with pytest.raises(InferenceServerException, match="PROMPT"):
            generate(client, protocol, "sdxl", [], **BASE)
        assert generate(client, protocol, "sdxl", [PROMPT], **BASE, mode="serial").images.shape == (1, 64, 64, 3)
    finally:
        client.close()


def test_a_batch_of_prompts_gets_one_image_and_schedule_each(server):
    client = make_client("http", server.http_url)
    try:
        result = generate(client, "http", "sdxl", [PROMPT, "a red boat"], **BASE, mode="cfg_parallel")
    finally:
        client.close()
    assert result.images.shape == (2, 64, 64, 3)
    assert [s["seed"] for s in result.schedules] == [3, 4]
    assert not np.array_equal(result.images[0], result.images[1])

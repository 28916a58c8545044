"""The internal models on the real tritonserver, called directly: input the public model could never send them is
INVALID_ARG naming the input and the allowed range, well-formed direct calls still run, and the public model still
serves every staged mode of both families (so no check refuses what it sends)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from client.generate import generate, make_client
from export.make_repository import Deployment, write_repository
from hybridiff.families import get_family
from hybridiff.params import Limits
from tools.triton_process import TritonServer

pytestmark = pytest.mark.server

LIMITS = Limits(max_height=256, max_width=256, max_steps=64, max_batch=4)
MAX_DEVICE_BATCH = 8
PUBLIC = dict(negative_prompt="blurry", seed=3, steps=6, height=64, width=64, slope_window=3, k=2, tau_cap=2)


@pytest.fixture(scope="module")
def checkpoints(sdxl_tiny, sd3_tiny) -> dict[str, Path]:
    return {"sdxl": Path(sdxl_tiny), "sd3": Path(sd3_tiny)}


@pytest.fixture(scope="module")
def server(checkpoints, tmp_path_factory):
    repo = tmp_path_factory.mktemp("repo") / "model_repository"
    deployment = Deployment(devices=2, kind="cpu", max_device_batch=MAX_DEVICE_BATCH, limits=LIMITS)
    write_repository(repo, checkpoints, deployment)
    with TritonServer(repo, ready_timeout=240) as running:
        yield running
        print(running.logs()[-4000:])


@pytest.fixture(scope="module")
def client(server):
    client = httpclient.InferenceServerClient(server.http_url)
    yield client
    client.close()


@pytest.fixture(scope="module")
def shapes(checkpoints):
    return {name: get_family(name).model_shapes(folder) for name, folder in checkpoints.items()}


def tensor(name: str, array: np.ndarray) -> httpclient.InferInput:
    kinds = {np.float32: "FP32", np.int32: "INT32", np.int64: "INT64", np.object_: "BYTES"}
    value = httpclient.InferInput(name, list(array.shape), kinds[array.dtype.type])
    value.set_data_from_numpy(array)
    return value


def infer(client, model: str, arrays: dict[str, np.ndarray], outputs: list[str]):
    inputs = [tensor(name, array) for name, array in arrays.items()]
    return client.infer(model, inputs, outputs=[httpclient.InferRequestedOutput(n) for n in outputs])


def assert_invalid_arg(client, model: str, arrays: dict[str, np.ndarray], outputs: list[str], *fragments: str):
    with pytest.raises(InferenceServerException) as raised:
        infer(client, model, arrays, outputs)
    message = str(raised.value)
    assert raised.value.status() == "400", message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


def zeros(*shape: int) -> np.ndarray:
    return np.zeros(shape, dtype=np.float32)


def denoiser_inputs(family_shapes, batch: int, latent: tuple[int, int], stage: int = -1, **overrides):
    h, w = latent
    arrays = {
        "SAMPLE": zeros(batch, family_shapes.latent_channels, h, w),
        "TIMESTEP": np.full((batch, 1), 500.0, dtype=np.float32),
        "STAGE": np.full((batch, 1), stage, dtype=np.int32),
        "CAPTURE_STAGE": np.full((batch, 1), -1, dtype=np.int32),
        **{name: zeros(batch, *dims) for name, dims in family_shapes.conditioning.items()},
    }
    if stage >= 0:
        for name in family_shapes.stage_imports(stage):
            arrays[name] = zeros(batch, *family_shapes.activations[name].shape(h, w))
    return {**arrays, **overrides}


@pytest.mark.parametrize("family", ["sdxl", "sd3"])
def test_text_encoder_refuses_more_prompts_than_a_request_may_send(client, family):
    prompts = np.array([b"a fox"] * (LIMITS.max_batch + 1), dtype=object)
    outputs = ["cond_PROMPT_EMBEDS"]
    assert_invalid_arg(client, f"{family}_text_encoder", {"PROMPT": prompts}, outputs, "PROMPT", "at most 4")


@pytest.mark.parametrize("family", ["sdxl", "sd3"])
def test_public_model_refuses_too_many_prompts_and_mismatched_negatives_before_encoding(client, family):
    """The orchestrator, behind the public front, refuses these (INVALID_ARG survives the BLS hop): the batch it
    runs is the prompts it was sent, held to ``max_batch``, with one negative prompt or one per prompt."""
    outputs = ["SCHEDULE"]
    too_many = {"PROMPT": np.array([b"a fox"] * (LIMITS.max_batch + 1), dtype=object)}
    assert_invalid_arg(client, family, too_many, outputs, "PROMPT", "5 prompts", "at most 4")
    mismatched = {"PROMPT": np.array([b"a fox"] * 3, dtype=object),
                  "NEGATIVE_PROMPT": np.array([b"blurry"] * 2, dtype=object)}
    assert_invalid_arg(client, family, mismatched, outputs, "NEGATIVE_PROMPT", "2 given for 3 prompts")


@pytest.mark.parametrize("family", ["sdxl", "sd3"])
def test_orchestrator_called_directly_holds_its_inputs_to_the_public_limits(client, family):
    model, outputs, prompt = f"{family}_orchestrator", ["SCHEDULE"], np.array([b"a fox"], dtype=object)
    too_many = {"PROMPT": np.array([b"a fox"] * (LIMITS.max_batch + 1), dtype=object)}
    assert_invalid_arg(client, model, too_many, outputs, "PROMPT", "at most 4")
    assert_invalid_arg(client, model, {"PROMPT": prompt, "STEPS": np.array([1000])}, outputs, "STEPS", "[1, 64]")
    small = {"PROMPT": prompt, "HEIGHT": np.array([64]), "WIDTH": np.array([64])}
    bad_key = {**small, "REQUEST_KEY": np.array([b"../../etc/passwd"], dtype=object)}  # the key names a file
    assert_invalid_arg(client, model, bad_key, outputs, "REQUEST_KEY", "32 lowercase hex digits")


@pytest.mark.parametrize("family", ["sdxl", "sd3"])
@pytest.mark.parametrize("device", [0, 1])
def test_denoiser_refuses_images_larger_than_a_request_may_ask_for(client, shapes, family, device):
    model, outputs = f"{family}_denoiser_{device}", ["EPS"]
    huge = denoiser_inputs(shapes[family], 1, (256, 256))  # 2048 x 2048 pixels
    assert_invalid_arg(client, model, huge, outputs, "SAMPLE", "height of 256 latents", "64 to 256 pixels")
    stale = denoiser_inputs(shapes[family], 1, (8, 8), stage=1)
    name = shapes[family].stage_imports(1)[0]
    stale[name] = zeros(1, *(4 * d for d in stale[name].shape[1:]))
    assert_invalid_arg(client, model, stale, outputs, name, "expected [batch, ")
    assert_invalid_arg(client, model, denoiser_inputs(shapes[family], 1, (8, 8), stage=3), outputs, "STAGE", "0 to 1")


@pytest.mark.parametrize("family", ["sdxl", "sd3"])
def test_denoiser_runs_a_well_formed_direct_call(client, shapes, family):
    result = infer(client, f"{family}_denoiser_0", denoiser_inputs(shapes[family], 2, (8, 10)), ["EPS"])
    assert result.as_numpy("EPS").shape == (2, shapes[family].latent_channels, 8, 10)


@pytest.mark.parametrize("family", ["sdxl", "sd3"])
def test_vae_refuses_dozens_of_large_latents_and_decodes_allowed_ones(client, shapes, family):
    model, channels = f"{family}_vae", shapes[family].latent_channels
    assert_invalid_arg(client, model, {"LATENTS": zeros(40, channels, 32, 32)}, ["IMAGE"], "LATENTS", "batch of 40")
    too_big = {"LATENTS": zeros(1, channels, 128, 32)}
    assert_invalid_arg(client, model, too_big, ["IMAGE"], "LATENTS", "height of 128 latents (1024 pixels)")
    image = infer(client, model, {"LATENTS": zeros(2, channels, 8, 10)}, ["IMAGE"]).as_numpy("IMAGE")
    assert image.shape == (2, 64, 80, 3) and image.dtype == np.uint8


@pytest.mark.parametrize("family", ["sdxl", "sd3"])
@pytest.mark.parametrize("mode", ["hybrid", "pipeline", "cfg_parallel"])
def test_public_model_still_serves_after_bad_direct_calls(server, family, mode):
    public = make_client("http", server.http_url)
    try:
        result = generate(public, "http", family, ["a fox", "a boat"], mode=mode, **PUBLIC)
    finally:
        public.close()
    assert result.images.shape == (2, 64, 64, 3)
    assert [s["mode_run"] for s in result.schedules] == [mode, mode]
    if mode != "cfg_parallel":
        assert all(s["phase_steps"].get("pipeline", 0) >= 1 for s in result.schedules), result.schedules

"""Input checks of the internal models (no server): each bad input is refused naming it and the allowed range,
and everything a public request makes the models exchange passes."""

from __future__ import annotations

import dataclasses
import json
import math
from contextlib import contextmanager
from pathlib import Path

import pytest

from hybridiff import wire
from hybridiff.params import InvalidParameter, Limits
from hybridiff.validation import (
    FeatureMap,
    FixedShape,
    ImageTokens,
    ModelShapes,
    check_denoiser_inputs,
    check_latents,
    check_text_conditioning,
    check_vae_latents,
    model_limits,
)

SDXL = ModelShapes(
    family=wire.SDXL,
    latent_channels=4,
    vae_scale_factor=8,
    size_multiple=8,
    max_size=None,
    conditioning={"PROMPT_EMBEDS": (77, 96), "TEXT_EMBEDS": (64,), "TIME_IDS": (6,)},
    activations={"MIDDLE_ACT": FeatureMap(160, 2), "HEAD_ACT": FeatureMap(64, 2)},
)
SD3 = ModelShapes(
    family=wire.SD3,
    latent_channels=16,
    vae_scale_factor=8,
    size_multiple=16,
    max_size=1024,
    conditioning={"PROMPT_EMBEDS": (333, 128), "POOLED_EMBEDS": (96,)},
    activations={"MIDDLE_HIDDEN": ImageTokens(2, 32), "MIDDLE_ENCODER": FixedShape((333, 32))},
)
LIMITS = Limits(max_height=256, max_width=512, min_size=64, max_steps=64, max_batch=4, size_multiple=8)
SD3_LIMITS = dataclasses.replace(LIMITS, size_multiple=16)
MAX_DEVICE_BATCH = 8


@contextmanager
def refused(field: str, *fragments: str):
    """Expect an InvalidParameter naming ``field`` whose message holds every fragment."""
    with pytest.raises(InvalidParameter) as raised:
        yield
    assert raised.value.field == field, str(raised.value)
    for fragment in fragments:
        assert fragment in str(raised.value), f"{fragment!r} not in {str(raised.value)!r}"


# --- limits through the config parameters --------------------------------------------------------


def test_limits_travel_as_config_parameters():
    params = LIMITS.as_parameters()
    assert params == {"max_height": "256", "max_width": "512", "min_size": "64", "max_steps": "64", "max_batch": "4"}
    assert Limits.from_parameters(params) == dataclasses.replace(LIMITS, size_multiple=Limits.size_multiple)
    assert Limits.from_parameters({"max_batch": "2", "family": "sdxl"}) == Limits(max_batch=2)


def test_model_limits_narrow_to_what_the_model_runs():
    params = Limits(max_height=2048, max_width=512).as_parameters()
    sd3 = model_limits(params, SD3)
    assert (sd3.max_height, sd3.max_width, sd3.size_multiple) == (1024, 512, 16)
    sdxl = model_limits(params, SDXL)
    assert (sdxl.max_height, sdxl.max_width, sdxl.size_multiple) == (2048, 512, 8)


def test_shapes_must_cover_the_family_wire_at_its_ranks():
    with pytest.raises(ValueError, match="TIME_IDS"):
        dataclasses.replace(SDXL, conditioning={"PROMPT_EMBEDS": (77, 96), "TEXT_EMBEDS": (64,)})
    with pytest.raises(ValueError, match="TEXT_EMBEDS has rank 2 on the wire, not 3"):
        dataclasses.replace(SDXL, conditioning={**SDXL.conditioning, "TEXT_EMBEDS": (64, 1)})
    with pytest.raises(ValueError, match="MIDDLE_HIDDEN has rank 3 on the wire, not 4"):
        dataclasses.replace(SD3, activations={**SD3.activations, "MIDDLE_HIDDEN": FeatureMap(32, 1)})


# --- latents (denoiser SAMPLE, VAE LATENTS) -------------------------------------------------------


def test_latents_of_an_allowed_image_pass():
    assert check_latents("SAMPLE", (2, 4, 8, 64), SDXL, LIMITS, 4) == (2, 8, 64)
    assert check_latents("SAMPLE", (1, 4, 32, 9), SDXL, LIMITS, 4) == (1, 32, 9)


@pytest.mark.parametrize(
    "shape,fragments",
    [
        (None, ["missing"]),
        ((4, 8, 8), ["rank 3", "[batch, channels, height, width]"]),
        ((0, 4, 8, 8), ["batch of 0", "allowed 1 to 4"]),
        ((5, 4, 8, 8), ["batch of 5", "allowed 1 to 4"]),
        ((1, 3, 8, 8), ["3 channels", "takes 4"]),
        ((1, 4, 33, 8), ["height of 33 latents (264 pixels)", "allowed 8 to 32 latents", "64 to 256 pixels"]),
        ((1, 4, 8, 7), ["width of 7 latents (56 pixels)", "allowed 8 to 64 latents", "64 to 512 pixels"]),
        ((1, 4, 8, 4096), ["width of 4096 latents"]),
    ],
)
def test_bad_latents_are_refused_naming_the_input(shape, fragments):
    with refused("SAMPLE", *fragments):
        check_latents("SAMPLE", shape, SDXL, LIMITS, 4)


def test_latent_sides_follow_the_models_size_multiple():
    assert check_latents("SAMPLE", (1, 16, 8, 10), SD3, SD3_LIMITS, 4) == (1, 8, 10)
    with refused("SAMPLE", "height of 9 latents (72 pixels)", "in steps of 2", "multiples of 16"):
        check_latents("SAMPLE", (1, 16, 9, 8), SD3, SD3_LIMITS, 4)


def test_min_size_not_a_multiple_rounds_up_to_the_next_allowed_side():
    limits = dataclasses.replace(SD3_LIMITS, min_size=70)
    with refused("SAMPLE", "allowed 10 to 32 latents", "80 to 256 pixels"):
        check_latents("SAMPLE", (1, 16, 8, 10), SD3, limits, 4)


def test_vae_takes_at_most_max_batch_images_of_an_allowed_size():
    assert check_vae_latents((4, 4, 32, 64), SDXL, LIMITS) == 4
    with refused("LATENTS", "batch of 48", "allowed 1 to 4"):
        check_vae_latents((48, 4, 32, 64), SDXL, LIMITS)
    with refused("LATENTS", "height of 128 latents (1024 pixels)", "64 to 256 pixels"):
        check_vae_latents((1, 4, 128, 128), SDXL, LIMITS)
    with refused("LATENTS", "missing"):
        check_vae_latents(None, SDXL, LIMITS)
    with refused("LATENTS", "3 channels"):
        check_vae_latents((1, 3, 8, 8), SDXL, LIMITS)


# --- orchestrator: the branch embeddings ----------------------------------------------------------


def embeddings(batch: int = 2, shapes: ModelShapes = SDXL, **overrides) -> dict:
    names = [(f"{branch}_{name}", dims) for branch in ("uncond", "cond") for name, dims in shapes.text_outputs.items()]
    return {**{name: (batch, *dims) for name, dims in names}, **overrides}


def test_matching_embeddings_give_the_batch():
    assert check_text_conditioning(embeddings(3), SDXL, LIMITS) == 3
    assert check_text_conditioning(embeddings(1, SD3), SD3, SD3_LIMITS) == 1


@pytest.mark.parametrize(
    "overrides,field,fragments",
    [
        ({"cond_TEXT_EMBEDS": None}, "cond_TEXT_EMBEDS", ["missing"]),
        ({"cond_PROMPT_EMBEDS": (1, 77, 96)}, "cond_PROMPT_EMBEDS", ["batch of 1", "uncond_PROMPT_EMBEDS has 2"]),
        ({"uncond_TEXT_EMBEDS": (3, 64)}, "uncond_TEXT_EMBEDS", ["batch of 3", "uncond_PROMPT_EMBEDS has 2"]),
        ({"uncond_PROMPT_EMBEDS": (2, 4096, 96)}, "uncond_PROMPT_EMBEDS", ["[2, 4096, 96]", "[batch, 77, 96]"]),
        ({"cond_PROMPT_EMBEDS": (2, 77, 2048)}, "cond_PROMPT_EMBEDS", ["expected [batch, 77, 96]"]),
        ({"cond_TEXT_EMBEDS": (2, 64, 1)}, "cond_TEXT_EMBEDS", ["rank 3", "expected rank 2"]),
    ],
)
def test_bad_embeddings_are_refused_naming_the_input(overrides, field, fragments):
    with refused(field, *fragments):
        check_text_conditioning(embeddings(2, **overrides), SDXL, LIMITS)


def test_more_prompts_than_max_batch_are_refused():
    with refused("uncond_PROMPT_EMBEDS", "batch of 5", "allowed 1 to 4"):
        check_text_conditioning(embeddings(5), SDXL, LIMITS)
    with refused("uncond_PROMPT_EMBEDS", "batch of 0"):
        check_text_conditioning(embeddings(0), SDXL, LIMITS)


# --- denoiser ---------------------------------------------------------------------------------------


def denoiser_call(
    batch: int = 2,
    latent: tuple[int, int] = (8, 16),
    stage: int = -1,
    capture: int = -1,
    shapes: ModelShapes = SDXL,
    limits: Limits = LIMITS,
    timesteps: list[float] | None = None,
    stages: list[int] | None = None,
    **overrides,
):
    """A denoiser request as the orchestrator sends it (stale activations for ``stage``), then ``overrides``."""
    h, w = latent
    inputs = {
        "SAMPLE": (batch, shapes.latent_channels, h, w),
        "TIMESTEP": (batch, 1),
        "STAGE": (batch, 1),
        "CAPTURE_STAGE": (batch, 1),
        **{name: (batch, *dims) for name, dims in shapes.conditioning.items()},
    }
    if stage >= 0:
        for name in shapes.stage_imports(stage):
            inputs[name] = (batch, *shapes.activations[name].shape(h, w))
    inputs.update(overrides)
    return check_denoiser_inputs(
        inputs,
        timesteps if timesteps is not None else [981.0] * batch,
        stages if stages is not None else [stage] * batch,
        [capture] * batch,
        shapes,
        limits,
        MAX_DEVICE_BATCH,
    )


def test_what_the_orchestrator_sends_passes():
    whole = denoiser_call()
    assert (whole.batch, whole.stage, whole.capture_stage) == (2, None, None)
    assert denoiser_call(batch=1, capture=1).capture_stage == 1
    assert denoiser_call(batch=1, stage=0, latent=(9, 17)).stage == 0
    assert denoiser_call(batch=8, stage=1, latent=(32, 64)).stage == 1
    assert denoiser_call(shapes=SD3, limits=SD3_LIMITS, stage=1, latent=(10, 18)).stage == 1
    assert denoiser_call(shapes=SD3, limits=SD3_LIMITS, stage=0).stage == 0  # stage 0 reads nothing


@pytest.mark.parametrize(
    "kwargs,field,fragments",
    [
        ({"SAMPLE": None}, "SAMPLE", ["missing"]),
        ({"batch": 9}, "SAMPLE", ["batch of 9", "allowed 1 to 8"]),
        ({"latent": (400, 16)}, "SAMPLE", ["height of 400 latents", "allowed 8 to 32 latents"]),
        ({"latent": (8, 65)}, "SAMPLE", ["width of 65 latents", "64 to 512 pixels"]),
        ({"SAMPLE": (2, 8, 8, 16)}, "SAMPLE", ["8 channels", "takes 4"]),
        ({"TIMESTEP": None}, "TIMESTEP", ["missing"]),
        ({"STAGE": (2, 3)}, "STAGE", ["[2, 3]", "expected [batch, 1]"]),
        ({"timesteps": [981.0, 1.0]}, "TIMESTEP", ["rows differ"]),
        ({"timesteps": [math.nan] * 2}, "TIMESTEP", ["finite"]),
        ({"timesteps": [1.0]}, "TIMESTEP", ["1 values", "[2, 1]"]),
        ({"stage": 2}, "STAGE", ["2", "allowed -1 (none) or 0 to 1"]),
        ({"stage": -7}, "STAGE", ["-7", "allowed -1 (none) or 0 to 1"]),
        ({"stages": [0, 1]}, "STAGE", ["rows differ"]),
        ({"capture": 5}, "CAPTURE_STAGE", ["5", "allowed -1 (none) or 0 to 1"]),
        ({"stage": 0, "capture": 1}, "CAPTURE_STAGE", ["with STAGE 0", "send STAGE -1"]),
        ({"TIME_IDS": None}, "TIME_IDS", ["missing"]),
        ({"PROMPT_EMBEDS": (2, 100000, 96)}, "PROMPT_EMBEDS", ["[2, 100000, 96]", "[batch, 77, 96]"]),
        ({"TEXT_EMBEDS": (1, 64)}, "TEXT_EMBEDS", ["batch of 1", "SAMPLE has 2"]),
        ({"stage": 0, "HEAD_ACT": None}, "HEAD_ACT", ["missing", "stage 0 reads it"]),
        ({"HEAD_ACT": (2, 64, 2, 4)}, "HEAD_ACT", ["not read by a whole-model pass"]),
        ({"stage": 0, "MIDDLE_ACT": (2, 160, 2, 4)}, "MIDDLE_ACT", ["not read by stage 0"]),
        ({"stage": 0, "HEAD_ACT": (2, 64, 64, 64)}, "HEAD_ACT", ["[2, 64, 64, 64]", "[batch, 64, 2, 4]"]),
        ({"stage": 1, "MIDDLE_ACT": (2, 64, 2, 4)}, "MIDDLE_ACT", ["expected [batch, 160, 2, 4]"]),
    ],
)
def test_bad_denoiser_inputs_are_refused_naming_the_input(kwargs, field, fragments):
    with refused(field, *fragments):
        denoiser_call(**kwargs)


def test_sd3_stale_streams_must_fit_the_latent_and_the_prompt():
    sd3 = dict(shapes=SD3, limits=SD3_LIMITS, stage=1, latent=(8, 16))
    with refused("MIDDLE_HIDDEN", "[2, 4096, 32]", "expected [batch, 32, 32]"):
        denoiser_call(**sd3, MIDDLE_HIDDEN=(2, 4096, 32))
    with refused("MIDDLE_ENCODER", "missing", "stage 1 reads it"):
        denoiser_call(**sd3, MIDDLE_ENCODER=None)
    with refused("MIDDLE_ENCODER", "expected [batch, 333, 32]"):
        denoiser_call(**sd3, MIDDLE_ENCODER=(2, 5000, 32))
    with refused("SAMPLE", "height of 9 latents", "steps of 2"):
        denoiser_call(**{**sd3, "latent": (9, 16)})


# --- the shapes read from real checkpoints are what the models exchange --------------------------


def _wider_sdxl(tiny: Path, out: Path) -> Path:
    """The tiny SDXL checkpoint with a U-Net whose levels all differ in width (the tiny one repeats 64), so
    that taking the wrong level's width for an activation cannot pass."""
    from diffusers import UNet2DConditionModel

    out.mkdir()
    for item in tiny.iterdir():
        if item.name != "unet":
            (out / item.name).symlink_to(item.resolve())
    config = json.loads((tiny / "unet" / "config.json").read_text())
    config["block_out_channels"] = [16, 32, 48]
    UNet2DConditionModel.from_config(config).save_pretrained(out / "unet")
    return out


def _every_exchange_passes(family: str, folder: Path, sizes: list[tuple[int, int]]) -> None:
    """Run real images in process in every staged mode; every tensor the loop sends to or gets from a model must pass
    the internal models' checks, with the limits the deployment gives them."""
    from hybridiff.families import get_family
    from hybridiff.local import LocalPipeline
    from hybridiff.loop import ImageRequest
    from hybridiff.schedule import HybridKnobs, Mode
    from tests.helpers import recorded_run

    shapes = get_family(family).model_shapes(folder)
    limits = model_limits(Limits(max_height=256, max_width=256, max_batch=2).as_parameters(), shapes)
    local = LocalPipeline(family, folder)
    assert (shapes.size_multiple, shapes.max_size) == (local.latent_math.size_multiple, local.latent_math.max_size)
    encoded = local.text_encoder.encode(["a fox", "a boat"], ["blurry", "dark"])
    assert check_text_conditioning({k: tuple(v.shape) for k, v in encoded.items()}, shapes, limits) == 2
    knobs = HybridKnobs(window=2, eps_slope=1.0, k=2, tau_cap=1, pipeline_warmup=1)
    for height, width in sizes:
        for mode in (Mode.PIPELINE, Mode.HYBRID):
            request = ImageRequest(
                seed=1, steps=4, guidance_scale=5.0, height=height, width=width, mode=mode, knobs=knobs
            )
            _, steps = recorded_run(local, "a fox", "blurry", request)
            staged = 0
            for calls in steps.values():
                for _, task, output in calls:
                    batch = task.cond[next(iter(task.cond))].shape[0]
                    inputs = {"SAMPLE": (batch, *task.sample.shape[1:])}
                    inputs |= {name: (batch, 1) for name in ("TIMESTEP", "STAGE", "CAPTURE_STAGE")}
                    inputs |= {name: tuple(t.shape) for name, t in {**task.cond, **task.stale}.items()}
                    stage = -1 if task.stage is None else task.stage
                    capture = -1 if task.capture_stage is None else task.capture_stage
                    call = check_denoiser_inputs(
                        inputs, [float(task.timestep[0])] * batch, [stage] * batch, [capture] * batch,
                        shapes, limits, MAX_DEVICE_BATCH,
                    )
                    staged += call.stage is not None
                    latent = task.sample.shape[2:]
                    for name, activation in output.activations.items():  # what the next stage is sent
                        assert tuple(activation.shape[1:]) == shapes.activations[name].shape(*latent), name
            assert staged > 0, f"{mode} at {height}x{width} ran no pipeline step"
            latents = local.latent_math.initial_noise(0, height, width).expand(2, -1, -1, -1)
            assert check_vae_latents(tuple(latents.shape), shapes, limits) == 2


def test_sdxl_shapes_read_from_the_checkpoint_are_what_its_models_exchange(sdxl_tiny, tmp_path):
    _every_exchange_passes("sdxl", Path(sdxl_tiny), [(64, 64), (72, 136)])  # 9x17 latents: odd sides round up
    _every_exchange_passes("sdxl", _wider_sdxl(Path(sdxl_tiny), tmp_path / "wide"), [(72, 136)])


def test_sd3_shapes_read_from_the_checkpoint_are_what_its_models_exchange(sd3_tiny):
    _every_exchange_passes("sd3", Path(sd3_tiny), [(64, 64), (80, 144)])

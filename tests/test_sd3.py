"""SD3 family in process: parity with diffusers, the stage split, stale activations, the modes, T5 limits."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusion3Pipeline

from hybridiff.families.sd3 import MAX_SEQUENCE_LENGTH
from hybridiff.local import LocalPipeline
from hybridiff.loop import ImageRequest
from hybridiff.params import InvalidParameter, Limits, parse_image_requests
from hybridiff.schedule import HybridKnobs, Mode
from tests.helpers import max_pixel_diff, pipeline_steps, recorded_run

PROMPT = "a watercolor fox in a snowy forest"
NEGATIVE = "blurry"
SIZE = 64
STEPS = 12
GUIDANCE = 7.0
MIDDLE = {"MIDDLE_HIDDEN", "MIDDLE_ENCODER"}
FOUR_MODES = [Mode.SERIAL, Mode.CFG_PARALLEL, Mode.PIPELINE, Mode.HYBRID]


def image_request(mode: Mode, **changes) -> ImageRequest:
    base = ImageRequest(
        seed=7,
        steps=STEPS,
        guidance_scale=GUIDANCE,
        height=SIZE,
        width=SIZE,
        mode=mode,
        knobs=HybridKnobs(window=3, eps_slope=0.5e-3, k=4, tau_cap=4),
    )
    return dataclasses.replace(base, **changes)


@pytest.fixture(scope="module")
def local(sd3_tiny) -> LocalPipeline:
    return LocalPipeline("sd3", sd3_tiny)


def diffusers_image(folder: Path, negative: str | None, steps: int = STEPS, **kwargs) -> np.ndarray:
    pipe = StableDiffusion3Pipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    image = pipe(
        PROMPT,
        negative_prompt=negative,
        num_inference_steps=steps,
        guidance_scale=GUIDANCE,
        height=SIZE,
        width=SIZE,
        generator=torch.Generator("cpu").manual_seed(7),
        output_type="np",
        **kwargs,
    ).images[0]
    return (image * 255).round().astype("uint8")


@pytest.mark.parametrize("negative", [NEGATIVE, None])
def test_serial_equals_diffusers_pipeline(sd3_tiny, local, negative):
    image, report, _ = local.generate(PROMPT, image_request(Mode.SERIAL), negative)
    assert report.schedule["mode_run"] == "serial"
    assert max_pixel_diff(image, diffusers_image(sd3_tiny, negative)) <= 1


def test_a_checkpoint_with_a_short_t5_tokenizer_encodes_that_many_tokens(sd3_tiny, tmp_path):
    """A small model trained on short prompts carries its T5 length in ``tokenizer_3``: the server pads to it,
    sizes its tensors by it, refuses longer prompts, and matches diffusers called with that length."""
    folder = tmp_path / "sd3-short-t5"
    shutil.copytree(sd3_tiny, folder)
    config_path = folder / "tokenizer_3" / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["model_max_length"] = 16
    config_path.write_text(json.dumps(config))
    short = LocalPipeline("sd3", folder)
    assert short.family.model_shapes(folder).conditioning["PROMPT_EMBEDS"][0] == 77 + 16
    encoded = short.text_encoder.encode([PROMPT], None)
    assert encoded["cond_PROMPT_EMBEDS"].shape[1] == 77 + 16
    with pytest.raises(InvalidParameter, match="at most 16"):
        short.text_encoder.encode(["a " * 16], None)
    image, _, _ = short.generate(PROMPT, image_request(Mode.SERIAL), NEGATIVE)
    assert max_pixel_diff(image, diffusers_image(folder, NEGATIVE, max_sequence_length=16)) <= 1


def test_dynamic_shifting_uses_the_image_size_as_diffusers_does(sd3_tiny, tmp_path):
    """A checkpoint whose scheduler shifts by resolution (mu from the token count) still matches diffusers."""
    folder = tmp_path / "sd3-dynamic"
    shutil.copytree(sd3_tiny, folder)
    config_path = folder / "scheduler" / "scheduler_config.json"
    config = json.loads(config_path.read_text())
    config.update(use_dynamic_shifting=True, base_image_seq_len=16, max_image_seq_len=256)
    config_path.write_text(json.dumps(config))
    dynamic = LocalPipeline("sd3", folder, devices=1)
    fixed_timesteps = local_timesteps(LocalPipeline("sd3", sd3_tiny, devices=1))
    assert not torch.equal(local_timesteps(dynamic), fixed_timesteps)
    image, _, _ = dynamic.generate(PROMPT, image_request(Mode.SERIAL), NEGATIVE)
    assert max_pixel_diff(image, diffusers_image(folder, NEGATIVE)) <= 1


def local_timesteps(pipeline: LocalPipeline) -> torch.Tensor:
    return pipeline.latent_math.new_scheduler(STEPS, SIZE, SIZE).timesteps


def test_cfg_parallel_equals_serial_and_hybrid_k0_equals_cfg_parallel(local):
    _, serial, serial_latents = local.generate(PROMPT, image_request(Mode.SERIAL), NEGATIVE)
    _, partition, partition_latents = local.generate(PROMPT, image_request(Mode.CFG_PARALLEL), NEGATIVE)
    knobs = HybridKnobs(window=3, eps_slope=0.5e-3, k=0, tau_cap=4)
    _, hybrid, hybrid_latents = local.generate(PROMPT, image_request(Mode.HYBRID, knobs=knobs), NEGATIVE)
    torch.testing.assert_close(partition_latents, serial_latents, rtol=1e-4, atol=1e-4)
    assert torch.equal(hybrid_latents, partition_latents)
    assert partition.schedule["phase_steps"] == {"partition": STEPS}
    assert hybrid.schedule["tau1"] is not None
    # rel-MAE is measured on the velocity every partitioned step.
    assert all(m is not None and m > 0 for m in partition.schedule["rel_mae"])


def test_split_is_half_the_blocks_each_with_the_head_on_stage_1(local):
    split = local.denoisers[0].split
    n = len(local.denoisers[0].model.transformer_blocks)
    assert n % 2 == 0 and n >= 4  # tiny: stage 1 both bypasses a block and is fed one
    assert split.owned[0] == tuple(f"transformer_blocks.{i}" for i in range(n // 2))
    assert split.owned[1] == (*(f"transformer_blocks.{i}" for i in range(n // 2, n)), "norm_out", "proj_out")
    assert split.exports == ((f"transformer_blocks.{n // 2 - 1}",), ())
    assert local.family.stage_imports(0) == () and set(local.family.stage_imports(1)) == MIDDLE


def test_stage_split_composes_to_the_whole_model(local):
    """Stage 0 then stage 1, fed stage 0's outputs of the same input, is the full model."""
    denoiser = local.denoisers[0]
    cond = local.branch_conditioning(PROMPT, NEGATIVE)["cond"]
    sample = torch.randn(1, 16, SIZE // 8, SIZE // 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([500.0])
    full = denoiser.run(sample, t, cond)

    # Stage 0's exports are block n/2-1's two streams, as a whole pass computes them.
    n = len(denoiser.model.transformer_blocks)
    seen = {}
    hook = denoiser.model.transformer_blocks[n // 2 - 1].register_forward_hook(
        lambda module, args, output: seen.setdefault("out", output)
    )
    try:
        captured = denoiser.run(sample, t, cond, capture_stage=0)
    finally:
        hook.remove()
    torch.testing.assert_close(captured.eps, full.eps)
    encoder, hidden = seen["out"]
    torch.testing.assert_close(captured.activations["MIDDLE_HIDDEN"], hidden)
    torch.testing.assert_close(captured.activations["MIDDLE_ENCODER"], encoder)
    assert denoiser.run(sample, t, cond, capture_stage=1).activations == {}  # stage 1 hands nothing on

    first = denoiser.run(sample, t, cond, stage=0, stale={})
    assert first.eps is None and set(first.activations) == MIDDLE
    for name in MIDDLE:
        torch.testing.assert_close(first.activations[name], captured.activations[name])
    second = denoiser.run(sample, t, cond, stage=1, stale=first.activations)
    assert second.activations == {}
    torch.testing.assert_close(second.eps, full.eps, rtol=1e-5, atol=1e-5)


def test_stage_1_without_both_stale_streams_is_refused(local):
    denoiser = local.denoisers[0]
    cond = local.branch_conditioning(PROMPT, NEGATIVE)["cond"]
    sample, t = torch.zeros(1, 16, 8, 8), torch.tensor([1.0])
    with pytest.raises(ValueError, match="needs stale"):
        denoiser.run(sample, t, cond, stage=1, stale={})
    with pytest.raises(ValueError, match="MIDDLE_ENCODER"):
        denoiser.run(sample, t, cond, stage=1, stale={"MIDDLE_HIDDEN": torch.zeros(1, 16, 32)})


@pytest.mark.parametrize("mode", [Mode.HYBRID, Mode.PIPELINE])
def test_stage_1_is_fed_stage_0s_output_of_the_previous_step(local, mode):
    """Fails on the reference SD3 bug: it fed stage 1 block n/2's output (its own), frozen at the first step."""
    # tau_cap=2 with a window longer than the run: tau1 comes from the fallback, then warm-up at step 3 and
    # pipeline steps 4..6.
    knobs = HybridKnobs(window=50, eps_slope=0.5e-3, k=4, tau_cap=2, pipeline_warmup=3)
    report, steps = recorded_run(local, PROMPT, NEGATIVE, image_request(mode, knobs=knobs))
    piped = pipeline_steps(report)
    if mode is Mode.HYBRID:
        assert report.schedule["tau_source"] == "tau_cap"
        assert piped == [4, 5, 6]
    else:
        assert piped == list(range(3, STEPS))
    previous_feed: dict[str, torch.Tensor] = {}
    for t in piped:
        stage0_before = {}
        for device, _, output in steps[t - 1]:
            if device == 0:  # device 0 owns stage 0 (and captures its exports in the warm-up)
                stage0_before.update(output.activations)
        assert set(stage0_before) == MIDDLE
        for device, task, output in steps[t]:
            assert task.stage == device
            if device == 0:
                assert task.stale == {}  # stage 0 starts from embeddings it computes itself
                assert set(output.activations) == MIDDLE and output.eps is None
                continue
            assert set(task.stale) == MIDDLE
            for name, fed in task.stale.items():
                # Exactly what stage 0 produced one step earlier ...
                assert torch.equal(fed, stage0_before[name]), (t, name)
                # ... which changes every step.
                if name in previous_feed:
                    assert not torch.equal(fed, previous_feed[name]), (t, name)
                previous_feed[name] = fed
    assert set(previous_feed) == MIDDLE


def test_pipeline_output_stays_close_to_serial(local):
    serial, _, _ = local.generate(PROMPT, image_request(Mode.SERIAL), NEGATIVE)
    hybrid, report, _ = local.generate(PROMPT, image_request(Mode.HYBRID), NEGATIVE)
    assert report.schedule["phase_steps"].get("pipeline", 0) >= 1
    assert not np.array_equal(serial, hybrid)  # stale activations do change the result ...
    mse = np.mean((serial.astype(np.float64) - hybrid.astype(np.float64)) ** 2)
    assert 10 * np.log10(255**2 / mse) > 15  # ... but not into a different image


@pytest.mark.parametrize("mode", FOUR_MODES)
def test_no_guidance_runs_and_reports_the_mode(local, mode):
    image, report, latents = local.generate(PROMPT, image_request(mode, guidance_scale=1.0), NEGATIVE)
    expected = "pipeline" if mode is Mode.PIPELINE else "serial"
    assert report.schedule["mode_run"] == expected
    assert report.schedule["guidance"] is False
    assert torch.isfinite(latents).all()
    if mode is not Mode.PIPELINE:
        reference, _, _ = local.generate(PROMPT, image_request(Mode.SERIAL, guidance_scale=1.0), NEGATIVE)
        assert np.array_equal(image, reference)


def test_prompt_too_long_for_t5_is_refused_naming_the_field_and_limit(local):
    encoder = local.text_encoder
    at_limit = "a " * (MAX_SEQUENCE_LENGTH - 1)  # + the end token = exactly the limit
    assert len(encoder.pipe.tokenizer_3(at_limit).input_ids) == MAX_SEQUENCE_LENGTH
    encoded = encoder.encode([at_limit], None)  # also far beyond CLIP's 77: truncated there, as diffusers does
    assert encoded["cond_PROMPT_EMBEDS"].shape[1] == 77 + MAX_SEQUENCE_LENGTH
    too_long = at_limit + "a"
    with pytest.raises(InvalidParameter) as raised:
        encoder.encode([PROMPT, too_long], None)
    assert raised.value.field == "PROMPT"
    assert f"prompt 1 is {MAX_SEQUENCE_LENGTH + 1} tokens" in str(raised.value)
    assert f"at most {MAX_SEQUENCE_LENGTH}" in str(raised.value)
    with pytest.raises(InvalidParameter) as raised:
        encoder.encode([PROMPT], [too_long])
    assert raised.value.field == "NEGATIVE_PROMPT"


def test_sizes_must_be_whole_patches(local):
    assert local.latent_math.size_multiple == 16  # VAE factor 8 x patch size 2, as the pipeline's check_inputs says
    limits = Limits(size_multiple=local.latent_math.size_multiple)
    with pytest.raises(InvalidParameter, match="HEIGHT: 72 is not a multiple of 16"):
        parse_image_requests({"HEIGHT": np.array([72])}, local.family.defaults, limits, 1)
    (request,) = parse_image_requests({}, local.family.defaults, limits, 1)
    assert (request.height, request.width, request.guidance_scale, request.steps) == (512, 512, 7.0, 50)
    assert request.knobs == HybridKnobs(window=15, eps_slope=0.5e-3, k=5, tau_cap=40)


def test_position_table_bounds_the_image_size(sd3_tiny):
    from hybridiff.families.sd3 import SD3LatentMath

    latent_math = SD3LatentMath(sd3_tiny)
    assert latent_math.max_size == 1024  # pos_embed_max_size patches x patch size x VAE factor

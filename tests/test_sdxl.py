"""SDXL family in process: parity with diffusers, the stage split, stale activations, the modes."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline

from hybridiff.local import LocalPipeline
from hybridiff.loop import ImageRequest
from hybridiff.schedule import HybridKnobs, Mode
from tests.helpers import max_pixel_diff, pipeline_steps, recorded_run

PROMPT = "a watercolor fox in a snowy forest"
NEGATIVE = "blurry"
SIZE = 64
STEPS = 12


def image_request(mode: Mode, **changes) -> ImageRequest:
    base = ImageRequest(
        seed=7,
        steps=STEPS,
        guidance_scale=5.0,
        height=SIZE,
        width=SIZE,
        mode=mode,
        knobs=HybridKnobs(window=3, eps_slope=0.4e-3, k=4, tau_cap=4),
    )
    return dataclasses.replace(base, **changes)


@pytest.fixture(scope="module")
def local(sdxl_tiny) -> LocalPipeline:
    return LocalPipeline("sdxl", sdxl_tiny)





@pytest.mark.parametrize("negative", [NEGATIVE, None])
def test_serial_equals_diffusers_pipeline(sdxl_tiny, local, negative):
    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl_tiny)
    expected = pipe(
        PROMPT,
        negative_prompt=negative,
        num_inference_steps=STEPS,
        guidance_scale=5.0,
        height=SIZE,
        width=SIZE,
        generator=torch.Generator("cpu").manual_seed(7),
        output_type="np",
    ).images[0]
    expected = (expected * 255).round().astype("uint8")
    image, report, _ = local.generate(PROMPT, image_request(Mode.SERIAL), negative)
    assert report.schedule["mode_run"] == "serial"
    assert max_pixel_diff(image, expected) <= 1


def test_cfg_parallel_equals_serial_and_hybrid_k0_equals_cfg_parallel(local):
    _, serial, serial_latents = local.generate(PROMPT, image_request(Mode.SERIAL), NEGATIVE)
    _, partition, partition_latents = local.generate(PROMPT, image_request(Mode.CFG_PARALLEL), NEGATIVE)
    knobs = HybridKnobs(window=3, eps_slope=0.4e-3, k=0, tau_cap=4)
    _, hybrid, hybrid_latents = local.generate(PROMPT, image_request(Mode.HYBRID, knobs=knobs), NEGATIVE)
    torch.testing.assert_close(partition_latents, serial_latents, rtol=1e-4, atol=1e-4)
    assert torch.equal(hybrid_latents, partition_latents)
    assert partition.schedule["phase_steps"] == {"partition": STEPS}
    assert hybrid.schedule["tau1"] is not None


def test_stage_split_composes_to_the_whole_model(local):
    """Head -> middle -> tail, each fed the others' outputs of the same input, is the full model."""
    denoiser = local.denoisers[0]
    cond = local.branch_conditioning(PROMPT, NEGATIVE)["cond"]
    cond = {**cond, **local.latent_math.extra_conditioning(SIZE, SIZE)}
    sample = torch.randn(1, 4, SIZE // 8, SIZE // 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([500.0])
    full = denoiser.run(sample, t, cond)
    head = denoiser.run(sample, t, cond, capture_stage=1)
    torch.testing.assert_close(head.eps, full.eps)
    middle = denoiser.run(sample, t, cond, stage=0, stale=head.activations)
    assert middle.eps is None and set(middle.activations) == {"MIDDLE_ACT"}
    tail = denoiser.run(sample, t, cond, stage=1, stale=middle.activations)
    assert set(tail.activations) == {"HEAD_ACT"}
    torch.testing.assert_close(tail.activations["HEAD_ACT"], head.activations["HEAD_ACT"])
    torch.testing.assert_close(tail.eps, full.eps, rtol=1e-5, atol=1e-5)


def test_stage_without_its_stale_input_is_refused(local):
    denoiser = local.denoisers[0]
    cond = {**local.branch_conditioning(PROMPT, NEGATIVE)["cond"], **local.latent_math.extra_conditioning(SIZE, SIZE)}
    with pytest.raises(ValueError, match="needs stale"):
        denoiser.run(torch.zeros(1, 4, 8, 8), torch.tensor([1.0]), cond, stage=1, stale={})


@pytest.mark.parametrize("mode", [Mode.HYBRID, Mode.PIPELINE])
def test_each_stage_is_fed_the_previous_step_output_of_the_other(local, mode):
    # tau_cap=2 with a window longer than the run: tau1 comes from the fallback (the reference
    # SDXL code crashes there), then warm-up at step 3 and pipeline steps 4..6.
    knobs = HybridKnobs(window=50, eps_slope=0.4e-3, k=4, tau_cap=2, pipeline_warmup=3)
    report, steps = recorded_run(local, PROMPT, NEGATIVE, image_request(mode, knobs=knobs))
    piped = pipeline_steps(report)
    if mode is Mode.HYBRID:
        assert report.schedule["tau_source"] == "tau_cap"
        assert piped == [4, 5, 6]
    else:
        assert piped == list(range(3, STEPS))
    previous_feeds = {}
    for t in piped:
        produced_before = {}
        for _, _, output in steps[t - 1]:
            produced_before.update(output.activations)
        for device, task, _ in steps[t]:
            assert task.stage == device
            for name, fed in task.stale.items():
                # Fed exactly what the other stage produced one step earlier ...
                assert torch.equal(fed, produced_before[name]), (t, name)
                # ... which changes every step (the reference SD3 code froze it).
                if name in previous_feeds:
                    assert not torch.equal(fed, previous_feeds[name]), (t, name)
                previous_feeds[name] = fed
    assert set(previous_feeds) == {"MIDDLE_ACT", "HEAD_ACT"}


def test_pipeline_output_stays_close_to_serial(local):
    serial, _, _ = local.generate(PROMPT, image_request(Mode.SERIAL), NEGATIVE)
    hybrid, report, _ = local.generate(PROMPT, image_request(Mode.HYBRID), NEGATIVE)
    assert report.schedule["phase_steps"].get("pipeline", 0) >= 1
    assert not np.array_equal(serial, hybrid)  # stale activations do change the result ...
    mse = np.mean((serial.astype(np.float64) - hybrid.astype(np.float64)) ** 2)
    assert 10 * np.log10(255**2 / mse) > 15  # ... but not into a different image


@pytest.mark.parametrize("mode", [Mode.SERIAL, Mode.CFG_PARALLEL, Mode.PIPELINE, Mode.HYBRID])
def test_no_guidance_runs_and_reports_the_mode(local, mode):
    image, report, latents = local.generate(PROMPT, image_request(mode, guidance_scale=1.0), NEGATIVE)
    expected = "pipeline" if mode is Mode.PIPELINE else "serial"
    assert report.schedule["mode_run"] == expected
    assert report.schedule["guidance"] is False
    assert torch.isfinite(latents).all()
    if mode is not Mode.PIPELINE:
        reference, _, _ = local.generate(PROMPT, image_request(Mode.SERIAL, guidance_scale=1.0), NEGATIVE)
        assert np.array_equal(image, reference)

"""Requests meeting on one device share a forward and still get their own results."""

import pytest
import torch

from hybridiff.batching import batch_key, run_tasks
from hybridiff.local import LocalPipeline
from hybridiff.loop import DenoiseTask


@pytest.fixture(scope="module")
def local(sdxl_tiny) -> LocalPipeline:
    return LocalPipeline("sdxl", sdxl_tiny, devices=1)


def task(local, seed: int, timestep: float, branches: int, stage=None, stale=None, capture_stage=None):
    cond = local.branch_conditioning(f"prompt {seed}", "blurry")
    names = ("uncond", "cond")[-branches:]
    merged = {k: torch.cat([cond[b][k] for b in names]) for k in cond["cond"]}
    merged.update({k: v.expand(branches, -1) for k, v in local.latent_math.extra_conditioning(64, 64).items()})
    sample = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(seed))
    return DenoiseTask(sample, torch.tensor([timestep]), merged, stage, stale or {}, capture_stage, True)


def test_whole_passes_are_merged_and_split_back(local):
    denoiser = local.denoisers[0]
    tasks = [task(local, 1, 900.0, 2), task(local, 2, 450.0, 1), task(local, 3, 20.0, 2)]
    assert len({batch_key(t) for t in tasks}) == 1
    outputs = run_tasks(denoiser, tasks)
    for t, out in zip(tasks, outputs, strict=True):
        solo = denoiser.run(t.sample, t.timestep, t.cond)
        assert out.batched_requests == 3
        assert out.eps.shape == solo.eps.shape
        torch.testing.assert_close(out.eps, solo.eps, rtol=1e-4, atol=1e-5)


def test_stage_runs_are_not_merged(local):
    denoiser = local.denoisers[0]
    whole = task(local, 1, 500.0, 1)
    head = denoiser.run(whole.sample, whole.timestep, whole.cond, capture_stage=1).activations
    staged = task(local, 1, 500.0, 1, stage=0, stale=head)
    assert batch_key(staged) is None
    outputs = run_tasks(denoiser, [whole, staged])
    assert [o.batched_requests for o in outputs] == [1, 1]
    assert outputs[1].eps is None and "MIDDLE_ACT" in outputs[1].activations

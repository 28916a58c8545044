"""The fidelity harness (bench/fidelity.py) and its test-only reproduction of the reference's SD3 frozen feed."""

from __future__ import annotations

import dataclasses
import statistics

import numpy as np
import pytest
import torch

from bench.fidelity import FROZEN, Config, configs, markdown, summarize
from bench.frozen_feed import FrozenStageFeed
from hybridiff.local import LocalPipeline
from hybridiff.loop import ImageRequest, InProcessTransport
from hybridiff.schedule import HybridKnobs, Mode

PROMPT = "a red circle on the left"
# tau1 from tau_cap at step 3: warm-up at step 4, pipeline steps 5..8 (k=5), then partitioning again.
REQUEST = ImageRequest(seed=1, steps=12, guidance_scale=7.0, height=64, width=64, mode=Mode.HYBRID,
                       knobs=HybridKnobs(window=50, eps_slope=0.5e-3, k=5, tau_cap=3))


class Recording(InProcessTransport):
    """The correct transport, remembering what stage 1 was fed."""

    def __init__(self, denoisers) -> None:
        super().__init__(denoisers)
        self.feeds: list[dict] = []

    async def denoise(self, device, task):
        if task.stage is not None and task.stale:
            self.feeds.append(task.stale)
        return await super().denoise(device, task)


def test_frozen_feed_sends_one_wrong_recording_to_every_pipeline_step(sd3_tiny):
    local = LocalPipeline("sd3", sd3_tiny, devices=2)
    correct = Recording(local.denoisers)
    local.transport = correct
    right, report, _ = local.generate(PROMPT, REQUEST)
    assert report.schedule["phase_steps"]["pipeline"] == 4
    frozen = FrozenStageFeed(correct)
    local.transport = frozen
    stage1 = local.denoisers[1].model  # device 1 runs the conditional branch and owns stage 1
    half = len(stage1.transformer_blocks) // 2
    outputs: list = []
    hook = stage1.transformer_blocks[half].register_forward_hook(lambda module, args, out: outputs.append(out))
    try:
        wrong, _, _ = local.generate(PROMPT, REQUEST)
    finally:
        hook.remove()

    assert len(frozen.feeds_sent) == 4
    for feed in frozen.feeds_sent[1:]:  # frozen: the first pipeline step's feed, every step
        assert all(torch.equal(feed[name], frozen.feeds_sent[0][name]) for name in feed)
    correct_feeds = correct.feeds[:4]  # the correct run: stage 0's fresh output each step
    assert not all(torch.equal(correct_feeds[1][n], correct_feeds[0][n]) for n in correct_feeds[0])
    # The recording is block n/2's (stage 1's first block) on device 1 at the warm-up (its 5th call: steps 0-3
    # partition, step 4 the warm-up), not block n/2-1's that the correct run sends.
    encoder, hidden = outputs[4]
    assert torch.equal(frozen.feeds_sent[0]["MIDDLE_HIDDEN"], hidden)
    assert torch.equal(frozen.feeds_sent[0]["MIDDLE_ENCODER"], encoder)
    assert not torch.equal(frozen.feeds_sent[0]["MIDDLE_HIDDEN"], correct_feeds[0]["MIDDLE_HIDDEN"])
    assert not np.array_equal(right, wrong)
    # The wrapper leaves the denoisers as it found them: the correct run is unchanged afterwards.
    local.transport = correct
    assert np.array_equal(local.generate(PROMPT, REQUEST)[0], right)


def test_frozen_feed_is_refused_for_sdxl(sdxl_tiny):
    local = LocalPipeline("sdxl", sdxl_tiny, devices=2)
    with pytest.raises(ValueError, match="SD3"):
        FrozenStageFeed(local.transport)


def test_configs_start_with_serial_and_add_no_guidance_the_ablation_and_the_frozen_runs():
    labels = [c.label for c in configs((0, 5, 10), frozen_feed=True, default_k=5)]
    assert labels == ["serial", "cfg_parallel", "hybrid", "serial (guidance 1)", "hybrid k=0", "hybrid k=10",
                      "hybrid" + FROZEN, "hybrid k=0" + FROZEN, "hybrid k=10" + FROZEN]
    assert Config("hybrid", 20).label == "hybrid k=20"


def test_summary_scores_fidelity_against_serial_and_counts_tau_sources():
    black = np.zeros((64, 64, 3), np.uint8)
    red_left = black.copy()
    red_left[24:40, 4:20] = (220, 40, 40)
    prompts = ["a red square on the left", "a red square on the left"]
    schedule = {"mode_run": "serial", "phases": ["serial"] * 4, "tau1": None, "tau2": None, "tau_source": None}
    hybrid = [dict(schedule, mode_run="hybrid", phases=["partition"] * 4, tau1=t, tau2=t + 1, tau_source=src)
              for t, src in ((2, "slope"), (3, "tau_cap"))]
    results = {
        "serial": {"images": [red_left, red_left], "schedules": [schedule] * 2, "seconds": [2.0, 2.0]},
        "hybrid": {"images": [red_left, black], "schedules": hybrid, "seconds": [1.0, 4.0]},
    }

    def ideal(s):
        return 2.0 * len(s["phases"]) if s["mode_run"] == "serial" else 1.0 * len(s["phases"])

    rows = summarize(prompts, results, ideal)
    assert rows["serial"]["psnr_vs_serial_db"] == float("inf") and rows["serial"]["slope_fraction"] is None
    assert rows["serial"]["colour+position"] == 1.0
    assert rows["hybrid"]["colour+position"] == 0.5
    assert rows["hybrid"]["tau_source"] == {"slope": 1, "tau_cap": 1}
    assert rows["hybrid"]["slope_fraction"] == 0.5
    assert rows["hybrid"]["speedup_ideal"] == 2.0
    assert rows["hybrid"]["speedup_measured"] == pytest.approx(statistics.median([2.0, 0.5]))
    assert 0 < rows["hybrid"]["psnr_vs_serial_db"] < 40
    table = "\n".join(markdown("**t**", rows, default_k=5))
    assert "| hybrid | 50% |" in table and "slope 1, tau_cap 1 of 2" in table
    assert "| 5 | " in table  # the k table names the default k


def test_frozen_row_reports_psnr_against_the_correct_feed():
    image = np.zeros((64, 64, 3), np.uint8)
    other = image.copy()
    other[0, 0] = 255
    schedule = {"mode_run": "hybrid", "phases": ["partition"], "tau1": 1, "tau2": 2, "tau_source": "slope"}
    run = {"schedules": [schedule], "seconds": [1.0]}
    results = {"serial": {**run, "images": [image]}, "hybrid": {**run, "images": [image]},
               "hybrid" + FROZEN: {**run, "images": [other]}}
    rows = summarize(["a red circle on the left"], results, lambda s: 1.0)
    # One pixel (all three channels) off by 255: MSE = 255^2 / (64 * 64).
    assert rows["hybrid" + FROZEN]["psnr_vs_correct_feed_db"] == pytest.approx(10 * np.log10(64 * 64))
    assert "psnr_vs_correct_feed_db" not in rows["hybrid"]


def test_replay_finds_tau1_by_the_slope_or_by_tau_cap_as_the_schedule_does():
    from bench.tune_knobs import grid_table, replay_tau1

    dip = [0.06, 0.05, 0.04, 0.035, 0.034, 0.034, 0.034, 0.04, 0.05, 0.06]  # falls, flattens, rises
    knobs = HybridKnobs(window=3, eps_slope=1e-3, k=2, tau_cap=8)
    # Slopes (m[t-2] - m[t]) / 3: t=5: (0.035-0.034)/3 = 0.00033 < 1e-3, the first in [0, eps) from t=3 on.
    assert replay_tau1(dip, knobs) == (5, "slope")
    assert replay_tau1(dip, dataclasses.replace(knobs, eps_slope=0.0)) == (8, "tau_cap")  # [0, 0) holds no slope
    rows = grid_table([dip, dip], windows=[3], eps_slopes=[0.0, 1e-3], tau_caps=[8])
    assert [(r["eps_slope"], r["slope_fraction"], r["tau1_median"]) for r in rows] == [(1e-3, 1.0, 5), (0.0, 0.0, 8)]

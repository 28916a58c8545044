"""Failover: the policy on given states, the loop over an in-process transport whose device dies,
the down marks on the in-flight board, and which Triton errors mean a device is gone."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging

import pytest

from hybridiff.deadline import BoardView, Costs, Running
from hybridiff.inflight import DOWN_RETRY_SECONDS, InFlightBoard
from hybridiff.local import LocalPipeline
from hybridiff.loop import DenoiseTask, DeviceUnavailable, ImageRequest, InProcessTransport, RunHooks, denoise_image
from hybridiff.schedule import (
    GuidanceSchedule,
    HybridKnobs,
    Mode,
    NoDeviceLeft,
    failover_device,
    may_yield,
    place_request,
    yield_device,
)
from tests.helpers import max_pixel_diff

KNOBS = HybridKnobs(window=3, eps_slope=0.4e-3, k=4, tau_cap=4)  # tau1 = 4: pipeline from step 5
PROMPT = "a watercolor fox in a snowy forest"


# --- the policy -----------------------------------------------------------------------------


def schedule(mode: Mode, **fields) -> GuidanceSchedule:
    return GuidanceSchedule(mode, 12, KNOBS, guidance=True, **fields)


def test_failover_prefers_the_surviving_device_the_run_already_holds():
    partition = schedule(Mode.CFG_PARALLEL, pair=(1, 2), devices=3)
    assert failover_device(partition, 2, up=[True, True, True], loads=[0, 5, 5]) == 1


def test_failover_of_a_serial_run_goes_to_the_least_loaded_device_that_is_up():
    serial = schedule(Mode.SERIAL, device=0, devices=4)
    assert failover_device(serial, 0, up=[True, True, False, True], loads=[1, 3, 0, 1]) == 3
    assert failover_device(serial, 0, up=[True, True, True, True]) == 1  # no loads: lowest index


def test_failover_with_no_survivor_is_none():
    assert failover_device(schedule(Mode.HYBRID), 1, up=[False, True]) is None
    assert failover_device(schedule(Mode.SERIAL, devices=1, pair=(0, 0)), 0, up=[True]) is None


def test_explicit_modes_fail_over_and_the_schedule_reports_it():
    run = schedule(Mode.CFG_PARALLEL)
    assert run.summary([])["failover"] == []
    run.fail_over(3, 1, 0)
    assert run.effective_mode is Mode.SERIAL and run.devices_in_use == (0,)
    assert [(a.device, a.branches) for a in run.plan(3).assignments] == [(0, ("uncond", "cond"))]
    summary = run.summary([])
    assert summary["failover"] == [{"device": 1, "step": 3, "continued_on": 0}]
    assert summary["mode_requested"] == "cfg_parallel" and summary["serial_from_step"] == 3


def test_a_pipeline_run_fails_over_in_its_pipeline_phase():
    run = schedule(Mode.HYBRID)
    for t in range(6):
        run.plan(t)
        run.observe(t, 0.5)
    assert run.pipeline_started(6)
    run.fail_over(6, 0, 1)  # allowed, unlike a yield
    assert run.plan(6).phase.value == "serial" and run.plan(6).assignments[0].device == 1


def test_only_auto_may_yield_a_device():
    explicit = schedule(Mode.HYBRID)
    placed_by_auto = schedule(Mode.HYBRID, mode_requested=Mode.AUTO)
    assert not may_yield(explicit, 0) and yield_device(explicit, 0, [2, 1]) is None
    assert may_yield(placed_by_auto, 0) and yield_device(placed_by_auto, 0, [2, 1]) == 1


@pytest.mark.parametrize("mode", [Mode.AUTO, Mode.SERIAL, Mode.CFG_PARALLEL, Mode.HYBRID])
def test_placement_ignores_down_devices(mode):
    placement = place_request(mode, [0, 0], guidance=True, up=[False, True])
    assert placement.devices == (1,)
    assert placement.device == 1


def test_placement_with_every_device_down_raises():
    with pytest.raises(NoDeviceLeft, match="all 2 devices are down"):
        place_request(Mode.AUTO, [0, 0], guidance=True, up=[False, False])


# --- the loop -------------------------------------------------------------------------------


class DyingTransport(InProcessTransport):
    """Device ``dead`` answers its first ``survives`` calls, then is gone for good."""

    def __init__(self, denoisers, dead: set[int], survives: int) -> None:
        super().__init__(denoisers)
        self.dead, self.survives = dead, survives
        self.calls: dict[int, int] = {}

    async def denoise(self, device: int, task: DenoiseTask):
        self.calls[device] = self.calls.get(device, 0) + 1
        if device in self.dead and self.calls[device] > self.survives:
            raise DeviceUnavailable(device, f"denoiser_{device}: Stub process 'denoiser_{device}_0_0' is not healthy.")
        return await super().denoise(device, task)


class RecordingHooks(RunHooks):
    def __init__(self, up: list[bool]) -> None:
        self.up, self.failed, self.occupied = up, [], []

    def device_failed(self, device: int) -> list[bool]:
        self.failed.append(device)
        self.up[device] = False
        return list(self.up)

    def occupy(self, devices) -> None:
        self.occupied.append(tuple(devices))


@pytest.fixture(scope="module")
def local(sdxl_tiny) -> LocalPipeline:
    return LocalPipeline("sdxl", sdxl_tiny)


def request(mode: Mode) -> ImageRequest:
    return ImageRequest(seed=5, steps=12, guidance_scale=5.0, height=64, width=64, mode=mode, knobs=KNOBS)


def run(local: LocalPipeline, req: ImageRequest, transport, hooks=None):
    cond = local.branch_conditioning(PROMPT, "blurry")
    latents, report = asyncio.run(denoise_image(local.family, local.latent_math, transport, cond, req, hooks))
    return local.decoder.decode(latents)[0], report


@pytest.fixture(scope="module")
def serial_image(local):
    return run(local, request(Mode.SERIAL), InProcessTransport(local.denoisers))[0]


@pytest.mark.parametrize("mode", [Mode.CFG_PARALLEL, Mode.HYBRID, Mode.SERIAL])
def test_a_device_dying_before_the_pipeline_gives_the_serial_image(local, serial_image, mode):
    dead = 0 if mode is Mode.SERIAL else 1
    transport = DyingTransport(local.denoisers, dead={dead}, survives=3)
    hooks = RecordingHooks([True, True])
    image, report = run(local, request(mode), transport, hooks)
    schedule = report.schedule
    assert schedule["failover"] == [{"device": dead, "step": 3, "continued_on": 1 - dead}]
    assert schedule["phases"][3:] == ["serial"] * 9 and len(schedule["phases"]) == 12
    assert schedule["mode_requested"] == mode.value and schedule["mode_run"] == "serial"
    assert hooks.failed == [dead] and hooks.occupied == [(1 - dead,)]
    assert max_pixel_diff(image, serial_image) <= 1


def test_a_device_dying_in_the_pipeline_phase_continues_serially_from_the_current_latents(local):
    # Calls per device: steps 0-4 partition, 5 warm-up, 6 pipeline: the 7th call on device 0 fails.
    transport = DyingTransport(local.denoisers, dead={0}, survives=6)
    image, report = run(local, request(Mode.HYBRID), transport, RecordingHooks([True, True]))
    schedule = report.schedule
    assert schedule["tau1"] == 4
    assert schedule["phases"][:7] == ["partition"] * 5 + ["warmup", "serial"]
    assert schedule["failover"] == [{"device": 0, "step": 6, "continued_on": 1}]
    assert image.shape == (64, 64, 3)


def test_without_hooks_the_loop_still_fails_over(local, serial_image):
    transport = DyingTransport(local.denoisers, dead={1}, survives=0)
    image, report = run(local, request(Mode.CFG_PARALLEL), transport)
    assert report.schedule["failover"] == [{"device": 1, "step": 0, "continued_on": 0}]
    assert max_pixel_diff(image, serial_image) <= 1


def test_no_device_left_raises(local):
    transport = DyingTransport(local.denoisers, dead={0, 1}, survives=2)
    with pytest.raises(NoDeviceLeft, match="no device left to run step 2 of 12"):
        run(local, request(Mode.CFG_PARALLEL), transport, RecordingHooks([True, True]))


def test_a_device_the_board_says_is_down_is_not_a_failover_target(local):
    # Device 0 dies under a serial run, and the board already says device 1 is down.
    transport = DyingTransport(local.denoisers, dead={0}, survives=1)
    with pytest.raises(NoDeviceLeft):
        run(local, request(Mode.SERIAL), transport, RecordingHooks([True, False]))


def test_an_error_that_is_not_a_device_failure_is_not_failed_over(local):
    class Broken(InProcessTransport):
        async def denoise(self, device, task):
            raise ValueError("bad input")

    with pytest.raises(ValueError, match="bad input"):
        run(local, dataclasses.replace(request(Mode.SERIAL), steps=2), Broken(local.denoisers))


class BoardViewHooks(RunHooks):
    """A board whose view gets a newcomer (2 s of work, 2.2 s to its deadline) on device 0 after step 1."""

    def __init__(self) -> None:
        self.progress, self.occupied = [], []

    def board_view(self) -> BoardView:
        others = [Running((0,), 2.0, 2.2)] if len(self.progress) >= 2 else []
        return BoardView([1 + len(others), 1], Running((0, 1), 1.0, None, True), others, Costs(step_s=0.1))

    def advanced(self, steps_left, may_yield, sample) -> None:
        self.progress.append((steps_left, may_yield, sample))

    def occupy(self, devices) -> None:
        self.occupied.append(tuple(devices))


def test_the_loop_reports_steps_left_and_costs_and_yields_when_a_deadline_needs_it(local, serial_image):
    hooks = BoardViewHooks()
    placed_by_auto = dataclasses.replace(request(Mode.HYBRID), mode_requested=Mode.AUTO)
    image, report = run(local, placed_by_auto, InProcessTransport(local.denoisers), hooks)
    assert report.schedule["serial_from_step"] == 2 and hooks.occupied == [(1,)]  # gave device 0 to the newcomer
    assert [left for left, _, _ in hooks.progress] == list(range(11, -1, -1))
    assert [may for _, may, _ in hooks.progress] == [True, True] + [False] * 10
    assert [sample.kind for _, _, sample in hooks.progress] == ["split"] * 2 + ["serial"] * 10
    assert all(sample.batched == 1 and sample.wall_s >= sample.compute_s > 0 for _, _, sample in hooks.progress)
    assert max_pixel_diff(image, serial_image) <= 1


class GrowingBoardHooks(RunHooks):
    """A board on which device 0 idles from step 2 on, until a newcomer is placed there before step 6."""

    def __init__(self) -> None:
        self.steps_done, self.occupied = 0, []

    def board_view(self) -> BoardView:
        me = Running((1,), 1.0)
        if self.steps_done < 2:
            return BoardView([1, 1], me, [Running((0,), 5.0)], Costs(step_s=0.1))
        if self.steps_done < 6:
            return BoardView([0, 1], me, [], Costs(step_s=0.1))
        return BoardView([2, 1], Running((0, 1), 1.0, None, True), [Running((0,), 2.0)], Costs(step_s=0.1))

    def advanced(self, steps_left, may_yield, sample) -> None:
        self.steps_done += 1

    def occupy(self, devices) -> None:
        self.occupied.append(tuple(devices))


def test_an_auto_serial_run_grows_onto_an_idle_device_and_gives_it_back_with_the_serial_image(local, serial_image):
    hooks = GrowingBoardHooks()
    placed_by_auto = dataclasses.replace(request(Mode.SERIAL), device=1, mode_requested=Mode.AUTO)
    image, report = run(local, placed_by_auto, InProcessTransport(local.denoisers), hooks)
    schedule = report.schedule
    assert schedule["grew"] == [{"step": 2, "device": 0}] and schedule["serial_from_step"] == 6
    assert schedule["phases"] == ["serial"] * 2 + ["partition"] * 4 + ["serial"] * 6
    assert hooks.occupied == [(0, 1), (1,)]  # took device 0, then gave it to the newcomer
    assert max_pixel_diff(image, serial_image) <= 1


# --- the board ------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_down_device_is_avoided_then_probed_by_one_request_then_cleared(tmp_path):
    clock = Clock()
    board = InFlightBoard(tmp_path / "board.json", 2, clock=clock)
    assert board.mark_down(1) == [True, False]
    seen = []

    def choose(snapshot):
        seen.append(snapshot.up)
        placement = place_request(Mode.AUTO, snapshot.loads, True, snapshot.up)
        return placement, placement.devices

    with board.occupy(choose) as placed:
        assert placed.decision.devices == (0,) and placed.probing == set()
    clock.now += DOWN_RETRY_SECONDS
    with board.occupy(choose) as probe:
        assert probe.decision.devices == (0, 1) and probe.probing == {1}  # the mark expired: one probe
        assert board.up() == [True, False]  # others keep off while the probe runs
        board.mark_up(1)  # the probe's call answered
        assert board.up() == [True, True]
    assert seen == [[True, False], [True, True]]


def test_a_failed_probe_renews_the_mark(tmp_path):
    clock = Clock()
    board = InFlightBoard(tmp_path / "board.json", 2, clock=clock)
    board.mark_down(0)
    clock.now += DOWN_RETRY_SECONDS + 1
    assert board.up() == [True, True]
    assert board.mark_down(0) == [False, True]


@pytest.mark.parametrize("content", ['{"entries": {"a": {"pid": 1', "garbage", "[1, 2]", '{"a": {"pid": 1}}',
                                     '{"entries": {"k": {"pid": "x", "devices": [0]}}, "down": {}}'])
def test_a_corrupt_board_is_reset_with_a_log_line(tmp_path, caplog, content):
    path = tmp_path / "board.json"
    path.write_text(content)
    board = InFlightBoard(path, 2)
    assert board.loads() == [0, 0] and board.up() == [True, True]
    with caplog.at_level(logging.WARNING, logger="hybridiff.inflight"):
        with board.occupy(lambda seen: (None, (1,))):
            assert board.loads() == [0, 1]
    assert "unreadable" in caplog.text and "reset" in caplog.text
    assert json.loads(path.read_text()) == {"entries": {}, "down": {}, "costs": {}}


# --- Triton errors --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "code,message,gone",
    [
        ("INTERNAL", "Stub process 'sdxl_denoiser_1_0_0' is not healthy.", True),
        ("INTERNAL", "Failed to process the request(s) for model 'sdxl_denoiser_1_0_0', message: Stub process "
                     "'sdxl_denoiser_1_0_0' is not healthy.", True),
        ("NOT_FOUND", "Request for unknown model: 'sdxl_denoiser_1' is not found", True),
        ("UNAVAILABLE", "Request for unknown model: 'sdxl_denoiser_1' version 1 is not at ready state", True),
        ("INTERNAL", "Request for unknown model: 'sdxl_denoiser_1' has no available versions", True),
        ("INVALID_ARG", "unexpected shape for input 'SAMPLE' for model 'sdxl_denoiser_1'", False),
        ("INVALID_ARG", "model 'sdxl_denoiser_1' is not ready", False),  # a request error is never a failover
        ("INTERNAL", "CUDA out of memory. Tried to allocate 2.00 GiB", False),
    ],
)
def test_which_errors_mean_the_device_is_gone(code, message, gone):
    from hybridiff.triton.bls import device_gone

    assert device_gone(code, message) is gone


@pytest.mark.parametrize(
    "code, message, decoded",
    [
        # Triton 2.51 hands a BLS caller every error as INTERNAL; our models mark their code in the message.
        ("INTERNAL", "[INVALID_ARG] PROMPT: prompt is 257 tokens for the T5 text encoder; at most 256",
         ("INVALID_ARG", "PROMPT: prompt is 257 tokens for the T5 text encoder; at most 256", True)),
        ("INTERNAL", "[UNAVAILABLE] sdxl_vae is unavailable (Stub process 'sdxl_vae_0_0' is not healthy.)",
         ("UNAVAILABLE", "sdxl_vae is unavailable (Stub process 'sdxl_vae_0_0' is not healthy.)", True)),
        ("INTERNAL", "Stub process 'sd3_text_encoder_0_0' is not healthy.",
         ("INTERNAL", "Stub process 'sd3_text_encoder_0_0' is not healthy.", False)),
        ("INTERNAL", "[NOT_A_CODE] odd", ("INTERNAL", "[NOT_A_CODE] odd", False)),
        ("INTERNAL", "Exceeds maximum queue size", ("UNAVAILABLE", "Exceeds maximum queue size", False)),
    ],
)
def test_the_code_an_internal_model_answered_survives_bls(code, message, decoded):
    from hybridiff.triton.bls import CODES, decode_error, encode_error

    assert decode_error(code, message) == decoded
    for name in CODES:
        assert decode_error("INTERNAL", encode_error("STEPS: 0 outside", name)) == (name, "STEPS: 0 outside", True)


def test_a_run_stopped_by_an_error_releases_its_devices(tmp_path):
    """A cancelled or timed-out run raises out of the loop: its devices must not stay busy on the board."""
    board = InFlightBoard(tmp_path / "board.json", 2)
    with pytest.raises(RuntimeError, match="cancelled"):
        with board.occupy(lambda seen: (None, (0, 1))):
            assert board.loads() == [1, 1]
            raise RuntimeError("cancelled")
    assert board.loads() == [0, 0]

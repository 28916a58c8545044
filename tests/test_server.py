"""The real tritonserver on a generated repository: every mode over HTTP and gRPC, concurrency,
bad input. One server for the module (it takes a few seconds to load every model)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from tritonclient.utils import InferenceServerException

from client.generate import generate, make_client
from export.make_repository import Deployment, write_repository
from hybridiff.params import Limits
from tests.helpers import in_parallel, max_pixel_diff, server_board
from tools.triton_process import TritonServer

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
        assert max_pixel_diff(image, serial_image) <= 1
        assert max_pixel_diff(image, local_images["serial"]) <= 1
    else:
        assert max_pixel_diff(image, local_images[mode]) <= 1
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
    served, hybrid = in_parallel([lambda: call(server, "grpc", mode="serial"),
                                  lambda: call(server, "http", mode="hybrid", **HYBRID_KNOBS)])
    results = {"serial": served.images[0], "hybrid": hybrid.images[0]}
    # <= 1 rather than equal: passes that meet on a device may be batched together.
    assert max_pixel_diff(results["serial"], serial_image) <= 1
    assert max_pixel_diff(results["hybrid"], solo_hybrid) <= 1


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


def test_auto_is_the_default_and_runs_hybrid_when_alone(server):
    schedule = call(server, "http", **HYBRID_KNOBS).schedules[0]
    assert schedule["mode_requested"] == "auto"
    assert schedule["mode_run"] == "hybrid" and schedule["devices"] == [0, 1]
    assert schedule["loads_seen"] == [0, 0]


def test_auto_under_load_runs_serial_on_the_least_busy_device_with_the_solo_image(server):
    """The first request finds both devices idle and runs hybrid; two more arrive while it partitions, and
    it goes on serially on one device."""
    from client.generate import start_generate

    # The others are sent once the first is on the board, and its pipeline phase is far off (the slope
    # test fires at step 30 of 64 for these seeds): placing them takes a text-encoder pass and the
    # admission and input checks each, which on a loaded machine (CI) once took longer than 20 steps.
    long = {**BASE, "steps": 64, **HYBRID_KNOBS, "tau_cap": 56}
    board = server_board(server)
    client = make_client("grpc", server.grpc_url)
    try:
        pending = [start_generate(client, "sdxl", [PROMPT], **{**long, "seed": 11})]
        _wait_for_jobs(board, 1)
        pending += [start_generate(client, "sdxl", [PROMPT], **{**long, "seed": s}) for s in (12, 13)]
        results = [p.result(300) for p in pending]
    finally:
        client.close()
    schedules = [r.schedules[0] for r in results]
    first = [s for s in schedules if s["loads_seen"] == [0, 0]]
    assert len(first) == 1, schedules  # the first to arrive found both devices idle: placed hybrid ...
    # ... and, with others arriving before its pipeline phase, went on serially on one device.
    assert first[0]["mode_run"] == "serial" and first[0]["serial_from_step"] is not None, first
    assert first[0]["phases"][0] == "partition" and len(first[0]["devices"]) == 1
    for result, schedule in zip(results, schedules, strict=True):
        assert schedule["deadline_left_s"] is None  # no timeout sent
        # A serial run takes the other device once it idles (partitioned from then on), and gives it back
        # (serial again) when another request is placed there.
        grew_at = [g["step"] for g in schedule["grew"]]
        if schedule["mode_run"] == "cfg_parallel":
            assert grew_at, schedule
        else:
            assert schedule["mode_run"] == "serial", schedule
            assert not grew_at or schedule["serial_from_step"] is not None, schedule
        if schedule is not first[0]:
            assert max(schedule["loads_seen"]) > 0
            assert schedule["serial_from_step"] is None or min(grew_at, default=99) < schedule["serial_from_step"]
            if schedule["placed_by"] == "count" and not schedule["grew"]:  # else: test_auto_places_by_remaining_work
                assert schedule["devices"] == [min(range(2), key=lambda d: (schedule["loads_seen"][d], d))]
        solo = call(server, "http", **{**long, "seed": schedule["seed"], "mode": "serial"}).images[0]
        assert max_pixel_diff(result.images[0], solo) <= 1


def _wait_for_jobs(board, count: int, timeout_s: float = 60.0) -> None:
    end = time.monotonic() + timeout_s
    while len(board.snapshot().jobs) < count:
        assert time.monotonic() < end, f"the board never held {count} requests: {board.snapshot()}"
        time.sleep(0.01)


def test_auto_places_by_remaining_work_and_carries_its_timeout_as_deadline(server):
    """Both devices run one request each, so the count rule would take device 0; device 0's request has
    far more work left (a larger image), and auto, with the board's learned step costs, takes device 1."""
    from client.generate import start_generate

    for size in (64, 256):  # a serial step of each size measured: the board knows their costs
        call(server, "http", mode="serial", steps=2, height=size, width=size)
    board = server_board(server)
    client = make_client("grpc", server.grpc_url)
    big = {**BASE, "mode": "serial", "steps": 64, "seed": 51, "height": 256, "width": 256}
    try:
        long = start_generate(client, "sdxl", [PROMPT], **big)
        _wait_for_jobs(board, 1)
        short = start_generate(client, "sdxl", [PROMPT], **{**BASE, "mode": "serial", "steps": 48, "seed": 52})
        _wait_for_jobs(board, 2)
        auto = start_generate(client, "sdxl", [PROMPT], timeout_s=120.0, **{**BASE, "steps": 40, "seed": 53})
        results = [pending.result(300) for pending in (long, short, auto)]
    finally:
        client.close()
    placed = [r.schedules[0] for r in results]
    assert [placed[0]["devices"], placed[1]["devices"]] == [[0], [1]], placed
    schedule = placed[2]
    assert schedule["loads_seen"] == [1, 1], schedule  # a tie by counts ...
    assert schedule["placed_by"] == "deadline" and schedule["devices"] == [1], schedule  # ... not by work left
    assert schedule["mode_run"] == "serial" and 0 < schedule["deadline_left_s"] <= 120.0
    assert schedule["predicted_s"] > 0
    solo = call(server, "http", **{**BASE, "steps": 40, "seed": 53, "mode": "serial"}).images[0]
    assert max_pixel_diff(results[2].images[0], solo) <= 1


def test_concurrent_serial_requests_spread_over_the_devices(server):
    from client.generate import start_generate

    board = server_board(server)
    client = make_client("grpc", server.grpc_url)
    try:  # the second is sent while the first runs (on the board), not by the luck of two threads
        first = start_generate(client, "sdxl", [PROMPT], **{**BASE, "mode": "serial", "steps": 40, "seed": 21})
        _wait_for_jobs(board, 1)
        second = start_generate(client, "sdxl", [PROMPT], **{**BASE, "mode": "serial", "steps": 40, "seed": 22})
        results = [first.result(300), second.result(300)]
    finally:
        client.close()
    devices = sorted(r.schedules[0]["devices"][0] for r in results)
    assert devices == [0, 1]


def test_a_corrupt_board_is_reset_and_the_next_request_is_served(server, serial_image):
    board = server_board(server)
    board.path.write_text('{"entries": {"1234-ab": {"pid": 1234, "dev')  # a write cut off half-way
    result = call(server, "grpc", mode="serial")
    assert max_pixel_diff(result.images[0], serial_image) <= 1
    assert board.snapshot().jobs == {}  # readable again, and nothing left on it
    assert "was unreadable" in server.logs()


def test_orchestrator_exports_schedule_metrics(server):
    import urllib.request

    call(server, "http", mode="hybrid", **HYBRID_KNOBS)
    text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    images = [line for line in text.splitlines() if line.startswith("hybridiff_images_total{")]
    assert any('mode_run="hybrid"' in line and 'family="sdxl"' in line for line in images), images
    assert "hybridiff_tau1_step_bucket" in text and "hybridiff_tau2_step_count" in text
    steps = {line.split('phase="')[1].split('"')[0]: float(line.rsplit(" ", 1)[1])
             for line in text.splitlines() if line.startswith("hybridiff_phase_steps_total{")}
    assert steps.get("pipeline", 0) >= 1 and steps.get("partition", 0) >= 1
    assert "hybridiff_phase_seconds_total{" in text


def test_locust_sweep_runs_clean_against_the_server(server, tmp_path):
    """The load test itself, bounded: Locust users over HTTP, no failure, images equal to solo runs."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "LOADTEST_SIZES": "64", "LOADTEST_STEPS": "6"}
    command = [
        sys.executable, "-m", "loadtest.run", "--url", server.http_url, "--metrics-url", server.metrics_url,
        "--modes", "auto,serial", "--users", "1,2", "--requests-per-user", "2", "--seconds", "60",
        "--out", str(tmp_path),
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    table = (tmp_path / "loadtest.md").read_text()
    assert "Failed requests: 0" in table and "max abs pixel difference" in table
    assert (tmp_path / "loadtest.png").stat().st_size > 0
    import csv
    import json

    rows = list(csv.DictReader((tmp_path / "loadtest.csv").read_text().splitlines()))
    assert [(r["mode"], r["users"]) for r in rows] == [("auto", "1"), ("auto", "2"), ("serial", "1"), ("serial", "2")]
    # The same work in every level: each user sent its quota of 2, one in each half (ABBA order).
    assert [int(r["requests"]) for r in rows] == [2, 4, 2, 4]
    assert all(len(json.loads(r["images_per_s_halves"])) == 2 for r in rows)


def test_every_thread_of_a_denoiser_is_pinned_to_its_core(server):
    """Affinity is per thread: the stub's execute thread must be pinned too, not only the one that ran initialize."""
    import os
    import subprocess

    for device in (0, 1):
        pids = subprocess.run(["pgrep", "-f", f"sdxl_denoiser_{device}/1/model.py"], capture_output=True,
                              text=True).stdout.split()
        pids = [p for p in pids if os.path.exists(f"/proc/{p}/task")]
        assert pids, f"no stub for sdxl_denoiser_{device}"
        cores = sorted(os.sched_getaffinity(0))
        for pid in pids:
            for tid in os.listdir(f"/proc/{pid}/task"):
                assert os.sched_getaffinity(int(tid)) == {cores[device % len(cores)]}, (device, pid, tid)

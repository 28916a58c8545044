"""Admission on the real server: with a tiny queue, the excess of a burst is refused at once with a
retryable UNAVAILABLE, and every request that was taken is served with its solo image."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from tritonclient.utils import InferenceServerException

from client.generate import generate, make_client
from export.make_repository import Deployment, write_repository
from hybridiff.admission import QueueLimits
from tests.helpers import max_pixel_diff
from tools.triton_process import TritonServer

pytestmark = pytest.mark.server

FIELDS = dict(steps=100, height=64, width=64, guidance_scale=5.0, mode="serial")
INSTANCES, QUEUE = 1, 1
BURST = 6


@pytest.fixture(scope="module")
def server(sdxl_tiny, tmp_path_factory):
    repo = tmp_path_factory.mktemp("repo") / "model_repository"
    deployment = Deployment(orchestrator_instances=INSTANCES, queues=QueueLimits(queue_size=QUEUE))
    write_repository(repo, {"sdxl": Path(sdxl_tiny)}, deployment)
    with TritonServer(repo, ready_timeout=240) as running:
        yield running


def call(server, protocol: str, seed: int):
    client = make_client(protocol, server.http_url if protocol == "http" else server.grpc_url)
    try:
        return generate(client, protocol, "sdxl", ["a lighthouse"], seed=seed, **FIELDS)
    finally:
        client.close()


def send(server, seed: int, timeout_s: float | None = None):
    """One request over gRPC with ``timeout_s`` as its timeout."""
    client = make_client("grpc", server.grpc_url)
    try:
        return generate(client, "grpc", "sdxl", ["a lighthouse"], timeout_s=timeout_s, seed=seed, **FIELDS)
    finally:
        client.close()


def test_a_burst_beyond_the_queue_is_refused_fast_and_the_rest_equals_its_solo_image(server):
    solo_started = time.perf_counter()
    call(server, "http", seed=0)  # warm, and how long one request takes alone
    solo_s = time.perf_counter() - solo_started
    outcomes: dict[int, tuple[str, object, float]] = {}

    def send(i: int) -> None:
        protocol = "grpc" if i % 2 else "http"
        started = time.perf_counter()
        try:
            outcomes[i] = ("served", call(server, protocol, seed=100 + i), time.perf_counter() - started)
        except InferenceServerException as err:
            outcomes[i] = ("refused", err, time.perf_counter() - started)

    threads = [threading.Thread(target=send, args=(i,)) for i in range(BURST)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert len(outcomes) == BURST
    served = {i: o for i, o in outcomes.items() if o[0] == "served"}
    refused = {i: o for i, o in outcomes.items() if o[0] == "refused"}
    # The server holds what its orchestrator runs and queues; the rest of the burst is refused.
    assert 1 <= len(served) <= INSTANCES + QUEUE, outcomes
    assert len(refused) >= BURST - INSTANCES - QUEUE
    for i, (_, err, seconds) in refused.items():
        assert err.status() in ("503", "StatusCode.UNAVAILABLE"), (i, err.status(), str(err))
        assert "queue" in str(err), str(err)  # Triton's "Exceeds maximum queue size"
        assert seconds < solo_s / 2, (i, seconds, solo_s)  # at once, not after waiting for a slot
    for i, (_, result, _) in served.items():
        solo = call(server, "http", seed=100 + i).images[0]
        assert max_pixel_diff(result.images[0], solo) <= 1


def test_the_server_keeps_serving_after_the_burst(server):
    assert call(server, "grpc", seed=7).images.shape == (1, 64, 64, 3)


def test_the_open_loop_test_runs_end_to_end_and_counts_refusals_apart_from_errors(server, tmp_path):
    """The open-loop driver itself, bounded and tiny: every level gets a row, nothing fails but by refusal."""
    import csv
    import subprocess
    import sys

    command = [
        sys.executable, "-m", "loadtest.openloop", "--url", server.grpc_url, "--modes", "serial,auto",
        "--processes", "poisson", "--loads", "0.5,2.0", "--steps", "4", "--sizes", "64", "--level-seconds", "2",
        "--min-requests", "4", "--solo-repeats", "1", "--capacity-rounds", "1", "--max-seconds", "240",
        "--out", str(tmp_path),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=400, cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = list(csv.DictReader((tmp_path / "openloop.csv").read_text().splitlines()))
    assert len(rows) == 2 * 3 * 2  # loads x SLO scales x modes
    assert {(r["load"], r["mode"]) for r in rows} == {(load, m) for load in ("0.5", "2.0") for m in ("serial", "auto")}
    assert all(int(r["errors"]) == 0 for r in rows), rows
    assert all(0.0 <= float(r["attainment"]) <= 1.0 for r in rows)
    assert "PARTIAL" not in (tmp_path / "openloop.md").read_text()
    assert (tmp_path / "openloop.png").stat().st_size > 0


@pytest.fixture(scope="module")
def gated_server(sdxl_tiny, tmp_path_factory):
    """Three orchestrator instances, but at most one request per device: the third must wait, then be refused."""
    repo = tmp_path_factory.mktemp("gated") / "model_repository"
    queues = QueueLimits(queue_size=2, start_timeout_us=300_000, max_per_device=1)
    write_repository(repo, {"sdxl": Path(sdxl_tiny)}, Deployment(orchestrator_instances=3, queues=queues))
    with TritonServer(repo, ready_timeout=240) as running:
        yield running


def test_the_orchestrator_gate_refuses_a_request_that_cannot_start_within_its_deadline(gated_server):
    outcomes: dict[int, tuple[str, object]] = {}

    def send(i: int) -> None:
        try:
            outcomes[i] = ("served", call(gated_server, "grpc", seed=200 + i))
        except InferenceServerException as err:
            outcomes[i] = ("refused", err)

    threads = []
    for i in range(3):
        threads.append(threading.Thread(target=send, args=(i,)))
        threads[-1].start()
        time.sleep(0.3)  # each takes its device before the next arrives
    for thread in threads:
        thread.join(timeout=300)
    served = [o for o in outcomes.values() if o[0] == "served"]
    refused = [o[1] for o in outcomes.values() if o[0] == "refused"]
    assert len(served) == 2 and len(refused) == 1, outcomes
    assert sorted(r.schedules[0]["devices"][0] for _, r in served) == [0, 1]
    assert refused[0].status() == "StatusCode.UNAVAILABLE" and "server full" in str(refused[0]), str(refused[0])


@pytest.fixture(scope="module")
def deadline_server(sdxl_tiny, tmp_path_factory):
    """Three orchestrator instances, admission by deadline on (the default)."""
    repo = tmp_path_factory.mktemp("deadline") / "model_repository"
    write_repository(repo, {"sdxl": Path(sdxl_tiny)}, Deployment(orchestrator_instances=3))
    with TritonServer(repo, ready_timeout=240) as running:
        yield running


def test_a_request_that_cannot_finish_within_its_timeout_beside_a_running_one_is_refused_at_once(deadline_server):
    server = deadline_server
    started = time.perf_counter()
    send(server, seed=1)  # warm, teaches the board this size's step cost, and how long one request takes alone
    solo_s = time.perf_counter() - started
    running: dict[str, object] = {}
    first = threading.Thread(target=lambda: running.setdefault("result", send(server, seed=2)))
    first.start()
    time.sleep(solo_s / 4)  # the first request is running on one device
    started = time.perf_counter()
    with pytest.raises(InferenceServerException) as refused:
        send(server, seed=3, timeout_s=solo_s / 3)  # no placement finishes 100 steps in a third of their solo time
    refused_s = time.perf_counter() - started
    assert refused.value.status() == "StatusCode.UNAVAILABLE", str(refused.value)
    assert "server full" in str(refused.value) and "cannot finish within its timeout" in str(refused.value)
    assert refused_s < solo_s / 4, (refused_s, solo_s)  # at once, not at the deadline
    generous = send(server, seed=4, timeout_s=20 * solo_s)  # the same request with time enough is served
    first.join(timeout=300)
    assert running["result"].images.shape == (1, 64, 64, 3)
    assert max_pixel_diff(generous.images[0], send(server, seed=4).images[0]) <= 1


@pytest.fixture(scope="module")
def one_slot_server(sdxl_tiny, tmp_path_factory):
    """One orchestrator instance and two places to wait: a second request waits for the first to finish."""
    repo = tmp_path_factory.mktemp("one-slot") / "model_repository"
    write_repository(repo, {"sdxl": Path(sdxl_tiny)}, Deployment(orchestrator_instances=1,
                                                                  queues=QueueLimits(queue_size=2)))
    with TritonServer(repo, ready_timeout=240) as running:
        yield running


def test_a_request_that_would_wait_past_its_timeout_is_refused_on_arrival_and_a_waiting_one_is_charged_its_wait(
    one_slot_server,
):
    from tests.helpers import server_board, wait_for

    server = one_slot_server

    started = time.perf_counter()
    send(server, seed=1)  # warm, teaches the board this size's step cost, and how long one request takes alone
    solo_s = time.perf_counter() - started
    board = server_board(server)
    running: dict[str, object] = {}
    first = threading.Thread(target=lambda: running.setdefault("result", send(server, seed=2)))
    first.start()
    assert wait_for(lambda: any(j["devices"] for j in board.snapshot().jobs.values()), 30, 0.01)
    # The one orchestrator instance is taken: a request with its solo time to live would start only after
    # the first finished, so it is refused now, not when an instance takes it.
    started = time.perf_counter()
    with pytest.raises(InferenceServerException) as refused:
        send(server, seed=3, timeout_s=solo_s)
    refused_s = time.perf_counter() - started
    assert refused.value.status() == "StatusCode.UNAVAILABLE", str(refused.value)
    assert "server full" in str(refused.value) and "behind the 1 requests" in str(refused.value), str(refused.value)
    assert refused_s < solo_s / 4, (refused_s, solo_s)
    # With time enough it waits for the instance; its deadline counts from its arrival, not from then.
    sent = time.perf_counter()
    waited = send(server, seed=4, timeout_s=4 * solo_s)
    first.join(timeout=300)
    schedule = waited.schedules[0]
    assert schedule["deadline_left_s"] is not None and schedule["deadline_left_s"] < 4 * solo_s - solo_s / 2, (
        schedule, solo_s)
    assert time.perf_counter() - sent > 1.5 * solo_s * 0.8  # it did wait for the first
    assert max_pixel_diff(waited.images[0], send(server, seed=4).images[0]) <= 1
    assert running["result"].images.shape == (1, 64, 64, 3)

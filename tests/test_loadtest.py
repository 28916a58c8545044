"""The load level's bookkeeping: every mode gets the same work (a quota per user), bounded in time."""

import itertools
import json
import time

import pytest

from loadtest.levels import HalfResult, pooled_row, queue_delta, sweep_order, user_requests
from loadtest.sink import Sink


def test_each_user_sends_exactly_its_quota_whoever_is_faster():
    sink = Sink(quota=2, deadline=time.perf_counter() + 60)
    # User 0 is fast: it may not take user 1's share, unlike a quota for the whole level.
    assert [sink.may_start(0) for _ in range(4)] == [True, True, False, False]
    assert not sink.finished_starting(users=2)
    assert sink.may_start(1) and sink.may_start(1) and not sink.may_start(1)
    assert sink.finished_starting(users=2)
    assert sink.in_flight == 4
    sink.record(0, {"mode": "serial"}, 1.0, None, RuntimeError("boom"))
    assert sink.in_flight == 3


def test_the_deadline_stops_new_requests():
    sink = Sink(quota=100, deadline=time.perf_counter() - 1)
    assert not sink.may_start(0)
    assert sink.finished_starting(users=3)


def test_second_halves_run_in_reverse_and_continue_each_users_sequence():
    halves = sweep_order(["serial", "hybrid", "auto"], requests_per_user=5)
    # ABBA: a mode measured early in the user count is also measured late.
    assert [(h.mode, h.index) for h in halves] == [
        ("serial", 0), ("hybrid", 0), ("auto", 0), ("auto", 1), ("hybrid", 1), ("serial", 1),
    ]
    for mode in ("serial", "hybrid", "auto"):
        first, second = [h for h in halves if h.mode == mode]
        assert (first.first_request, first.quota) == (0, 3)
        assert (second.first_request, second.quota) == (3, 2)
    with pytest.raises(ValueError, match="requests_per_user must be >= 2"):
        sweep_order(["serial"], requests_per_user=1)


def test_a_users_second_half_sends_what_one_long_level_would_have():
    whole = list(itertools.islice(user_requests("http", 3, "mix", 0), 7))
    assert list(itertools.islice(user_requests("http", 3, "mix", 4), 3)) == whole[4:]
    # Other users get other sequences; the mode named for the level is the one sent.
    assert whole != list(itertools.islice(user_requests("http", 2, "mix", 0), 7))
    assert {f["mode"] for _, f in itertools.islice(user_requests("grpc", 0, "hybrid", 2), 5)} == {"hybrid"}


def _result(latency: float, error: str | None = None, mode_run: str = "serial") -> dict:
    return {"latency_s": latency, "error": error, "mode_run": None if error else mode_run}


def test_a_row_pools_both_halves_images_over_total_time_and_queue_per_request():
    fast = HalfResult([_result(1.0), _result(2.0), _result(3.0, "boom")], span_s=4.0,
                      queue={"sdxl_denoiser_0": (3000.0, 2.0)})
    slow = HalfResult([_result(4.0, mode_run="hybrid"), _result(5.0)], span_s=12.0,
                      queue={"sdxl_denoiser_0": (9000.0, 2.0), "sdxl": (500.0, 1.0)})
    row = pooled_row("auto", 2, [fast, slow])
    assert (row["requests"], row["failures"]) == (5, 1)
    assert row["images_per_s"] == pytest.approx(4 / 16)  # not the mean of the halves' 0.5 and 0.167
    assert json.loads(row["images_per_s_halves"]) == [0.5, 0.167]
    assert row["p50_s"] == pytest.approx(3.0)
    assert json.loads(row["modes_run"]) == {"hybrid": 1, "serial": 3}
    assert json.loads(row["queue_ms_per_request"]) == {"sdxl_denoiser_0": 3.0, "sdxl": 0.5}


def test_queue_delta_keeps_denoisers_and_orchestrators_that_served_requests():
    before = {"sdxl_denoiser_0": (100.0, 1.0), "sdxl_vae": (0.0, 0.0)}
    after = {"sdxl_denoiser_0": (400.0, 4.0), "sdxl_vae": (50.0, 3.0), "sdxl": (0.0, 0.0)}
    assert queue_delta(before, after) == {"sdxl_denoiser_0": (300.0, 3.0)}

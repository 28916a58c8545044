"""The open-loop test's plain parts: arrival determinism and shape, ABBA order, SLO arithmetic."""

from __future__ import annotations

import json

import numpy as np
import pytest

from loadtest.openloop_levels import (
    Offered,
    Outcome,
    interarrival_gaps,
    level_order,
    level_row,
    met_slo,
    offered_requests,
    outcome_status,
    slo_passes,
    slo_timeouts,
)


def test_the_same_seed_offers_the_same_arrivals_and_requests():
    a = offered_requests(0.7, 30, "poisson", seed=5, sizes=[256, 320])
    b = offered_requests(0.7, 30, "poisson", seed=5, sizes=[256, 320])
    assert a == b
    assert a != offered_requests(0.7, 30, "poisson", seed=6, sizes=[256, 320])
    assert a[0].at_s == 0.0 and all(x.at_s < y.at_s for x, y in zip(a, a[1:], strict=False))
    assert {r.size for r in a} == {256, 320}


@pytest.mark.parametrize("process,cv", [("poisson", 1.0), ("bursty", 2.0), ("bursty", 3.0)])
def test_gaps_have_the_asked_mean_rate_and_variability(process, cv):
    gaps = interarrival_gaps(2.0, 200_000, process, np.random.default_rng(0), cv=cv)
    assert gaps.mean() == pytest.approx(0.5, rel=0.03)
    assert gaps.std() / gaps.mean() == pytest.approx(cv, rel=0.05)


def test_bad_arrival_parameters_name_the_field():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="rate"):
        interarrival_gaps(0.0, 3, "poisson", rng)
    with pytest.raises(ValueError, match="cv"):
        interarrival_gaps(1.0, 3, "bursty", rng, cv=1.0)
    with pytest.raises(ValueError, match="process"):
        interarrival_gaps(1.0, 3, "uniform", rng)


def test_abba_order_gives_every_mode_the_whole_schedule_once():
    offered = offered_requests(1.0, 7, "bursty", seed=1, sizes=[256])
    halves = level_order(["serial", "auto"], offered)
    assert [(h.mode, h.index) for h in halves] == [("serial", 0), ("auto", 0), ("auto", 1), ("serial", 1)]
    for mode in ("serial", "auto"):
        mine = [h for h in halves if h.mode == mode]
        assert [r.index for h in mine for r in h.requests] == list(range(7))
    second = halves[2].requests
    assert second[0].at_s == 0.0  # re-timed to start with the half
    assert [r.at_s for r in second] == pytest.approx([r.at_s - offered[4].at_s for r in offered[4:]])
    with pytest.raises(ValueError, match=">= 2"):
        level_order(["serial"], offered[:1])


def test_refusals_and_errors_are_misses_and_goodput_counts_only_images_in_time():
    solo = {"a": 1.0, "b": 2.0}
    first = [
        Outcome(0, "a", 0.0, 1.4, "ok", "hybrid"),  # within 1.5 x 1.0
        Outcome(1, "b", 0.5, 3.5, "ok", "serial"),  # over 1.5 x 2.0
        Outcome(2, "a", 1.0, 0.01, "refused"),
    ]
    second = [Outcome(3, "b", 0.0, 2.9, "ok", "serial"), Outcome(4, "a", 0.2, 5.0, "error")]
    row = level_row("auto", 0.8, "poisson", 1.5, [(first, 4.0), (second, 6.0)], solo)
    assert row["requests"] == 5 and row["refused"] == 1 and row["errors"] == 1
    assert row["attainment"] == pytest.approx(2 / 5)
    assert json.loads(row["attainment_halves"]) == [pytest.approx(1 / 3, abs=1e-3), 0.5]
    assert row["goodput_per_s"] == pytest.approx(2 / 10.0)
    assert row["p50_s"] == pytest.approx(2.9)  # served requests only
    assert row["refusal_max_s"] == pytest.approx(0.01)
    assert json.loads(row["modes_run"]) == {"hybrid": 1, "serial": 2}
    loose = level_row("auto", 0.8, "poisson", 2.0, [(first, 4.0), (second, 6.0)], solo)
    assert loose["attainment"] == pytest.approx(3 / 5)


def test_met_slo_boundary():
    assert met_slo(Outcome(0, "a", 0.0, 2.0, "ok"), 2.0)
    assert not met_slo(Outcome(0, "a", 0.0, 2.01, "ok"), 2.0)
    assert not met_slo(Outcome(0, "a", 0.0, 0.1, "refused"), 2.0)


def test_offered_keys_name_the_same_request():
    assert Offered(0, 0.0, 2, 256).key == Offered(9, 3.0, 2, 256).key
    assert Offered(0, 0.0, 2, 256).seed != Offered(0, 0.0, 2, 320).seed


def test_outputs_have_a_row_per_level_and_a_panel_per_process_and_scale(tmp_path):
    from loadtest.openloop import write_outputs

    solo = {"a": 1.0}
    rows = [
        level_row(mode, load, process, scale, [([Outcome(0, "a", 0.0, 1.2, "ok", mode)], 1.2)], solo)
        for process in ("poisson", "bursty")
        for load in (0.5, 1.5)
        for scale in (1.0, 2.0)
        for mode in ("serial", "auto")
    ]
    write_outputs(rows, tmp_path, "header", [1.0, 2.0])
    text = (tmp_path / "openloop.md").read_text()
    table = text.split("## Against the targets")[0].splitlines()
    assert table[0] == "header" and len([line for line in table if line.startswith("| poisson")]) == 8
    assert "## Against the targets" in text  # the verdict follows the table
    assert (tmp_path / "openloop.csv").read_text().count("\n") == len(rows) + 1
    assert (tmp_path / "openloop.png").stat().st_size > 0


def test_a_full_server_an_expired_slo_and_an_error_are_told_apart():
    assert outcome_status("StatusCode.UNAVAILABLE", "in ensemble 'sdxl', Exceeds maximum queue size") == "refused"
    assert outcome_status("StatusCode.UNAVAILABLE", "server full: every device already runs 2") == "refused"
    assert outcome_status("StatusCode.UNAVAILABLE", "in ensemble 'sdxl', Request timeout expired") == "expired"
    assert outcome_status("StatusCode.UNAVAILABLE", "deadline exceeded: the request's timeout passed") == "expired"
    assert outcome_status("StatusCode.INTERNAL", "Request timeout expired") == "error"
    expired = [Outcome(0, "a", 0.0, 1.1, "expired"), Outcome(1, "a", 0.1, 0.5, "ok")]
    row = level_row("auto", 1.0, "poisson", 1.0, [(expired, 2.0)], {"a": 1.0})
    assert row["expired"] == 1 and row["refused"] == 0 and row["attainment"] == 0.5


def test_each_slo_scale_is_its_own_pass_when_sent_as_the_timeout():
    assert slo_passes([1.0, 1.5, 2.0], slo_timeout=True) == [(1.0, [1.0]), (1.5, [1.5]), (2.0, [2.0])]
    assert slo_passes([1.0, 2.0], slo_timeout=False) == [(None, [1.0, 2.0])]
    assert slo_timeouts({"a": 2.0, "b": 3.0}, 1.5) == {"a": 3.0, "b": 4.5}
    assert slo_timeouts({"a": 2.0}, None) is None


def test_a_request_carries_its_slo_as_its_triton_timeout():
    """What ``auto`` plans with reaches the server: the gRPC request's timeout, in microseconds."""
    import asyncio

    from tritonclient.utils import InferenceServerException

    from loadtest.openloop import send

    class Client:
        def __init__(self) -> None:
            self.kwargs: list[dict] = []

        async def infer(self, model, inputs, **kwargs):
            self.kwargs.append(kwargs)
            raise InferenceServerException("Request timeout expired", status="StatusCode.UNAVAILABLE")

    client = Client()
    offered = Offered(0, 0.0, 0, 64)
    outcome = asyncio.run(send(client, offered, "auto", 4, 0.0, timeout_s=30.0, slo_s=2.5))
    assert client.kwargs[0]["timeout"] == 2_500_000 and client.kwargs[0]["client_timeout"] == 30.0
    assert outcome.status == "expired"
    asyncio.run(send(client, offered, "auto", 4, 0.0, timeout_s=30.0))
    assert client.kwargs[1]["timeout"] is None


def test_a_served_request_keeps_its_placement_for_requests_csv():
    """Each served request's schedule says how it was placed and how long its loop took (prediction against
    outcome); a refused one has only its status."""
    import asyncio

    from loadtest.openloop import request_row, send

    schedule = {"mode_run": "serial", "placed_by": "deadline", "devices": [1], "loads_seen": [1, 1],
                "predicted_s": 2.1, "loop_seconds": 2.9, "deadline_left_s": 3.0, "rel_mae": [0.1]}

    class Result:
        def as_numpy(self, name):
            return np.array([json.dumps(schedule).encode()], dtype=np.object_)

    class Client:
        async def infer(self, model, inputs, **kwargs):
            return Result()

    served = asyncio.run(send(Client(), Offered(3, 0.0, 0, 64), "auto", 4, 0.0, timeout_s=30.0, slo_s=3.5))
    row = request_row("poisson", 1.5, 1.0, "auto", 0, served)
    assert row["status"] == "ok" and row["mode_run"] == "serial" and row["index"] == 3
    assert (row["predicted_s"], row["loop_seconds"], row["deadline_left_s"]) == (2.1, 2.9, 3.0)
    assert json.loads(row["devices"]) == [1] and json.loads(row["loads_seen"]) == [1, 1]
    refused = request_row("poisson", 1.5, 1.0, "auto", 1, Outcome(4, "a", 0.1, 0.02, "refused"))
    assert refused["status"] == "refused" and refused["predicted_s"] == "" and refused["mode_run"] == ""


def _row(mode: str, load: float, attainment: float, halves: list[float], goodput: float = 0.5, **extra) -> dict:
    return {"process": "poisson", "slo_scale": 1.5, "load": load, "mode": mode, "attainment": attainment,
            "attainment_halves": json.dumps(halves), "goodput_per_s": goodput, "refusal_max_s": 0.1,
            "expired": 0, "errors": 0, **extra}


def test_the_verdict_compares_auto_with_the_best_fixed_mode_within_the_noise_of_both():
    from loadtest.openloop_levels import noise, verdict

    rows = [
        _row("serial", 0.5, 0.60, [0.5, 0.7]), _row("hybrid", 0.5, 0.80, [0.8, 0.8]),
        _row("auto", 0.5, 0.75, [0.7, 0.8]),  # 5 points behind hybrid, noise 10 points: holds
        _row("serial", 1.5, 0.50, [0.5, 0.5], goodput=0.40), _row("hybrid", 1.5, 0.40, [0.4, 0.4]),
        _row("auto", 1.5, 0.70, [0.7, 0.7], goodput=0.45, refusal_max_s=0.8, expired=1),  # 20 points ahead
    ]
    assert noise(rows[0]) == pytest.approx(0.1)
    text = "\n".join(verdict(rows, fixed_modes=("serial", "hybrid")))
    assert "2 of 2 levels" in text and "+20 points" in text
    assert "slowest refusal 0.80 s, failures other than refusals 1" in text
    assert "goodput 0.450/s = 90% of the best at any load (0.500/s)" in text
    behind = [*rows[:2], _row("auto", 0.5, 0.55, [0.55, 0.55])]  # 25 points behind, noise 10
    assert "0 of 1 levels" in "\n".join(verdict(behind, fixed_modes=("serial", "hybrid")))

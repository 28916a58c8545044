"""The chaos run's plan and bookkeeping, without a server."""

from __future__ import annotations

import csv

import pytest

from loadtest.chaos import (
    KINDS,
    Fault,
    FaultRecord,
    RequestRecord,
    busiest,
    failure_reason,
    fault_plan,
    fault_rows,
    kind_rows,
    overlapping,
    summary,
    write_outputs,
)


def test_plan_kills_every_kind_each_round_alternating_families_and_devices():
    plan = fault_plan(2, ("sdxl", "sd3"), devices=2)
    assert len(plan) == 2 * len(KINDS) and set(KINDS) == {"denoiser", "text_encoder", "vae", "orchestrator", "front"}
    assert [f.kind for f in plan] == list(KINDS) * 2
    assert [f.index for f in plan] == list(range(10))
    for kind in KINDS:  # each kind hits both families
        assert {f.family for f in plan if f.kind == kind} == {"sdxl", "sd3"}
    assert [f.family for f in plan[:4]] == ["sdxl", "sd3", "sdxl", "sd3"]
    assert [f.model for f in plan if f.kind == "denoiser"] == ["sdxl_denoiser_0", "sd3_denoiser_1"]
    assert all(f.model.startswith(f.family + "_") for f in plan if f.kind != "front")
    assert [f.model for f in plan if f.kind == "orchestrator"] == ["sd3_orchestrator", "sdxl_orchestrator"]
    assert [f.model for f in plan if f.kind == "front"] == ["sdxl", "sd3"]  # the public model itself
    with pytest.raises(ValueError, match="rounds"):
        fault_plan(0)


def test_failure_reasons_group_what_triton_answers():
    assert failure_reason("Stub process 'sdxl_vae_0_0' is not healthy.").startswith("stub process not healthy")
    assert failure_reason("Model 'sd3_vae' is not ready.").startswith("model not ready")
    assert failure_reason("[StatusCode.UNAVAILABLE] no device left") == "unavailable"
    still_gone = "sdxl_orchestrator is unavailable (Model 'sdxl_orchestrator' is not ready.); waited 3.0 s"
    assert failure_reason(still_gone) == "a model still gone at the request's deadline"
    assert failure_reason("something\n  else   entirely") == "other: something else entirely"


def req(started, ended, ok=True, reason=None, retried=(), resubmitted=0):
    return RequestRecord(0, "sdxl", "hybrid", started, ended, ok, reason, list(retried), resubmitted)


def test_requests_are_attributed_to_the_fault_windows_they_overlap():
    requests = [
        req(0, 5),  # before the kill
        req(8, 12, False, "stub process not healthy (killed while holding the request)"),  # held by the victim
        req(11, 30, True, retried=["model not ready (being brought back)"]),
        req(12, 31, True, resubmitted=3),  # sent again by the front
        req(40, 50),  # after recovery
    ]
    assert overlapping(requests, 10, 35) == requests[1:4]
    faults = [FaultRecord(Fault(0, "sdxl", "sdxl_vae", "vae"), pid=7, instance="sdxl_vae_0_0", killed_at=10.0,
                          reloaded_s=20.0, serving_s=25.0),
              FaultRecord(Fault(1, "sd3", "sd3_vae", "vae"), note="no stub found (model not loaded)")]
    rows = fault_rows(faults, requests)
    assert rows[0]["requests_in_window"] == 3 and rows[0]["failed"] == 1 and rows[0]["resubmitted_requests"] == 1
    assert rows[0]["failed_reasons"].startswith("1x stub process not healthy")
    assert rows[0]["retried_past"] == "1x model not ready (being brought back)"
    assert rows[0]["serving_every_mode_s"] == 25.0
    assert rows[1]["requests_in_window"] == 0 and rows[1]["reloaded_s"] == ""
    [vae] = kind_rows(rows)  # both faults were VAE kills; the second never recovered
    assert (vae["faults"], vae["failed"], vae["resubmitted_by_front"], vae["reloaded_max_s"]) == (2, 1, 1, "")

    totals = summary(requests)
    assert (totals["sent"], totals["succeeded"], totals["failed"], totals["resubmitted"]) == (5, 4, 1, 1)


def test_the_busiest_instance_is_the_one_killed():
    import subprocess
    import sys

    from hybridiff.supervisor import Stub

    spin = "import time\nend = time.time() + 3\nwhile time.time() < end: pass"
    spinning = subprocess.Popen([sys.executable, "-c", spin])
    idle = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3)"])
    try:
        stubs = [Stub(idle.pid, "m", "m_0_0", ""), Stub(spinning.pid, "m", "m_0_1", "")]
        assert busiest(stubs, window_s=0.5).instance == "m_0_1"
    finally:
        for process in (spinning, idle):
            process.kill()
            process.wait()


def test_outputs_are_written(tmp_path):
    faults = [FaultRecord(Fault(0, "sdxl", "sdxl_vae", "vae"), pid=7, instance="sdxl_vae_0_0", killed_at=1.0,
                          reloaded_s=2.0, serving_s=3.0)]
    requests = [req(0, 2), req(1, 2, False, "model not ready (being brought back)")]
    write_outputs(tmp_path, fault_rows(faults, requests), requests, "Measured with `x` at commit abc.")
    md = (tmp_path / "chaos.md").read_text()
    assert md.startswith("Measured with `x` at commit abc.")
    assert "Requests sent 2, succeeded 1, failed 1." in md
    assert "| 0 | vae | sdxl_vae (sdxl_vae_0_0) | 2.0 s | 3.0 s | 2 | 1 |" in md
    assert "| vae | 1 | 2.0 s | 3.0 s | 2 | 1 | 0 | 0 |" in md  # the table per kind
    rows = list(csv.DictReader(open(tmp_path / "chaos.csv")))
    assert rows[0]["model"] == "sdxl_vae" and rows[0]["failed"] == "1"
    assert len(list(csv.DictReader(open(tmp_path / "requests.csv")))) == 2

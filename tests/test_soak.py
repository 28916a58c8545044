"""The soak's pure parts: its request plan, RSS parsing, growth arithmetic and report (no server)."""

from __future__ import annotations

import itertools
import os
import threading

import pytest

from loadtest.soak import (
    FAMILIES,
    MODES,
    PROTOCOLS,
    SIZES,
    Job,
    Proc,
    Result,
    Workers,
    growth_pct,
    growth_rows,
    markdown,
    parse_status_kib,
    read_rss_kib,
    request_plan,
    worst,
)

CYCLE = len(FAMILIES) * len(MODES) * len(SIZES) * len(PROTOCOLS)


def test_plan_is_deterministic_and_numbered():
    plan = request_plan(250)
    assert plan == request_plan(250)
    assert [job.index for job in plan] == list(range(250))
    assert request_plan(0) == []


def test_every_window_of_one_cycle_covers_every_combination():
    plan = request_plan(3 * CYCLE + 7)
    wanted = set(itertools.product(FAMILIES, MODES, SIZES, PROTOCOLS))
    for start in (0, 1, CYCLE - 1, 2 * CYCLE + 7):
        window = plan[start:start + CYCLE]
        assert {(j.family, j.mode, j.size, j.protocol) for j in window} == wanted


def test_families_alternate_and_steps_vary_per_family():
    plan = request_plan(2 * CYCLE, steps=(4, 6))
    assert [j.family for j in plan[:4]] == ["sdxl", "sd3", "sdxl", "sd3"]
    for family in FAMILIES:
        assert {j.steps for j in plan if j.family == family} == {4, 6}


def test_plan_rejects_bad_arguments():
    with pytest.raises(ValueError, match="requests"):
        request_plan(-1)
    with pytest.raises(ValueError, match="sizes"):
        request_plan(10, sizes=())


STATUS = """Name:\tpython
State:\tS (sleeping)
VmPeak:\t 1234567 kB
VmRSS:\t  204800 kB
RssAnon:\t  100000 kB
"""


def test_parse_status_fields():
    assert parse_status_kib(STATUS) == 204800
    assert parse_status_kib(STATUS, "RssAnon") == 100000


def test_parse_status_without_the_line():
    with pytest.raises(ValueError, match="VmRSS"):
        parse_status_kib("Name:\tkthreadd\nState:\tS (sleeping)\n")


def test_read_rss_of_this_process_and_of_a_missing_one(tmp_path):
    assert read_rss_kib(os.getpid())["VmRSS"] > 1000
    (tmp_path / "42").mkdir()
    (tmp_path / "42" / "status").write_text(STATUS)
    assert read_rss_kib(42, proc_root=tmp_path, fields=("VmRSS", "RssAnon")) == {"VmRSS": 204800, "RssAnon": 100000}
    assert read_rss_kib(42, proc_root=tmp_path, fields=("RssShmem",)) is None  # a field it lacks
    assert read_rss_kib(43, proc_root=tmp_path) is None


def test_growth_arithmetic():
    assert growth_pct(1000, 1020) == pytest.approx(2.0)
    assert growth_pct(1000, 990) == pytest.approx(-1.0)
    assert growth_pct(500, 500) == 0.0
    with pytest.raises(ValueError):
        growth_pct(0, 10)


def test_growth_rows_worst_and_a_process_gone():
    procs = [Proc(1, "tritonserver", "tritonserver"), Proc(2, "sdxl_vae", "sdxl_vae_0_0"), Proc(3, "sd3_vae", "x")]
    warm, end = {1: 1000, 2: 2000, 3: 400}, {1: 1010, 2: 2100}
    rows = growth_rows(procs, warm, end, trace=[{1: 1050, 2: 2050}, end], ready={1: 900})
    assert [r["growth_pct"] for r in rows] == [1.0, 5.0, ""]
    assert [r["rss_at_ready_kib"] for r in rows] == [900, "", ""]
    assert rows[0]["peak_after_warmup_kib"] == 1050
    assert rows[2]["note"]
    assert worst(rows)["instance"] == "sdxl_vae_0_0"
    assert worst([rows[2]]) is None


def test_markdown_names_the_worst_process_and_counts_failures():
    procs = [Proc(1, "tritonserver", "tritonserver"), Proc(2, "sdxl_vae", "sdxl_vae_0_0")]
    rows = growth_rows(procs, {1: 1000, 2: 2000}, {1: 1010, 2: 2100})
    job = Job(0, "sdxl", "serial", 64, 4, "http", 0, "p")
    results = [Result(job, True, 1.0), Result(Job(1, "sd3", "auto", 96, 4, "grpc", 1, "p"), False, 1.0, "boom")]
    text = markdown(rows, results, 2, "header", 12.0, 10.0, 1, stopped_early=False)
    assert "5.0% (sdxl_vae, sdxl_vae_0_0), OVER the 2.0% target" in text
    assert "sent 2, succeeded 1, failed 1" in text and "1x boom" in text


def test_workers_keep_one_sender_per_thread_across_chunks():
    """Each user's sender is made once, on the thread that uses it (tritonclient HTTP clients need that)."""
    made, closed = [], []

    def make_sender(user):
        owner = threading.get_ident()
        made.append(user)

        def send(job):
            if threading.get_ident() != owner:
                raise RuntimeError("sender used from another thread")
            if job.index % 5 == 4:
                raise RuntimeError("boom")

        return send, lambda: closed.append(user)

    workers = Workers(3, make_sender)
    plan = request_plan(20)
    try:
        first, second = workers.run(plan[:10]), workers.run(plan[10:])
    finally:
        workers.close()
    assert [r.job.index for r in first + second] == list(range(20))
    assert [r.ok for r in first + second] == [j.index % 5 != 4 for j in plan]
    assert {r.reason for r in first + second if not r.ok} == {"boom"}
    assert sorted(made) == sorted(closed) == [0, 1, 2]


def test_workers_report_a_sender_that_cannot_be_made():
    def make_sender(user):
        raise ConnectionRefusedError("no server")

    workers = Workers(2, make_sender)
    try:
        results = workers.run(request_plan(3))
    finally:
        workers.close()
    assert [(r.ok, r.reason) for r in results] == [(False, "no server")] * 3

"""The load level's bookkeeping: every mode gets the same work (a quota per user), bounded in time."""

import time

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

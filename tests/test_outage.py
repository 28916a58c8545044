"""The retry policy for a text encoder or VAE that is gone for a while (hybridiff.outage), on a fake clock."""

from __future__ import annotations

import asyncio

import pytest

from hybridiff.outage import ModelGone, OutagePolicy, StillGone, call_through_outage


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


class Model:
    """A model that is gone until ``back_at`` on the clock, then answers ``"image"``."""

    def __init__(self, clock: FakeClock, back_at: float, error: Exception | None = None) -> None:
        self.clock, self.back_at, self.error, self.calls = clock, back_at, error, 0

    async def __call__(self) -> str:
        self.calls += 1
        if self.error is not None:
            raise self.error
        if self.clock() < self.back_at:
            raise ModelGone("sdxl_vae", "Stub process 'sdxl_vae_0_0' is not healthy.")
        return "image"


def run(model: Model, clock: FakeClock, policy: OutagePolicy | None = None, **kwargs):
    policy = policy or OutagePolicy()
    return asyncio.run(call_through_outage(model, policy, sleep=clock.sleep, clock=clock, **kwargs))


def test_a_model_that_answers_is_called_once_without_waiting():
    clock = FakeClock()
    model = Model(clock, back_at=0.0)
    assert run(model, clock, deadline=None) == "image"
    assert model.calls == 1 and clock.sleeps == []


def test_waits_with_a_growing_back_off_until_the_model_is_back():
    clock = FakeClock()
    model = Model(clock, back_at=clock.now + 5.0)
    assert run(model, clock, OutagePolicy(first_delay_s=0.25, max_delay_s=1.0), deadline=None) == "image"
    assert clock.sleeps[:3] == [0.25, 0.5, 1.0] and set(clock.sleeps[3:]) == {1.0}
    assert 5.0 <= clock.now - 100.0 < 6.0  # answered at the first try after it came back


def test_without_a_deadline_gives_up_after_the_default_wait_naming_the_model():
    clock = FakeClock()
    model = Model(clock, back_at=float("inf"))
    with pytest.raises(StillGone) as raised:
        run(model, clock, OutagePolicy(default_wait_s=30.0), deadline=None)
    assert raised.value.model == "sdxl_vae"
    message = str(raised.value)
    assert message.startswith("sdxl_vae is unavailable (Stub process") and "retry later" in message
    assert "at most 30 s" in message and "deadline exceeded" not in message  # the client retries it
    assert clock.now - 100.0 == pytest.approx(30.0)  # never sleeps past the limit


def test_the_request_deadline_bounds_the_wait_even_beyond_the_default():
    clock = FakeClock()
    model = Model(clock, back_at=clock.now + 90.0)
    assert run(model, clock, OutagePolicy(default_wait_s=30.0), deadline=clock.now + 120.0) == "image"
    clock = FakeClock()
    with pytest.raises(StillGone, match="the request's timeout"):
        run(Model(clock, back_at=float("inf")), clock, deadline=clock.now + 7.0)
    assert clock.now - 100.0 == pytest.approx(7.0)


def test_a_deadline_already_passed_gives_up_at_the_first_failure():
    clock = FakeClock()
    model = Model(clock, back_at=float("inf"))
    with pytest.raises(StillGone):
        run(model, clock, deadline=clock.now - 1.0)
    assert model.calls == 1 and clock.sleeps == []


def test_cancellation_is_honoured_between_tries():
    class Cancelled(Exception):
        pass

    clock = FakeClock()
    model = Model(clock, back_at=float("inf"))

    def check_cancelled() -> None:
        if clock.now - 100.0 >= 2.0:
            raise Cancelled

    with pytest.raises(Cancelled):
        run(model, clock, deadline=None, check_cancelled=check_cancelled)
    assert clock.now - 100.0 < 2.0 + OutagePolicy().max_delay_s


def test_other_errors_pass_through_at_once():
    clock = FakeClock()
    model = Model(clock, back_at=0.0, error=ValueError("PROMPT: too long"))
    with pytest.raises(ValueError, match="too long"):
        run(model, clock, deadline=None)
    assert model.calls == 1 and clock.sleeps == []


def test_delay_doubles_to_its_cap():
    policy = OutagePolicy(first_delay_s=0.2, max_delay_s=1.0)
    assert [policy.delay(n) for n in range(1, 6)] == [0.2, 0.4, 0.8, 1.0, 1.0]

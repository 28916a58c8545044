"""Waiting out a model that is gone for a while, instead of losing the request.

The orchestrator calls ``<family>_text_encoder`` and ``<family>_vae`` through BLS, and the public front
calls ``<family>_orchestrator``. When one of their stubs dies, the supervisor unloads and reloads that
model (seconds to tens of seconds); meanwhile a call answers "not healthy", "not ready" or "unknown
model". A request the server has accepted, maybe with its whole denoising done, should not fail for
that: :func:`call_through_outage` retries the call with a short back-off until the model answers, and
gives up with :class:`StillGone` (the glue answers a retryable UNAVAILABLE naming the model) once the
request's deadline, or without one ``OutagePolicy.default_wait_s``, has passed. The client's
cancellation is checked between tries. For the front a retry sends the whole request again (the
orchestrator's process, and the run in it, are gone); :func:`record_try` and :func:`with_tries` keep
the failed tries for the response's ``SCHEDULE`` (``resubmitted``).

Plain Python: the glue turns a gone model's error into :class:`ModelGone` (``device_gone`` and
``model_gone`` in ``triton/bls.py`` tell a gone model from a bad request) and passes its clock checks.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")


class ModelGone(RuntimeError):
    """A call failed because the model is gone for now (its stub died, it is unloaded or reloading)."""

    def __init__(self, model: str, message: str) -> None:
        super().__init__(f"{model}: {message}")
        self.model = model
        self.reason = message


class StillGone(RuntimeError):
    """The model did not come back within the wait allowed; the request may be retried later."""

    def __init__(self, model: str, message: str) -> None:
        super().__init__(message)
        self.model = model


@dataclass(frozen=True)
class OutagePolicy:
    """How long and how often to retry a gone model.

    ``default_wait_s`` bounds the wait of a request that set no timeout: long enough for the
    supervisor to reload a small model (docs/operations.md), short enough that a client learns of an
    outage that lasts. Tries are ``first_delay_s`` apart, doubling up to ``max_delay_s``, which also
    bounds how late a cancellation is seen while waiting.
    """

    first_delay_s: float = 0.2
    max_delay_s: float = 1.0
    default_wait_s: float = 60.0

    def delay(self, failures: int) -> float:
        """Seconds before the next try after ``failures`` failed ones (>= 1)."""
        return min(self.max_delay_s, self.first_delay_s * 2 ** max(failures - 1, 0))

    def give_up_at(self, first_failure: float, deadline: float | None) -> float:
        """When to stop waiting: the request's deadline if it has one, else ``default_wait_s`` after the
        first failed try."""
        return deadline if deadline is not None else first_failure + self.default_wait_s


async def call_through_outage(
    call: Callable[[], Awaitable[T]],
    policy: OutagePolicy,
    *,
    deadline: float | None,
    check_cancelled: Callable[[], None] = lambda: None,
    on_gone: Callable[[ModelGone], None] = lambda gone: None,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> T:
    """``await call()``, tried again while it raises :class:`ModelGone`, until it answers.

    Raises :class:`StillGone` once the wait allowed (:meth:`OutagePolicy.give_up_at`) is spent, and
    whatever ``check_cancelled`` raises (it is called before every retry). Any other error of
    ``call`` passes through at once. ``on_gone`` sees every failed try (the front records them).
    """
    first_failure: float | None = None
    failures = 0
    while True:
        try:
            return await call()
        except ModelGone as gone:
            on_gone(gone)
            now = clock()
            first_failure = now if first_failure is None else first_failure
            failures += 1
            remaining = policy.give_up_at(first_failure, deadline) - now
            if remaining <= 0:
                limit = "the request's timeout" if deadline is not None else f"at most {policy.default_wait_s:g} s"
                raise StillGone(
                    gone.model,
                    f"{gone.model} is unavailable ({gone.reason.strip()}); waited {now - first_failure:.1f} s "
                    f"({failures} tries, {limit}) for it to come back; retry later",
                ) from gone
        await sleep(min(policy.delay(failures), remaining))
        check_cancelled()


def record_try(log: list[dict], reason: str, after_s: float) -> None:
    """Add a failed try of a request (``reason``: the error, ``after_s``: since the request was taken) to
    ``log``, the response's ``resubmitted`` list: one entry per run of tries that failed alike, with
    their count, so that a reload's dozen "not ready" answers read as one line."""
    if log and log[-1]["reason"] == reason:
        log[-1]["tries"] += 1
    else:
        log.append({"after_s": round(after_s, 3), "tries": 1, "reason": reason})


def with_tries(schedules: Iterable[bytes | str], tries: list[dict]) -> list[str]:
    """Each image's ``SCHEDULE`` JSON with the request's failed tries as ``resubmitted`` (empty when none)."""
    return [json.dumps({**json.loads(schedule), "resubmitted": tries}) for schedule in schedules]

"""Admission: whether the server takes a request now, and the refusal it answers otherwise.

Two layers bound what the server holds (see docs/overload.md):

* Triton's queue policy on the public path's models (``export.make_repository`` writes it from
  :class:`QueueLimits`): at most ``queue_size`` requests wait for an orchestrator instance, the rest
  are refused at once with UNAVAILABLE; a request still waiting after its start deadline is refused
  when it reaches the head of the queue instead of starting.
* The orchestrator's own gate (:func:`admit`), for the requests it already holds: an instance that
  took a request while every device already runs ``max_per_device`` requests waits for room until
  the request's start deadline, then refuses it rather than start it late. Off (0) by default.

Plain Python: the orchestrator's glue passes the board's loads and turns a refusal into UNAVAILABLE.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

FULL = "server full"  # every refusal starts with this, so clients and logs can tell it from an error
# What Triton itself answers when a model's bounded queue is full (UNAVAILABLE).
TRITON_QUEUE_FULL = "Exceeds maximum queue size"


@dataclass(frozen=True)
class QueueLimits:
    """What the public path may hold beyond the requests running; written into the repository.

    ``queue_size``: requests that may wait for an orchestrator instance (per family); 0 = unbounded
    (Triton's meaning). ``start_timeout_us``: how long a request may wait before it starts; 0 = no
    limit. A client's own ``timeout`` can only shorten it (Triton 2.51 ignores an override when the
    default is 0, measured). ``max_per_device``: the orchestrator gate, 0 = off. ``admit_by_deadline``:
    refuse at once a request that cannot finish within its timeout on the current load
    (``deadline.refusal``).
    """

    queue_size: int = 4
    start_timeout_us: int = 60_000_000
    max_per_device: int = 0
    admit_by_deadline: bool = True

    def validate(self) -> None:
        for name in ("queue_size", "start_timeout_us", "max_per_device"):
            value = getattr(self, name)
            if value < 0:
                raise ValueError(f"{name}: {value} outside the allowed range [0, inf)")


def refusal(loads: list[int], max_per_device: int) -> str | None:
    """Why a request cannot start on these loads (requests in flight per device), or None if it can.

    Room means one device below the limit: every mode can run there (``auto`` and the explicit modes
    fall back to the least busy device).
    """
    if max_per_device <= 0 or not loads or min(loads) < max_per_device:
        return None
    return f"{FULL}: every device already runs {max_per_device} requests; retry later"


def start_budget_s(request_timeout_us: int, limits: QueueLimits) -> float:
    """How long a held request may wait for room: its own timeout if it sent one, else the default."""
    budget_us = request_timeout_us or limits.start_timeout_us
    return budget_us / 1e6


async def admit(
    loads: Callable[[], list[int]],
    limits: QueueLimits,
    request_timeout_us: int = 0,
    poll_s: float = 0.05,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> str | None:
    """Wait until the loads leave room or the start budget is spent; the refusal, or None to start.

    Never waits (nor reads the loads) when the gate is off, nor when there is room already; a budget
    of 0 refuses at once. Deciding here and occupying a device later are two steps, so two requests
    may both pass on the last free slot: the limit is soft by at most the orchestrator instances.
    """
    if limits.max_per_device <= 0:
        return None
    reason = refusal(loads(), limits.max_per_device)
    if reason is None:
        return None
    deadline = clock() + start_budget_s(request_timeout_us, limits)
    while clock() < deadline:
        await sleep(min(poll_s, max(deadline - clock(), 0.0)))
        reason = refusal(loads(), limits.max_per_device)
        if reason is None:
            return None
    return f"{reason} (waited {start_budget_s(request_timeout_us, limits):.1f} s for a device)"

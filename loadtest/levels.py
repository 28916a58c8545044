"""What each user sends, how a sweep is ordered, how its levels become rows: plain Python for tests.

Each (users, mode) level runs in two halves: every mode once in order, then every mode again in
reverse order (an ABBA design). On a VM whose speed drifts over minutes, a mode measured only at
one moment can win or lose by the moment's speed; with the reverse pass, a linear drift costs
every mode about the same (exactly the same when both halves carry equal work). User i's second
half continues its own request sequence, so a mode's two halves together are exactly the
``requests_per_user`` requests of one long level.
"""

from __future__ import annotations

import json
import os
import random
import statistics
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from hybridiff.wire import FAMILIES

PROMPTS = [
    "a lighthouse on a cliff at sunset, oil painting",
    "a red fox sitting in fresh snow, photograph",
    "a futuristic city street at night with neon signs",
    "a bowl of ripe peaches on a wooden table",
]
MODES = ["serial", "cfg_parallel", "hybrid", "auto"]


def request_fields(rng: random.Random, mode: str) -> tuple[int, dict]:
    """A random request of the mix: prompt index and fields (seed fixed per prompt and size).

    ``LOADTEST_SIZES`` (default 256,320) and ``LOADTEST_STEPS`` (default 20) shape the mix.
    """
    sizes = [int(s) for s in os.environ.get("LOADTEST_SIZES", "256,320").split(",")]
    steps = int(os.environ.get("LOADTEST_STEPS", "20"))
    prompt = rng.randrange(len(PROMPTS))
    size = rng.choice(sizes)
    chosen = rng.choice(MODES) if mode == "mix" else mode
    fields = {"mode": chosen, "seed": 1000 * prompt + size, "steps": steps, "height": size, "width": size}
    return prompt, fields


def user_requests(protocol: str, user: int, mode: str, first_request: int = 0) -> Iterator[tuple[int, dict]]:
    """User ``user``'s requests from position ``first_request`` on: the same sequence in every mode
    and level, so modes are compared on identical work."""
    rng = random.Random(f"{protocol}-{user}")
    position = 0
    while True:
        request = request_fields(rng, mode)
        if position >= first_request:
            yield request
        position += 1


@dataclass(frozen=True)
class Half:
    """One half of a level: which of each user's requests it sends."""

    mode: str
    index: int  # 0: forward pass over the modes, 1: the reverse pass
    first_request: int  # position in each user's request sequence where this half starts
    quota: int  # requests per user in this half


def sweep_order(modes: list[str], requests_per_user: int) -> list[Half]:
    """The halves of one user count's levels, in the order they run (modes, then modes reversed)."""
    if requests_per_user < 2:
        raise ValueError(f"requests_per_user must be >= 2 (one per half), got {requests_per_user}")
    first = (requests_per_user + 1) // 2
    forward = [Half(mode, 0, 0, first) for mode in modes]
    backward = [Half(mode, 1, first, requests_per_user - first) for mode in reversed(modes)]
    return forward + backward


@dataclass
class HalfResult:
    """What one half did: its responses, its wall time, and Triton's queue counters over it."""

    results: list[dict]
    span_s: float  # from the first request sent to the last response
    queue: dict[str, tuple[float, float]] = field(default_factory=dict)  # model: (queue us, requests)


def queue_delta(before: dict, after: dict) -> dict[str, tuple[float, float]]:
    """Queue time and requests over an interval, for the denoisers and the public (orchestrator) models."""
    result = {}
    for model, (queue, count) in after.items():
        q0, c0 = before.get(model, (0.0, 0.0))
        if count > c0 and ("denoiser" in model or model in FAMILIES):
            result[model] = (queue - q0, count - c0)
    return result


def pooled_row(mode: str, users: int, halves: list[HalfResult]) -> dict:
    """One row for a (mode, users) level from its halves: latencies pooled, images / total time."""
    results = [r for half in halves for r in half.results]
    ok = [r for r in results if r["error"] is None]
    latencies = sorted(r["latency_s"] for r in ok)
    span = sum(half.span_s for half in halves)
    chosen: dict[str, int] = {}
    for r in ok:
        chosen[r["mode_run"]] = chosen.get(r["mode_run"], 0) + 1
    queue: dict[str, list[float]] = {}
    for half in halves:
        for model, (queue_us, count) in half.queue.items():
            total = queue.setdefault(model, [0.0, 0.0])
            total[0] += queue_us
            total[1] += count
    per_half = [sum(r["error"] is None for r in h.results) / h.span_s if h.span_s > 0 else 0.0 for h in halves]
    return {
        "mode": mode,
        "users": users,
        "requests": len(results),
        "failures": len(results) - len(ok),
        "p50_s": statistics.median(latencies) if latencies else float("nan"),
        "p95_s": float(np.percentile(latencies, 95)) if latencies else float("nan"),
        "images_per_s": len(ok) / span if ok and span > 0 else 0.0,
        "images_per_s_halves": json.dumps([round(rate, 3) for rate in per_half]),
        "modes_run": json.dumps(chosen, sort_keys=True),
        "queue_ms_per_request": json.dumps(
            {model: round(q / c / 1000, 2) for model, (q, c) in sorted(queue.items()) if c > 0}
        ),
    }

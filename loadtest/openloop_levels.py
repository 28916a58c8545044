"""The open-loop test's plain parts: arrival times, the order levels run in, and SLO arithmetic.

Arrivals are drawn once per (process, load) from a fixed seed, so every mode is offered exactly the
same requests at exactly the same offsets. A level runs in two halves, modes forward then reversed
(ABBA, as the closed-loop sweep): each half offers the same slice of the arrival schedule to every
mode, so a machine whose speed drifts over minutes costs every mode about the same. The SLO of a
request is ``scale`` times the latency of the same request alone in ``serial``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from loadtest.levels import MODES, PROMPTS  # noqa: F401 (MODES re-exported): the closed-loop sweep's requests

PROCESSES = ("poisson", "bursty")


@dataclass(frozen=True)
class Offered:
    """One request of a level: when it is sent (seconds from the level's start) and what it asks."""

    index: int
    at_s: float
    prompt: int  # index into PROMPTS
    size: int

    @property
    def key(self) -> str:
        """Requests with the same key are the same request (same prompt, size and seed)."""
        return f"{self.prompt}-{self.size}"

    @property
    def seed(self) -> int:
        return 1000 * self.prompt + self.size


def interarrival_gaps(rate: float, count: int, process: str, rng: np.random.Generator, cv: float = 2.0) -> np.ndarray:
    """``count`` gaps with mean ``1 / rate``: exponential (Poisson arrivals, CV 1) or Gamma with
    coefficient of variation ``cv`` > 1 (bursty: many short gaps, a few long ones)."""
    if rate <= 0:
        raise ValueError(f"rate: {rate} must be > 0")
    if process == "poisson":
        return rng.exponential(1.0 / rate, count)
    if process == "bursty":
        if cv <= 1:
            raise ValueError(f"cv: {cv} must be > 1 for a bursty process")
        shape = 1.0 / cv**2
        return rng.gamma(shape, 1.0 / (rate * shape), count)
    raise ValueError(f"process: {process!r} not one of {', '.join(PROCESSES)}")


def offered_requests(
    rate: float, count: int, process: str, seed: int, sizes: list[int], cv: float = 2.0
) -> list[Offered]:
    """The arrival schedule of one level: the first request at 0, then the drawn gaps.

    Depends only on its arguments (not on the mode), which is what makes modes comparable.
    """
    rng = np.random.default_rng([seed, PROCESSES.index(process), int(round(rate * 1e6)), count])
    gaps = interarrival_gaps(rate, count, process, rng, cv)
    times = np.concatenate([[0.0], np.cumsum(gaps[:-1])]) if count else np.array([])
    prompts = rng.integers(0, len(PROMPTS), count)
    chosen = rng.integers(0, len(sizes), count)
    return [
        Offered(i, float(times[i]), int(prompts[i]), int(sizes[chosen[i]])) for i in range(count)
    ]


@dataclass(frozen=True)
class Half:
    """One half of a level: a mode, and the slice of the arrival schedule it is offered."""

    mode: str
    index: int  # 0: forward pass over the modes, 1: reversed
    requests: tuple[Offered, ...]


def level_order(modes: list[str], offered: list[Offered]) -> list[Half]:
    """Halves in the order they run: every mode on the first half of the schedule, then every mode in
    reverse on the second half (re-timed to start at 0). Each mode gets the whole schedule once."""
    if len(offered) < 2:
        raise ValueError(f"a level needs >= 2 requests (one per half), got {len(offered)}")
    cut = (len(offered) + 1) // 2
    first, second = tuple(offered[:cut]), offered[cut:]
    start = second[0].at_s
    second = tuple(Offered(r.index, r.at_s - start, r.prompt, r.size) for r in second)
    return [Half(m, 0, first) for m in modes] + [Half(m, 1, second) for m in reversed(modes)]


@dataclass(frozen=True)
class Outcome:
    """What happened to one offered request."""

    index: int
    key: str
    sent_s: float  # when it was sent, from the half's start
    latency_s: float  # until the answer (image, refusal or error)
    status: str  # "ok", "refused" (the server was full), "expired" (its timeout, the SLO, passed) or "error"
    mode_run: str | None = None
    placed: dict | None = None  # a served request's placement as its schedule reports it (PLACEMENT_FIELDS)


# What each served request's schedule says of how it was placed and how long its denoising loop took:
# prediction against outcome, per request (requests.csv).
PLACEMENT_FIELDS = ("placed_by", "devices", "loads_seen", "predicted_s", "loop_seconds", "deadline_left_s")


# What the server says when a request's own timeout passed: Triton's queue ("Request timeout expired"),
# or the orchestrator between steps ("deadline exceeded: ..."). Both are UNAVAILABLE, as a full queue is.
_EXPIRED = ("request timeout expired", "deadline exceeded")


def outcome_status(code: str, message: str) -> str:
    """How a failed request counts: ``refused`` (server full), ``expired`` (its timeout passed) or ``error``."""
    if not code.endswith("UNAVAILABLE"):
        return "error"
    return "expired" if any(text in message.lower() for text in _EXPIRED) else "refused"


def slo_passes(scales: list[float], slo_timeout: bool) -> list[tuple[float | None, list[float]]]:
    """The passes over the loads: (the SLO scale sent as every request's timeout, the scales its rows
    report). With timeouts each scale is its own pass, since a request carries one SLO; without, one
    pass without timeouts reports every scale."""
    if slo_timeout:
        return [(scale, [scale]) for scale in scales]
    return [(None, list(scales))]


def slo_timeouts(solo_s: dict[str, float], scale: float | None) -> dict[str, float] | None:
    """Each request's timeout in seconds: its SLO, ``scale`` times its solo serial latency (None: none)."""
    return None if scale is None else {key: scale * latency for key, latency in solo_s.items()}


def met_slo(outcome: Outcome, slo_s: float) -> bool:
    """Only a served image within its SLO counts; a refusal or an error is a miss."""
    return outcome.status == "ok" and outcome.latency_s <= slo_s


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def level_row(
    mode: str,
    load: float,
    process: str,
    scale: float,
    halves: list[tuple[list[Outcome], float]],
    solo_s: dict[str, float],
) -> dict:
    """One CSV row for a (mode, load, process, SLO scale) level from its halves' outcomes and spans.

    Goodput is images that met their SLO per second of the halves' spans (first send to last
    answer), so a mode that serves late gets no credit for it. ``attainment_halves`` shows the
    run's own noise: the same mode measured on the two halves of the schedule.
    """
    outcomes = [o for results, _ in halves for o in results]
    span = sum(span for _, span in halves)
    met = [met_slo(o, scale * solo_s[o.key]) for o in outcomes]
    served = [o.latency_s for o in outcomes if o.status == "ok"]
    refused = [o.latency_s for o in outcomes if o.status == "refused"]
    modes_run: dict[str, int] = {}
    for o in outcomes:
        if o.mode_run:
            modes_run[o.mode_run] = modes_run.get(o.mode_run, 0) + 1
    per_half = [
        sum(met_slo(o, scale * solo_s[o.key]) for o in results) / len(results) if results else float("nan")
        for results, _ in halves
    ]
    return {
        "process": process,
        "load": load,
        "slo_scale": scale,
        "mode": mode,
        "requests": len(outcomes),
        "attainment": sum(met) / len(outcomes) if outcomes else float("nan"),
        "attainment_halves": json.dumps([round(a, 3) for a in per_half]),
        "p50_s": percentile(served, 50),
        "p95_s": percentile(served, 95),
        "p99_s": percentile(served, 99),
        "goodput_per_s": sum(met) / span if span > 0 else 0.0,
        "refused": len(refused),
        "refusal_max_s": max(refused) if refused else 0.0,
        "expired": sum(o.status == "expired" for o in outcomes),
        "errors": sum(o.status == "error" for o in outcomes),
        "modes_run": json.dumps(modes_run, sort_keys=True),
    }


def _halves(row: dict) -> list[float]:
    return [h for h in json.loads(row["attainment_halves"]) if h == h]  # NaN: a half without requests


def noise(row: dict) -> float:
    """Half the spread of a row's two halves: how far the same mode on the same load measured apart."""
    halves = _halves(row)
    return (max(halves) - min(halves)) / 2 if len(halves) == 2 else 0.0


def verdict(rows: list[dict], fixed_modes: tuple[str, ...] = ("serial", "cfg_parallel", "hybrid"),
            overload: float = 1.5) -> list[str]:
    """Markdown lines that check issue 11's targets against a run's rows.

    Per (process, SLO scale, load): ``auto``'s attainment against the best fixed mode's, with the noise
    of both (each row's halves); ``auto`` holds its own where it is at least the best minus that noise.
    At the ``overload`` load: the slowest refusal, failures other than refusals, and ``auto``'s goodput
    against the best goodput any mode reached at any load of the same process and scale.
    """
    lines = ["| process | SLO scale | load | auto | best fixed (mode) | auto - best | noise | holds |",
             "|---|---|---|---|---|---|---|---|"]
    margins, holds = [], []
    groups = sorted({(r["process"], r["slo_scale"], r["load"]) for r in rows})
    for process, scale, load in groups:
        level = {r["mode"]: r for r in rows if (r["process"], r["slo_scale"], r["load"]) == (process, scale, load)}
        fixed = [level[m] for m in fixed_modes if m in level]
        if "auto" not in level or not fixed:
            continue
        best = max(fixed, key=lambda r: r["attainment"])
        auto = level["auto"]
        margin = auto["attainment"] - best["attainment"]
        slack = max(noise(auto), noise(best))
        ok = margin >= -slack - 1e-9
        margins.append(min(auto["attainment"] - r["attainment"] for r in fixed))
        holds.append(ok)
        lines.append(f"| {process} | {scale:g} | {load:g} | {auto['attainment']:.0%} | {best['attainment']:.0%} "
                     f"({best['mode']}) | {100 * margin:+.0f} pts | {100 * slack:.0f} pts | {'yes' if ok else 'NO'} |")
    summary = [
        f"* `auto` at least the best fixed mode within the run's noise: {sum(holds)} of {len(holds)} levels.",
        f"* Largest lead of `auto` over every fixed mode at one level: {100 * max(margins, default=0):+.0f} points.",
    ]
    for process, scale in sorted({(r["process"], r["slo_scale"]) for r in rows}):
        mine = [r for r in rows if (r["process"], r["slo_scale"]) == (process, scale)]
        top = max((r["goodput_per_s"] for r in mine), default=0.0)
        for r in mine:
            if r["mode"] != "auto" or abs(r["load"] - overload) > 1e-9:
                continue
            summary.append(
                f"* {process}, SLO {scale:g}x, load {overload:g}: slowest refusal {r['refusal_max_s']:.2f} s, "
                f"failures other than refusals {r['expired'] + r['errors']} ({r['expired']} past their SLO, "
                f"{r['errors']} errors), `auto` goodput {r['goodput_per_s']:.3f}/s = "
                f"{r['goodput_per_s'] / top if top else 0:.0%} of the best at any load ({top:.3f}/s)."
            )
    return summary + [""] + lines

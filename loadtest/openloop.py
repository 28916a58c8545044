"""Open-loop load test: SLO attainment per mode when requests arrive on their own schedule.

    python -m loadtest.openloop                        # starts a server on model_repository
    python -m loadtest.openloop --url 127.0.0.1:8001   # or uses a running one (gRPC, local only)

Requests are sent at their drawn arrival times whether or not earlier ones have returned (Poisson,
and a bursty Gamma process), from a fixed seed, so every mode sees the same arrivals. The SLO of a
request is a multiple of its latency alone in ``serial``, sent as the request's timeout so that
``auto`` can plan for it (one SLO scale per pass; ``--no-slo-timeout``: one pass without timeouts
reports every scale); loads are fractions of the measured serial capacity (requests per second
that ``devices`` closed-loop serial clients complete). Each level runs in ABBA halves
(``loadtest/openloop_levels.py``). Writes openloop.csv, openloop.md, openloop.png, and requests.csv: every
offered request's outcome and, if served, its placement (predicted against actual loop seconds).

asyncio with tritonclient's gRPC aio client, not Locust: Locust models users that wait for their
answer (a closed loop); here one coroutine sleeps until each arrival time and fires the request as
a task, so the offered times do not depend on the server, and the lag between the planned and the
actual send time is measured and reported.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from client.generate import build_inputs
from loadtest.csvfile import write_csv
from loadtest.openloop_levels import (
    MODES,
    PLACEMENT_FIELDS,
    PROCESSES,
    PROMPTS,
    Half,
    Offered,
    Outcome,
    level_order,
    level_row,
    offered_requests,
    outcome_status,
    slo_passes,
    slo_timeouts,
    verdict,
)

LOCAL_PREFIXES = ("127.", "localhost", "[::1]")


def _fields(offered: Offered, mode: str, steps: int) -> dict:
    return {"mode": mode, "seed": offered.seed, "steps": steps, "height": offered.size, "width": offered.size}


async def send(
    client, offered: Offered, mode: str, steps: int, started: float, timeout_s: float, slo_s: float | None = None
) -> Outcome:
    """One request; a refusal, an expiry and any other error are outcomes, never exceptions.

    ``slo_s``: sent as the request's Triton timeout (the server refuses or stops it once that passed,
    and ``auto`` places it to meet it); ``timeout_s`` bounds the wait here.
    """
    from tritonclient.grpc import InferRequestedOutput
    from tritonclient.utils import InferenceServerException

    loop = asyncio.get_running_loop()
    sent = loop.time()
    outputs = [InferRequestedOutput("IMAGE"), InferRequestedOutput("SCHEDULE")]
    server_timeout = None if slo_s is None else max(1, round(slo_s * 1e6))
    try:
        result = await client.infer(
            "sdxl", build_inputs("grpc", [PROMPTS[offered.prompt]], **_fields(offered, mode, steps)),
            outputs=outputs, timeout=server_timeout, client_timeout=timeout_s,
        )
        schedule = json.loads(result.as_numpy("SCHEDULE").reshape(-1)[0])
        placed = {name: schedule.get(name) for name in PLACEMENT_FIELDS}
        return Outcome(offered.index, offered.key, sent - started, loop.time() - sent, "ok", schedule["mode_run"],
                       placed)
    except InferenceServerException as err:
        status = outcome_status(str(err.status()), str(err.message()))
        return Outcome(offered.index, offered.key, sent - started, loop.time() - sent, status)


async def run_half(
    url: str, half: Half, steps: int, timeout_s: float, slos: dict[str, float] | None = None
) -> tuple[list[Outcome], float, float]:
    """Offer the half's requests at their times (each with its SLO from ``slos`` as its timeout); returns
    outcomes, span (first send to last answer) and the largest lag of a send behind its planned time
    (large values mean the client fell behind)."""
    from tritonclient.grpc.aio import InferenceServerClient

    client = InferenceServerClient(url)
    loop = asyncio.get_running_loop()
    started = loop.time()
    tasks, lag = [], 0.0
    try:
        for offered in half.requests:
            await asyncio.sleep(max(0.0, started + offered.at_s - loop.time()))
            lag = max(lag, loop.time() - started - offered.at_s)
            slo_s = None if slos is None else slos[offered.key]
            tasks.append(asyncio.create_task(send(client, offered, half.mode, steps, started, timeout_s, slo_s)))
        outcomes = list(await asyncio.gather(*tasks))
    finally:
        await client.close()
    span = max(o.sent_s + o.latency_s for o in outcomes)
    return outcomes, span, lag


async def solo_latencies(url: str, keys: dict[str, Offered], steps: int, repeats: int, timeout_s: float) -> dict:
    """Median latency of each distinct request alone in ``serial`` (one after another)."""
    from tritonclient.grpc.aio import InferenceServerClient

    client = InferenceServerClient(url)
    solo = {}
    try:
        for key, offered in sorted(keys.items()):
            times = []
            for _ in range(repeats):
                outcome = await send(client, offered, "serial", steps, asyncio.get_running_loop().time(), timeout_s)
                if outcome.status != "ok":
                    raise RuntimeError(f"solo serial request {key} failed: {outcome}")
                times.append(outcome.latency_s)
            solo[key] = statistics.median(times)
    finally:
        await client.close()
    return solo


async def warm(url: str, modes: list[str], offered: Offered, timeout_s: float) -> None:
    """One short request per mode, so no measured level pays a first call's set-up."""
    from tritonclient.grpc.aio import InferenceServerClient

    client = InferenceServerClient(url)
    try:
        for mode in modes:
            await send(client, offered, mode, 2, 0.0, timeout_s)
    finally:
        await client.close()


async def serial_capacity(url: str, sample: list[Offered], steps: int, devices: int, timeout_s: float) -> float:
    """Requests per second that ``devices`` closed-loop clients complete in ``serial`` (each its share).

    A refusal (a queue smaller than the clients can fill between a response and the next send) is
    retried after a short back-off, so the figure is the rate of served requests.
    """
    from tritonclient.grpc.aio import InferenceServerClient

    async def worker(share: list[Offered]) -> None:
        client = InferenceServerClient(url)
        try:
            for offered in share:
                outcome = await send(client, offered, "serial", steps, 0.0, timeout_s)
                for attempt in range(1, 21):  # a full queue refuses (retryable): back off and retry, bounded
                    if outcome.status != "refused":
                        break
                    await asyncio.sleep(0.05 * attempt)
                    outcome = await send(client, offered, "serial", steps, 0.0, timeout_s)
                if outcome.status != "ok":
                    raise RuntimeError(f"capacity request failed: {outcome}")
        finally:
            await client.close()

    started = time.perf_counter()
    await asyncio.gather(*(worker(sample[i::devices]) for i in range(devices)))
    return len(sample) / (time.perf_counter() - started)


def write_outputs(rows: list[dict], out: Path, header: str, scales: list[float]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "openloop.csv", rows, list(rows[0]))
    lines = [header, ""]
    columns = ["process", "load", "slo_scale", "mode", "requests", "attainment", "attainment_halves", "p50_s",
               "p95_s", "p99_s", "goodput_per_s", "refused", "refusal_max_s", "expired", "errors", "modes_run"]
    lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        cells = [f"{r[c]:.3f}" if isinstance(r[c], float) else str(r[c]) for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "## Against the targets", "", *verdict(rows)]
    (out / "openloop.md").write_text("\n".join(lines) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    processes = list(dict.fromkeys(r["process"] for r in rows))
    fig, axes = plt.subplots(len(processes), len(scales), figsize=(4.2 * len(scales), 3.6 * len(processes)),
                             squeeze=False, sharey=True)
    for p, process in enumerate(processes):
        for s, scale in enumerate(scales):
            axis = axes[p][s]
            for mode in dict.fromkeys(r["mode"] for r in rows):
                mine = [r for r in rows if r["process"] == process and r["slo_scale"] == scale and r["mode"] == mode]
                axis.plot([r["load"] for r in mine], [100 * r["attainment"] for r in mine], marker="o", label=mode)
            axis.set(title=f"{process}, SLO {scale:g}x solo serial", xlabel="load (x serial capacity)",
                     ylabel="SLO attainment (%)", ylim=(-2, 102))
            axis.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "openloop.png", dpi=110)


def _commit() -> str:
    """The checkout's commit when the run starts, ``-dirty`` if it has uncommitted changes."""
    root = Path(__file__).resolve().parents[1]

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=root, timeout=10).stdout.strip()

    try:
        commit = git("rev-parse", "--short", "HEAD") or "unknown"
        return commit + ("-dirty" if git("status", "--porcelain", "--untracked-files=no") else "")
    except OSError:
        return "unknown"


def request_row(process: str, load: float, slo_scale: float, mode: str, half: int, outcome: Outcome) -> dict:
    """One offered request as requests.csv records it: its outcome and, if served, its placement."""
    placed = outcome.placed or {}
    return {
        "process": process, "load": load, "slo_scale": slo_scale, "mode": mode, "half": half,
        "index": outcome.index, "key": outcome.key, "sent_s": round(outcome.sent_s, 3),
        "latency_s": round(outcome.latency_s, 3), "status": outcome.status, "mode_run": outcome.mode_run or "",
        **{name: json.dumps(placed.get(name)) if isinstance(placed.get(name), list) else placed.get(name, "")
           for name in PLACEMENT_FIELDS},
    }


async def sweep(args, url: str) -> tuple[list[dict], str, list[dict]]:
    commit = _commit()
    modes, loads = args.modes.split(","), [float(x) for x in args.loads.split(",")]
    processes, scales = args.processes.split(","), [float(x) for x in args.slo_scales.split(",")]
    sizes = [int(s) for s in args.sizes.split(",")]
    deadline = time.monotonic() + args.max_seconds
    timeout_s = args.request_timeout
    # Every distinct request of the mix (prompt x size), for the solo latencies and the capacity run.
    distinct = {o.key: o for o in (Offered(i, 0.0, p, s) for i, (p, s) in
                                   enumerate((p, s) for p in range(len(PROMPTS)) for s in sizes))}
    await warm(url, modes, Offered(0, 0.0, 0, sizes[0]), timeout_s)
    solo = await solo_latencies(url, distinct, args.steps, args.solo_repeats, timeout_s)
    capacity = args.capacity or await serial_capacity(
        url, [distinct[k] for k in sorted(distinct)] * args.capacity_rounds, args.steps, args.devices, timeout_s)
    print(f"solo serial latency: {json.dumps({k: round(v, 3) for k, v in solo.items()})}; "
          f"serial capacity {capacity:.3f} requests/s", flush=True)
    rows, requests, partial, worst_lag = [], [], False, 0.0
    passes = [(process, sent, reported)
              for process in processes for sent, reported in slo_passes(scales, args.slo_timeout)]
    for process, sent_scale, reported in passes:
        slos = slo_timeouts(solo, sent_scale)
        for load in loads:
            rate = load * capacity
            count = max(args.min_requests, round(rate * args.level_seconds))
            offered = offered_requests(rate, count, process, args.seed, sizes, args.cv)
            halves: dict[str, list[tuple[list[Outcome], float]]] = {m: [] for m in modes}
            for half in level_order(modes, offered):
                if time.monotonic() > deadline:
                    partial = True
                    break
                outcomes, span, lag = await run_half(url, half, args.steps, timeout_s, slos)
                worst_lag = max(worst_lag, lag)
                halves[half.mode].append((outcomes, span))
                requests += [request_row(process, load, sent_scale, half.mode, half.index, o) for o in outcomes]
                counts = " ".join(f"{status}={sum(o.status == status for o in outcomes)}"
                                  for status in ("ok", "refused", "expired", "error"))
                print(f"{process} slo={sent_scale} load={load} mode={half.mode} half={half.index} "
                      f"requests={len(outcomes)} {counts} span={span:.1f}s", flush=True)
            if partial:
                break
            for scale in reported:
                for mode in modes:
                    rows.append(level_row(mode, load, process, scale, halves[mode], solo))
        if partial:
            break
    header = (
        f"Open-loop test, `python -m loadtest.openloop {' '.join(args.argv)}` at commit {commit} "
        f"({os.cpu_count()} cores). Steps {args.steps}, sizes {args.sizes}, seed {args.seed}, bursty CV {args.cv}. "
        f"Serial capacity {capacity:.3f} requests/s ({'given' if args.capacity else 'measured'}); solo serial "
        f"latency per request (median of {args.solo_repeats}): "
        f"{', '.join(f'{k} {v:.2f} s' for k, v in sorted(solo.items()))}. SLO = scale x that latency"
        + ("; sent as each request's timeout, one pass per scale" if args.slo_timeout else "; no request timeout")
        + f"; refusals, expiries and errors count as misses. Largest send lag {worst_lag * 1000:.0f} ms."
        + (" PARTIAL: --max-seconds ran out before every level ran." if partial else "")
    )
    return rows, header, requests


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", help="a running server's gRPC endpoint host:port (local addresses only)")
    parser.add_argument("--repository", type=Path, default=Path("model_repository"))
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--processes", default=",".join(PROCESSES))
    parser.add_argument("--loads", default="0.2,0.5,0.8,1.0,1.2,1.5", help="fractions of the serial capacity")
    parser.add_argument("--slo-scales", default="1.0,1.5,2.0")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--sizes", default="256")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cv", type=float, default=2.0, help="coefficient of variation of the bursty gaps")
    parser.add_argument("--devices", type=int, default=2, help="closed-loop clients of the capacity run")
    parser.add_argument("--capacity", type=float, help="serial capacity in requests/s (default: measure it)")
    parser.add_argument("--capacity-rounds", type=int, default=2, help="each distinct request this often")
    parser.add_argument("--solo-repeats", type=int, default=3)
    parser.add_argument("--level-seconds", type=float, default=60.0, help="arrivals per level span about this")
    parser.add_argument("--min-requests", type=int, default=6)
    parser.add_argument("--request-timeout", type=float, default=300.0, help="the client's own wait, seconds")
    parser.add_argument("--slo-timeout", action=argparse.BooleanOptionalAction, default=True,
                        help="send each request's SLO as its Triton timeout, one pass per SLO scale "
                             "(--no-slo-timeout: one pass, no timeout, every scale reported from it)")
    parser.add_argument("--max-seconds", type=float, default=5400.0, help="stop starting new halves after this")
    parser.add_argument("--out", type=Path, default=Path("out/openloop"))
    args = parser.parse_args(argv)
    args.argv = argv if argv is not None else sys.argv[1:]

    if args.url is not None and not args.url.startswith(LOCAL_PREFIXES):
        parser.error("load tests only target this machine (127.0.0.1, localhost or [::1])")
    from tools.triton_process import server_unless_given

    args.out.mkdir(parents=True, exist_ok=True)
    # The server's log stays with the report: each request stopped at its deadline is logged with its placement.
    with server_unless_given(args.repository, args.url, ready_timeout=600,
                             log_file=args.out / "tritonserver.log") as server:
        rows, header, requests = asyncio.run(sweep(args, server.grpc_url if server is not None else args.url))
    if requests:
        write_csv(args.out / "requests.csv", requests, list(requests[0]))
    if not rows:
        raise SystemExit("no level completed within --max-seconds")
    write_outputs(rows, args.out, header, [float(x) for x in args.slo_scales.split(",")])
    print(header)


if __name__ == "__main__":
    main()

"""Headless concurrency sweep: p50/p95 latency and images/s per mode at 1, 2, 4, 8 users.

    python -m loadtest.run                       # starts a server on the small model
    python -m loadtest.run --url 127.0.0.1:8000  # or uses a running one (local addresses only)

For each user count, every mode (and ``auto``) runs in turn, then again in reverse order (see
``loadtest/levels.py``): Locust users send requests back to back, user i continuing its own fixed
sequence, ``--requests-per-user`` requests per user and mode over the two halves (or fewer if
``--seconds`` pass), so every mode gets exactly the same work; a half ends when its last request
returns (halves never overlap). A mode's row pools its two halves, so the machine's drift over the
sweep (a shared VM here) does not favour the mode that happened to run at a fast moment.
Triton's own queue time per model comes from its metrics endpoint. Afterwards every distinct
request is run alone and each image from the sweep must equal it (max abs pixel difference <= 1).
Writes CSV, Markdown and a PNG.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import time
import urllib.request
from pathlib import Path

import gevent
import numpy as np
from locust.env import Environment

from client.generate import generate, make_client
from loadtest.csvfile import write_csv
from loadtest.levels import PROMPTS, Half, HalfResult, pooled_row, queue_delta, sweep_order
from loadtest.locustfile import GrpcImageUser, HttpImageUser, ImageUser
from loadtest.sink import Sink

LOCAL_PREFIXES = ("127.", "localhost", "[::1]")
METRIC_LINE = re.compile(r'(nv_inference_queue_duration_us|nv_inference_request_success)\{model="([^"]+)".*\} (\S+)')


def queue_metrics(metrics_url: str) -> dict[str, tuple[float, float]]:
    """Per model: (cumulative queue time in us, cumulative successful requests)."""
    text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    queue, success = {}, {}
    for line in text.splitlines():
        match = METRIC_LINE.match(line)
        if match:
            target = queue if match.group(1) == "nv_inference_queue_duration_us" else success
            target[match.group(2)] = target.get(match.group(2), 0.0) + float(match.group(3))
    return {m: (queue.get(m, 0.0), success.get(m, 0.0)) for m in set(queue) | set(success)}


def run_half(host: str, user_class, users: int, half: Half, seconds: float) -> tuple[Sink, float]:
    """Run one half of a level; returns its results and its start time."""
    os.environ["LOADTEST_MODE"] = half.mode
    ImageUser.started = 0
    env = Environment(user_classes=[user_class], host=host)
    sink = Sink(quota=half.quota, deadline=time.perf_counter() + seconds, first_request=half.first_request)
    env.hybridiff_sink = sink
    runner = env.create_local_runner()
    started = time.perf_counter()
    runner.start(users, spawn_rate=users)
    while not sink.finished_starting(users):
        gevent.sleep(0.2)
    while sink.in_flight > 0:
        gevent.sleep(0.2)
    runner.quit()
    return sink, started


def check_against_solo(url: str, protocol: str, model: str, results: list[dict]) -> tuple[int, int]:
    """Run each distinct request alone (in the mode it ran) and compare the sweep's images."""
    client = make_client(protocol, url, **({"connection_timeout": 600.0, "network_timeout": 600.0}
                                           if protocol == "http" else {}))
    solo: dict[str, np.ndarray] = {}
    worst, checked = 0, 0
    try:
        for r in results:
            if r["image"] is None:
                continue
            fields = {**r["fields"], "mode": r["mode_run"]}
            key = json.dumps([r["prompt"], fields], sort_keys=True)
            if key not in solo:
                solo[key] = generate(client, protocol, model, [PROMPTS[r["prompt"]]], **fields).images[0]
            diff = int(np.abs(solo[key].astype(np.int16) - r["image"].astype(np.int16)).max())
            worst = max(worst, diff)
            checked += 1
    finally:
        client.close()
    return worst, checked


def write_outputs(rows: list[dict], out: Path, header: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "loadtest.csv", rows, list(rows[0]))
    lines = [header, "", "| mode | users | requests | failures | p50 | p95 | images/s | images/s by half "
             "| modes run | queue ms/request |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['mode']} | {r['users']} | {r['requests']} | {r['failures']} | {r['p50_s']:.2f} s "
            f"| {r['p95_s']:.2f} s | {r['images_per_s']:.3f} | {r['images_per_s_halves']} | {r['modes_run']} "
            f"| {r['queue_ms_per_request']} |"
        )
    (out / "loadtest.md").write_text("\n".join(lines) + "\n")

    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for mode in dict.fromkeys(r["mode"] for r in rows):
        mine = [r for r in rows if r["mode"] == mode]
        users = [r["users"] for r in mine]
        left.plot(users, [r["p50_s"] for r in mine], marker="o", label=f"{mode} p50")
        left.plot(users, [r["p95_s"] for r in mine], marker="x", linestyle="--", label=f"{mode} p95")
        right.plot(users, [r["images_per_s"] for r in mine], marker="o", label=mode)
    left.set(xlabel="concurrent users", ylabel="latency (s)", xscale="log", xticks=[1, 2, 4, 8])
    right.set(xlabel="concurrent users", ylabel="images per second", xscale="log", xticks=[1, 2, 4, 8])
    for axis in (left, right):
        axis.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        axis.set_xticklabels(["1", "2", "4", "8"])
        axis.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "loadtest.png", dpi=110)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", help="a running server, host:port of its HTTP (or gRPC) endpoint")
    parser.add_argument("--metrics-url", help="its metrics endpoint (default: port 8002 of the same host)")
    parser.add_argument("--protocol", choices=["http", "grpc"], default="http")
    parser.add_argument("--repository", type=Path, default=Path("model_repository"))
    parser.add_argument("--modes", default="serial,cfg_parallel,hybrid,auto")
    parser.add_argument("--users", default="1,2,4,8")
    parser.add_argument("--requests-per-user", type=int, default=8, help="per user and level (both halves)")
    parser.add_argument("--seconds", type=float, default=300.0, help="per half level, at most")
    parser.add_argument("--out", type=Path, default=Path("out/loadtest"))
    args = parser.parse_args(argv)

    if args.url is not None and not args.url.startswith(LOCAL_PREFIXES):
        parser.error("load tests only target this machine (127.0.0.1, localhost or [::1])")
    user_class = HttpImageUser if args.protocol == "http" else GrpcImageUser
    modes = args.modes.split(",")
    rows, results = [], []
    from tools.triton_process import server_unless_given

    with server_unless_given(args.repository, args.url, ready_timeout=600) as server:
        if server is not None:
            url = server.http_url if args.protocol == "http" else server.grpc_url
            metrics_url = server.metrics_url
        else:
            url = args.url
            metrics_url = args.metrics_url or f"http://{url.rsplit(':', 1)[0]}:8002/metrics"
        warm = make_client(args.protocol, url)
        generate(warm, args.protocol, "sdxl", ["warm-up"], steps=2, height=256, width=256, mode="hybrid")
        warm.close()
        for users in [int(u) for u in args.users.split(",")]:
            halves: dict[str, list[HalfResult]] = {mode: [] for mode in modes}
            for half in sweep_order(modes, args.requests_per_user):
                before = queue_metrics(metrics_url)
                sink, started = run_half(url, user_class, users, half, args.seconds)
                ended = max((r["finished"] for r in sink.results), default=started)
                done = HalfResult(sink.results, ended - started, queue_delta(before, queue_metrics(metrics_url)))
                halves[half.mode].append(done)
                results.extend(sink.results)
                print(f"users={users} mode={half.mode} half={half.index} requests={len(sink.results)} "
                      f"seconds={done.span_s:.1f}", flush=True)
            for mode in modes:
                row = pooled_row(mode, users, halves[mode])
                rows.append(row)
                print(" ".join(f"{k}={v}" for k, v in row.items()), flush=True)
        rows.sort(key=lambda r: (modes.index(r["mode"]), r["users"]))
        worst, checked = check_against_solo(url, args.protocol, "sdxl", results)
    failures = sum(r["failures"] for r in rows)
    header = (f"Measured with `make loadtest` ({args.protocol}, {os.cpu_count()} cores, one core per device). "
              f"Failed requests: {failures}. Images checked against the same request alone: {checked}, "
              f"max abs pixel difference {worst}.")
    write_outputs(rows, args.out, header)
    print(header)
    if failures or worst > 1:
        raise SystemExit(1)


if __name__ == "__main__":
    main()

"""Soak: many requests of both families, every mode and mixed sizes, and each process's RSS across them.

    python -m loadtest.soak --requests 1000 --out out/soak

Starts a server (127.0.0.1) on a repository it generates with both families (the built-in ``tiny``
checkpoints by default, ``--size small`` for the larger ones), then sends ``--requests`` requests from
``--users`` concurrent clients, cycling deterministically through family x mode x size x protocol
(HTTP and gRPC). Requests go in chunks of ``--sample-every``; between chunks nothing is in flight and
the RSS (``VmRSS``) of tritonserver and of every Python stub is recorded. The first chunk is the
warm-up; growth is measured from the sample after it to the last one. Writes ``soak.csv`` (one row per
process: model, RSS after warm-up, at the end, growth %), ``rss_trace.csv`` (every sample) and
``soak.md`` (totals, failures by reason, wall time, the table, the command and commit). Bounded by
``--time-limit-s``: past it, no new chunk starts and the report says how many requests were sent.
"""

from __future__ import annotations

import argparse
import itertools
import os
import queue
import shlex
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from loadtest.csvfile import write_csv

FAMILIES = ("sdxl", "sd3")
MODES = ("serial", "cfg_parallel", "pipeline", "hybrid", "auto")
SIZES = (64, 96, 128)
PROTOCOLS = ("http", "grpc")
PROMPTS = ("a lighthouse at dusk", "a red fox in snow", "a bowl of peaches", "a neon street at night")
GROWTH_LIMIT_PCT = 2.0


@dataclass(frozen=True)
class Job:
    """One planned request."""

    index: int
    family: str
    mode: str
    size: int
    steps: int
    protocol: str
    seed: int
    prompt: str


def request_plan(
    n: int,
    families: Sequence[str] = FAMILIES,
    modes: Sequence[str] = MODES,
    sizes: Sequence[int] = SIZES,
    steps: Sequence[int] = (4, 6),
    protocols: Sequence[str] = PROTOCOLS,
) -> list[Job]:
    """``n`` requests cycling through every family x mode x size x protocol combination.

    The family varies fastest, then the mode, the protocol, the size: any window of
    ``len(families) * len(modes) * len(protocols) * len(sizes)`` consecutive requests holds each
    combination once, so a warm-up at least that long has seen every shape the rest will send.
    Steps change cycle by cycle; seed and prompt follow the index; the plan depends on nothing else.
    """
    if n < 0:
        raise ValueError(f"requests must be >= 0, got {n}")
    for name, values in (("families", families), ("modes", modes), ("sizes", sizes), ("steps", steps),
                         ("protocols", protocols)):
        if not values:
            raise ValueError(f"{name} must not be empty")
    combos = [(family, mode, protocol, size)
              for size, protocol, mode, family in itertools.product(sizes, protocols, modes, families)]
    jobs = []
    for i in range(n):
        family, mode, protocol, size = combos[i % len(combos)]
        jobs.append(Job(i, family, mode, size, steps[i // len(combos) % len(steps)], protocol, seed=i % 997,
                        prompt=PROMPTS[i % len(PROMPTS)]))
    return jobs


# VmRSS = RssAnon (heap, stacks) + RssFile (mapped files) + RssShmem (shared memory, e.g. the Python
# backend's regions, which count in tritonserver's RSS as their pages are first touched).
RSS_PARTS = ("RssAnon", "RssShmem")


def parse_status_kib(status_text: str, field: str = "VmRSS") -> int:
    """One ``<field>: <n> kB`` value of ``/proc/<pid>/status``, in KiB."""
    for line in status_text.splitlines():
        if line.startswith(f"{field}:"):
            value, unit = line.split()[1:3]
            if unit != "kB":
                raise ValueError(f"unexpected {field} unit {unit!r}")
            return int(value)
    raise ValueError(f"no {field} line (kernel thread or exited process)")


def read_rss_kib(pid: int, proc_root: Path = Path("/proc"), fields: Sequence[str] = ("VmRSS",)) -> dict | None:
    """``fields`` of the process's status in KiB, or None when it is gone."""
    try:
        text = (proc_root / str(pid) / "status").read_text()
        return {field: parse_status_kib(text, field) for field in fields}
    except (OSError, ValueError):
        return None


def growth_pct(before_kib: int, after_kib: int) -> float:
    """Growth from ``before`` to ``after`` in percent of ``before`` (negative when it shrank)."""
    if before_kib <= 0:
        raise ValueError(f"before must be > 0 KiB, got {before_kib}")
    return 100.0 * (after_kib - before_kib) / before_kib


@dataclass(frozen=True)
class Proc:
    """One process whose RSS the soak watches."""

    pid: int
    model: str  # "tritonserver" for the server itself
    instance: str


def watched_processes(server_pid: int) -> list[Proc]:
    """tritonserver and every live stub of it, stubs named by their model instance."""
    from hybridiff.supervisor import scan_stubs

    stubs = sorted(scan_stubs(server_pid).values(), key=lambda s: s.instance)
    return [Proc(server_pid, "tritonserver", "tritonserver")] + [Proc(s.pid, s.model, s.instance) for s in stubs]


Sample = dict[int, int]  # pid -> RSS KiB


def growth_rows(procs: Sequence[Proc], warm: Sample, end: Sample, trace: Sequence[Sample] = (),
                ready: Sample | None = None) -> list[dict]:
    """One row per process: RSS at ready (before any request), after warm-up and at the end, growth % from
    warm-up to end, and the peak over the samples after the warm-up (``trace``)."""
    rows = []
    for proc in procs:
        before, after = warm.get(proc.pid), end.get(proc.pid)
        peak = max((s[proc.pid] for s in trace if proc.pid in s), default=None)
        at_ready = (ready or {}).get(proc.pid)
        rows.append({
            "model": proc.model,
            "instance": proc.instance,
            "pid": proc.pid,
            "rss_at_ready_kib": "" if at_ready is None else at_ready,
            "rss_after_warmup_kib": "" if before is None else before,
            "rss_end_kib": "" if after is None else after,
            "growth_pct": "" if before is None or after is None else round(growth_pct(before, after), 2),
            "peak_after_warmup_kib": "" if peak is None else peak,
            "note": "" if after is not None else "gone by the end (restarted or exited)",
        })
    return rows


def worst(rows: Sequence[dict]) -> dict | None:
    """The row with the largest growth, or None when no process has two samples."""
    measured = [r for r in rows if r["growth_pct"] != ""]
    return max(measured, key=lambda r: r["growth_pct"]) if measured else None


def failure_reason(error: BaseException | str) -> str:
    """A short, stable reason for a failed request, for counting."""
    return " ".join(str(error).split())[:120] or type(error).__name__


@dataclass
class Result:
    job: Job
    ok: bool
    seconds: float
    reason: str | None = None


Sender = Callable[[Job], None]  # sends one request, raises on failure


class Workers:
    """``users`` long-lived client threads; each builds its own sender (``make_sender(user)`` returns the
    sender and a close function) on its own thread and keeps it for the whole run: tritonclient's HTTP
    client is bound to the thread that first used it (gevent), so a client may not move between threads."""

    def __init__(self, users: int, make_sender: Callable[[int], tuple[Sender, Callable[[], None]]]) -> None:
        self._todo: queue.Queue[Job | None] = queue.Queue()
        self._results: list[Result] = []
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._user, args=(u, make_sender), daemon=True)
                         for u in range(users)]
        for thread in self._threads:
            thread.start()

    def _user(self, user: int, make_sender: Callable[[int], tuple[Sender, Callable[[], None]]]) -> None:
        try:
            send, close = make_sender(user)
        except Exception as err:  # e.g. no connection: every job of this user fails with that reason
            def send(job: Job, err: Exception = err) -> None:
                raise err

            def close() -> None:
                pass

        while (job := self._todo.get()) is not None:
            started = time.monotonic()
            try:
                send(job)
                result = Result(job, True, time.monotonic() - started)
            except Exception as err:  # counted by reason
                result = Result(job, False, time.monotonic() - started, failure_reason(err))
            with self._lock:
                self._results.append(result)
            self._todo.task_done()
        self._todo.task_done()  # the sentinel
        close()

    def run(self, jobs: Sequence[Job]) -> list[Result]:
        """Send ``jobs``; return their results, in plan order, once none is in flight."""
        with self._lock:
            self._results = []
        for job in jobs:
            self._todo.put(job)
        self._todo.join()
        with self._lock:
            return sorted(self._results, key=lambda r: r.job.index)

    def close(self, timeout_s: float = 30.0) -> None:
        for _ in self._threads:
            self._todo.put(None)
        for thread in self._threads:
            thread.join(timeout_s)


def client_sender(http_url: str, grpc_url: str, timeout_s: float) -> Callable[[int], tuple[Sender, Callable]]:
    """``make_sender`` for ``Workers``: one HTTP and one gRPC client per user; checks the image it gets."""

    def make(user: int) -> tuple[Sender, Callable[[], None]]:
        from client.generate import generate, make_client

        clients = {"http": make_client("http", http_url, connection_timeout=timeout_s, network_timeout=timeout_s),
                   "grpc": make_client("grpc", grpc_url)}

        def send(job: Job) -> None:
            result = generate(clients[job.protocol], job.protocol, job.family, [job.prompt], timeout_s=timeout_s,
                              mode=job.mode, seed=job.seed, steps=job.steps, height=job.size, width=job.size)
            if len(result.images) != 1 or result.images[0].shape != (job.size, job.size, 3):
                raise RuntimeError(f"unexpected images {[i.shape for i in result.images]}")

        def close() -> None:
            for client in clients.values():
                client.close()

        return send, close

    return make


def markdown(rows: Sequence[dict], results: Sequence[Result], planned: int, header: str, wall_s: float,
             requests_s: float, warmup: int, stopped_early: bool) -> str:
    failed = [r for r in results if not r.ok]
    reasons = Counter(r.reason for r in failed)
    top = worst(rows)
    lines = [header, ""]
    lines.append(f"Requests planned {planned}, sent {len(results)}, succeeded {len(results) - len(failed)}, "
                 f"failed {len(failed)}; wall time {wall_s:.0f} s ({requests_s:.0f} s of requests after the "
                 f"server was ready)"
                 + (" (stopped early at the time limit)." if stopped_early else "."))
    lines.append("Failures: " + (", ".join(f"{n}x {reason}" for reason, n in reasons.most_common()) or "none")
                 + ".")
    covered = Counter((r.job.family, r.job.mode) for r in results if r.ok)
    lines.append("Succeeded per family and mode: "
                 + ", ".join(f"{f}/{m} {n}" for (f, m), n in sorted(covered.items())) + ".")
    if top is not None:
        verdict = "within" if top["growth_pct"] <= GROWTH_LIMIT_PCT else "OVER"
        lines.append(f"Largest RSS growth after the warm-up ({warmup} requests): {top['growth_pct']}% "
                     f"({top['model']}, {top['instance']}), {verdict} the {GROWTH_LIMIT_PCT}% target.")
    lines += ["", "| process | model | RSS at ready (MiB) | RSS after warm-up (MiB) | RSS at end (MiB) | growth "
              "| peak after warm-up (MiB) | note |", "|---|---|---|---|---|---|---|---|"]

    def mib(value) -> str:
        return "-" if value == "" else f"{value / 1024:.1f}"

    for r in rows:
        growth = "-" if r["growth_pct"] == "" else f"{r['growth_pct']:+.2f}%"
        lines.append(f"| {r['instance']} (pid {r['pid']}) | {r['model']} | {mib(r['rss_at_ready_kib'])} "
                     f"| {mib(r['rss_after_warmup_kib'])} "
                     f"| {mib(r['rss_end_kib'])} | {growth} | {mib(r['peak_after_warmup_kib'])} | {r['note'] or '-'} |")
    return "\n".join(lines) + "\n"


def write_outputs(out: Path, rows: Sequence[dict], trace: Iterable[dict], md: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "soak.csv", rows, list(rows[0]) if rows else ["model"])
    trace_fields = ["requests_done", "pid", "model", "instance", "rss_kib", *(f"{part}_kib" for part in RSS_PARTS)]
    write_csv(out / "rss_trace.csv", trace, trace_fields)
    (out / "soak.md").write_text(md)


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _checkpoints(size: str, root: Path, families: Sequence[str]) -> dict[str, Path]:
    from export.build_checkpoint import build_sd3_checkpoint, build_sdxl_checkpoint

    build = {"sdxl": build_sdxl_checkpoint, "sd3": build_sd3_checkpoint}
    return {family: Path(build[family](root / f"{family}-{size}", size=size)) for family in families}


def _sample(procs: Sequence[Proc]) -> tuple[Sample, list[dict]]:
    """VmRSS by pid, and trace rows with its parts."""
    sample, parts = {}, []
    for p in procs:
        values = read_rss_kib(p.pid, fields=("VmRSS", *RSS_PARTS))
        if values is not None:
            sample[p.pid] = values["VmRSS"]
            parts.append({"pid": p.pid, "model": p.model, "instance": p.instance, "rss_kib": values["VmRSS"],
                          **{f"{part}_kib": values[part] for part in RSS_PARTS}})
    return sample, parts


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=("tiny", "small"), default="tiny", help="built-in checkpoints")
    parser.add_argument("--checkpoints", type=Path, default=Path(os.environ.get("HYBRIDIFF_CHECKPOINTS",
                                                                              "checkpoints")))
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--warmup", type=int, default=100, help="requests before the first RSS sample")
    parser.add_argument("--sample-every", type=int, default=100, help="requests between RSS samples")
    parser.add_argument("--users", type=int, default=4, help="concurrent clients")
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)), help="image sides in px")
    parser.add_argument("--steps", default="4,6")
    parser.add_argument("--request-timeout-s", type=float, default=300.0)
    parser.add_argument("--time-limit-s", type=float, default=1800.0, help="no new chunk starts past it")
    parser.add_argument("--out", type=Path, default=Path("out/soak"))
    args = parser.parse_args(argv)
    if args.warmup < 1 or args.sample_every < 1 or args.requests <= args.warmup:
        parser.error("need requests > warmup >= 1 and sample-every >= 1")
    from export.make_repository import Deployment, write_repository
    from hybridiff.params import Limits
    from tools.triton_process import TritonServer

    families = args.families.split(",")
    sizes = [int(s) for s in args.sizes.split(",")]
    plan = request_plan(args.requests, families, MODES, sizes, [int(s) for s in args.steps.split(",")])
    command = "python -m loadtest.soak " + shlex.join(sys.argv[1:] if argv is None else argv)
    checkpoints = _checkpoints(args.size, args.checkpoints, families)
    repo = args.out / "model_repository"
    deployment = Deployment(devices=args.devices, kind="cpu",
                            limits=Limits(max_height=max(sizes), max_width=max(sizes), max_steps=64))
    write_repository(repo, checkpoints, deployment)
    bounds = [args.warmup] + list(range(args.warmup + args.sample_every, args.requests, args.sample_every))
    chunks = [plan[a:b] for a, b in zip([0] + bounds, bounds + [args.requests], strict=True)]
    results: list[Result] = []
    trace: list[dict] = []
    samples: list[Sample] = []
    stopped_early = False
    started = time.monotonic()
    with TritonServer(repo, ready_timeout=900, exit_timeout=30) as server:
        pid = server.process.pid
        procs = watched_processes(pid)
        ready, parts = _sample(procs)
        trace += [{"requests_done": 0, **row} for row in parts]
        print(f"server ready (pid {pid}, {len(procs) - 1} stubs); {len(plan)} requests in {len(chunks)} chunks",
              flush=True)
        ready_at = time.monotonic()
        workers = Workers(args.users, client_sender(server.http_url, server.grpc_url, args.request_timeout_s))
        try:
            for number, chunk in enumerate(chunks):
                if time.monotonic() - started > args.time_limit_s:
                    stopped_early = True
                    print(f"time limit {args.time_limit_s:.0f} s reached; stopping", flush=True)
                    break
                done = workers.run(chunk)
                results += done
                sample, parts = _sample(procs)
                samples.append(sample)
                trace += [{"requests_done": len(results), **row} for row in parts]
                failed = sum(not r.ok for r in done)
                total_mib = sum(sample.values()) / 1024
                print(f"chunk {number}: {len(results)}/{len(plan)} done, {failed} failed in chunk, "
                      f"{time.monotonic() - started:.0f} s, total RSS {total_mib:.0f} MiB", flush=True)
                if failed:
                    for r in done:
                        if not r.ok:
                            print(f"  failed #{r.job.index} {r.job.family}/{r.job.mode}/{r.job.size}: {r.reason}",
                                  flush=True)
        finally:
            workers.close()
            requests_s = time.monotonic() - ready_at
            stubs_now = {s.pid for s in watched_processes(pid)}
    wall_s = time.monotonic() - started
    gone = [p for p in procs if p.model != "tritonserver" and p.pid not in stubs_now]
    rows = growth_rows(procs, samples[0], samples[-1], samples[1:], ready) if len(samples) >= 2 else []
    header = (f"Measured with `{command}` at commit {_commit()} ({os.cpu_count()} cores, CPU; {args.size} "
              f"checkpoints, {args.devices} devices, {args.users} concurrent clients over HTTP and gRPC, families "
              f"{', '.join(families)}, modes {', '.join(MODES)}, sizes {', '.join(map(str, sizes))} px, steps "
              f"{args.steps}; RSS = VmRSS sampled with nothing in flight after the {args.warmup}-request warm-up "
              f"and every {args.sample_every} requests after it).")
    md = markdown(rows, results, len(plan), header, wall_s, requests_s, args.warmup, stopped_early)
    if gone:
        md += "\nStubs that were gone at the end: " + ", ".join(p.instance for p in gone) + ".\n"
    write_outputs(args.out, rows, trace, md)
    print(md)


if __name__ == "__main__":
    main()

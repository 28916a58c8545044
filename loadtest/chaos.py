"""Bounded fault injection: kill each kind of stub in turn, several times, under a mixed load.

    python -m loadtest.chaos --repository model_repository --rounds 2 --users 4 --out out/chaos

Starts a server (127.0.0.1, admin key, supervisor on) on a repository with both families, runs
``--users`` closed-loop clients (both families, every mode, the project's client with its bounded
retries), and, every ``--gap-s`` seconds, SIGKILLs one stub: per round a denoiser, the text
encoder, the VAE, an instance of the orchestrator (``<family>_orchestrator``) and an instance of the
public front (``<family>``), alternating families and denoiser devices; of a model's instances, the one
busiest at that moment (the one an out-of-memory kill would hit). A fault is recovered when the
supervisor has loaded the model again and one request in every mode of that family succeeded; its time
to recover runs from the kill. Writes ``chaos.csv`` (one row per fault) and ``chaos.md`` (totals,
failures by reason, a table per kind and one per fault, the command and commit). Requests the front
sent again (``resubmitted`` in their schedule) are counted apart from those the client retried.
"""

from __future__ import annotations

import argparse
import itertools
import os
import random
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from loadtest.csvfile import write_csv

KINDS = ("denoiser", "text_encoder", "vae", "orchestrator", "front")  # "front": the public model <family>
FAMILIES = ("sdxl", "sd3")
MODES = ("serial", "cfg_parallel", "pipeline", "hybrid", "auto")
PROMPTS = ("a lighthouse at dusk", "a red fox in snow", "a bowl of peaches", "a neon street at night")


@dataclass(frozen=True)
class Fault:
    """One planned kill."""

    index: int
    family: str
    model: str
    kind: str


def fault_plan(rounds: int, families: Sequence[str] = FAMILIES, devices: int = 2) -> list[Fault]:
    """Each round kills every kind once; families alternate fault by fault and round by round (so each
    kind hits every family), denoisers alternate devices."""
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    faults = []
    for index, (round_, kind) in enumerate(itertools.product(range(rounds), KINDS)):
        family = families[(round_ + KINDS.index(kind)) % len(families)]
        named = {"denoiser": f"{family}_denoiser_{round_ % devices}", "front": family}
        model = named.get(kind, f"{family}_{kind}")
        faults.append(Fault(index, family, model, kind))
    return faults


def failure_reason(error: BaseException | str) -> str:
    """A short, stable reason for a failed request, for counting."""
    text = str(error)
    for fragment, reason in (
        (" is unavailable (", "a model still gone at the request's deadline"),  # quotes the outage's error
        ("is not healthy", "stub process not healthy (killed while holding the request)"),
        ("is not ready", "model not ready (being brought back)"),
        ("has no available versions", "model unloaded (being brought back)"),
        ("UNAVAILABLE", "unavailable"),
        ("Deadline", "client timeout"),
    ):
        if fragment in text:
            return reason
    return "other: " + " ".join(text.split())[:100]


@dataclass
class RequestRecord:
    """One request as the client saw it, with the failures it retried past."""

    user: int
    family: str
    mode: str
    started: float
    ended: float
    ok: bool
    reason: str | None = None  # of the final failure
    retried: list[str] = field(default_factory=list)  # reasons of the failures retried past
    resubmitted: int = 0  # tries the public front sent again while the orchestrator was gone


@dataclass
class FaultRecord:
    fault: Fault
    pid: int | None = None
    instance: str | None = None
    killed_at: float | None = None
    reloaded_s: float | None = None  # kill -> supervisor loaded the model again
    serving_s: float | None = None  # kill -> one request in every mode of the family succeeded
    note: str = ""


def overlapping(requests: Sequence[RequestRecord], start: float, end: float) -> list[RequestRecord]:
    """Requests that were in flight at some moment of [start, end]."""
    return [r for r in requests if r.started <= end and r.ended >= start]


def fault_rows(faults: Sequence[FaultRecord], requests: Sequence[RequestRecord]) -> list[dict]:
    """One CSV row per fault: what was killed, when it recovered, the requests in flight meanwhile."""
    rows = []
    for record in faults:
        end = record.killed_at + (record.serving_s or 0.0) if record.killed_at is not None else None
        during = overlapping(requests, record.killed_at, end) if end is not None else []
        failed = Counter(r.reason for r in during if not r.ok)
        retried = Counter(reason for r in during for reason in r.retried)
        rows.append({
            "fault": record.fault.index,
            "kind": record.fault.kind,
            "model": record.fault.model,
            "instance": record.instance or "",
            "pid": record.pid or "",
            "reloaded_s": "" if record.reloaded_s is None else round(record.reloaded_s, 1),
            "serving_every_mode_s": "" if record.serving_s is None else round(record.serving_s, 1),
            "requests_in_window": len(during),
            "failed": sum(failed.values()),
            "failed_reasons": "; ".join(f"{n}x {reason}" for reason, n in failed.most_common()),
            "retried_past": "; ".join(f"{n}x {reason}" for reason, n in retried.most_common()),
            "resubmitted_requests": sum(r.resubmitted > 0 for r in during),
            "note": record.note,
        })
    return rows


def kind_rows(rows: Sequence[dict]) -> list[dict]:
    """One row per kind of stub killed: faults, the slowest recovery, and what the requests in the windows met."""
    result = []
    for kind in dict.fromkeys(row["kind"] for row in rows):
        mine = [row for row in rows if row["kind"] == kind]

        def slowest(column: str, mine: list[dict] = mine) -> float | str:
            values = [row[column] for row in mine]
            return "" if "" in values else max(values)  # "": a fault that did not recover

        result.append({
            "kind": kind,
            "faults": len(mine),
            "reloaded_max_s": slowest("reloaded_s"),
            "serving_every_mode_max_s": slowest("serving_every_mode_s"),
            "requests_in_windows": sum(row["requests_in_window"] for row in mine),
            "failed": sum(row["failed"] for row in mine),
            "retried_by_client": sum(bool(row["retried_past"]) for row in mine),
            "resubmitted_by_front": sum(row["resubmitted_requests"] for row in mine),
        })
    return result


def summary(requests: Sequence[RequestRecord]) -> dict:
    failed = [r for r in requests if not r.ok]
    return {
        "sent": len(requests),
        "succeeded": len(requests) - len(failed),
        "failed": len(failed),
        "failed_reasons": Counter(r.reason for r in failed),
        "retried_past": Counter(reason for r in requests for reason in r.retried),
        "resubmitted": sum(r.resubmitted > 0 for r in requests),
    }


def markdown(rows: Sequence[dict], totals: dict, header: str) -> str:
    lines = [header, ""]
    lines.append(f"Requests sent {totals['sent']}, succeeded {totals['succeeded']}, failed {totals['failed']}.")
    for title, counts in (("Failed (after the client's retries)", totals["failed_reasons"]),
                          ("Failures retried past by the client", totals["retried_past"])):
        lines.append(f"{title}: " + (", ".join(f"{n} {reason}" for reason, n in counts.most_common()) or "none") + ".")
    lines.append(f"Requests the public front sent again (their orchestrator killed): {totals['resubmitted']}.")
    lines += ["", "Per kind of stub killed (slowest recovery; requests in the fault windows):", "",
              "| kind | faults | reloaded | serving every mode | requests | failed | faults with client retries "
              "| requests sent again by the front |", "|---|---|---|---|---|---|---|---|"]
    for k in kind_rows(rows):
        lines.append(f"| {k['kind']} | {k['faults']} | {_seconds(k['reloaded_max_s'])} "
                     f"| {_seconds(k['serving_every_mode_max_s'])} | {k['requests_in_windows']} | {k['failed']} "
                     f"| {k['retried_by_client']} | {k['resubmitted_by_front']} |")
    lines += ["", "| fault | kind | model (instance) | reloaded | serving every mode | requests in window | failed "
              "| failed reasons | retried past | sent again by the front |", "|---" * 10 + "|"]
    for r in rows:
        lines.append(f"| {r['fault']} | {r['kind']} | {r['model']} ({r['instance']}) | {_seconds(r['reloaded_s'])} "
                     f"| {_seconds(r['serving_every_mode_s'])} | {r['requests_in_window']} | {r['failed']} "
                     f"| {r['failed_reasons'] or '-'} | {r['retried_past'] or '-'} | {r['resubmitted_requests']} |")
    return "\n".join(lines) + "\n"


def _seconds(value: float | str) -> str:
    return f"{value} s" if value != "" else "no"


def write_outputs(out: Path, rows: Sequence[dict], requests: Sequence[RequestRecord], header: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "chaos.csv", rows, list(rows[0]) if rows else ["fault"])
    write_csv(out / "requests.csv", (asdict(r) for r in requests), list(asdict(requests[0])) if requests else ["user"])
    (out / "chaos.md").write_text(markdown(rows, summary(requests), header))


# --- the run ---------------------------------------------------------------------------------------


class Load:
    """``users`` closed-loop clients over both families and every mode, until ``stop``."""

    def __init__(self, http_url: str, users: int, families: Sequence[str], fields: dict, retries: int) -> None:
        self.http_url = http_url
        self.users = users
        self.families = families
        self.fields = fields
        self.retries = retries
        self.records: list[RequestRecord] = []
        self.stop = threading.Event()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []

    def _user(self, user: int) -> None:
        from client.generate import generate_with_retry, make_client

        rng = random.Random(user)
        client = make_client("http", self.http_url, connection_timeout=600.0, network_timeout=600.0)
        modes = itertools.cycle(MODES[user % len(MODES):] + MODES[: user % len(MODES)])
        try:
            while not self.stop.is_set():
                family, mode = self.families[user % len(self.families)], next(modes)
                retried: list[str] = []
                started = time.monotonic()
                resubmitted = 0
                try:
                    result = generate_with_retry(
                        client, "http", family, [rng.choice(PROMPTS)], retries=self.retries,
                        on_retry=lambda n, err, d, seen=retried: seen.append(failure_reason(err)),
                        mode=mode, seed=rng.randrange(1000), **self.fields,
                    )
                    ok, reason = True, None
                    resubmitted = sum(t["tries"] for t in result.schedules[0].get("resubmitted", []))
                except Exception as err:  # counted by reason
                    ok, reason = False, failure_reason(err)
                with self._lock:
                    self.records.append(RequestRecord(user, family, mode, started, time.monotonic(), ok, reason,
                                                      retried, resubmitted))
        finally:
            client.close()

    def start(self) -> None:
        self._threads = [threading.Thread(target=self._user, args=(u,), daemon=True) for u in range(self.users)]
        for thread in self._threads:
            thread.start()

    def finish(self, timeout_s: float) -> list[RequestRecord]:
        self.stop.set()
        for thread in self._threads:
            thread.join(timeout_s)
        with self._lock:
            return list(self.records)


def probe_every_mode(http_url: str, family: str, fields: dict, deadline: float) -> bool:
    """One request per mode of ``family`` succeeds (retrying until ``deadline``)."""
    from client.generate import generate, make_client

    client = make_client("http", http_url)
    try:
        for mode in MODES:
            while True:
                try:
                    generate(client, "http", family, ["probe"], mode=mode, seed=1, **fields)
                    break
                except Exception:
                    if time.monotonic() > deadline:
                        return False
                    time.sleep(0.5)
    finally:
        client.close()
    return True


def cpu_seconds(pid: int) -> float:
    """CPU time of all threads of a process so far (schedstat: nanoseconds, where stat's ticks are 10 ms, too
    coarse for a front that only polls); 0 once it is gone."""
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return 0.0
    total = 0
    for task in tasks:
        try:
            total += int((task / "schedstat").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            continue  # a thread that ended meanwhile
    return total / 1e9


def busiest(stubs: Sequence, window_s: float = 0.5):
    """The stub that used the most CPU over ``window_s`` (an instance holding a request, where one does; ties
    to the first instance): the one whose death costs a request, which is what the fault should test."""
    ordered = sorted(stubs, key=lambda s: s.instance)
    before = {s.pid: cpu_seconds(s.pid) for s in ordered}
    time.sleep(window_s)
    return max(ordered, key=lambda s: cpu_seconds(s.pid) - before[s.pid])


def inject(server, fault: Fault, fields: dict, limit_s: float) -> FaultRecord:
    """Kill one stub of ``fault.model`` and measure the way back."""
    from hybridiff.supervisor import scan_stubs

    record = FaultRecord(fault)
    seen = len(server.supervisor.recoveries())
    stubs = [s for s in scan_stubs(server.process.pid).values() if s.model == fault.model]
    if not stubs:
        record.note = "no stub found (model not loaded)"
        return record
    victim = busiest(stubs)
    record.pid, record.instance = victim.pid, victim.instance
    os.kill(victim.pid, signal.SIGKILL)
    record.killed_at = time.monotonic()
    deadline = record.killed_at + limit_s
    while time.monotonic() < deadline:
        done = [r for r in server.supervisor.recoveries()[seen:] if r.model == fault.model]
        if done:
            record.reloaded_s = done[0].loaded_at - record.killed_at
            break
        time.sleep(0.2)
    if record.reloaded_s is None:
        record.note = f"not reloaded within {limit_s:.0f} s"
        return record
    if probe_every_mode(server.http_url, fault.family, fields, deadline):
        record.serving_s = time.monotonic() - record.killed_at
    else:
        record.note = f"not serving every mode within {limit_s:.0f} s"
    return record


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repository", type=Path, default=Path("model_repository"))
    parser.add_argument("--families", default="sdxl,sd3")
    parser.add_argument("--devices", type=int, default=2, help="denoiser devices in the repository")
    parser.add_argument("--rounds", type=int, default=2, help="times every kind of stub is killed")
    parser.add_argument("--users", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--size", type=int, default=128, help="height and width of every request")
    parser.add_argument("--retries", type=int, default=4, help="the client's retries per request")
    parser.add_argument("--gap-s", type=float, default=10.0, help="load-only time before each fault")
    parser.add_argument("--recover-limit-s", type=float, default=120.0, help="per fault, at most")
    parser.add_argument("--out", type=Path, default=Path("out/chaos"))
    args = parser.parse_args(argv)
    from tools.triton_process import TritonServer

    families = args.families.split(",")
    plan = fault_plan(args.rounds, families, args.devices)
    fields = {"steps": args.steps, "height": args.size, "width": args.size}
    command = "python -m loadtest.chaos " + shlex.join(sys.argv[1:] if argv is None else argv)
    faults: list[FaultRecord] = []
    with TritonServer(args.repository, ready_timeout=900, supervise=True) as server:
        load = Load(server.http_url, args.users, families, fields, args.retries)
        load.start()
        try:
            for fault in plan:
                time.sleep(args.gap_s)
                record = inject(server, fault, fields, args.recover_limit_s)
                faults.append(record)
                print(f"fault {fault.index}: {fault.model} {record.instance} reloaded {record.reloaded_s} s, "
                      f"serving every mode {record.serving_s} s {record.note}", flush=True)
            time.sleep(args.gap_s)
        finally:
            requests = load.finish(timeout_s=300)
    rows = fault_rows(faults, requests)
    header = (f"Measured with `{command}` at commit {_commit()} ({os.cpu_count()} cores; "
              f"{args.users} users, {args.steps} steps, {args.size}x{args.size}, modes {', '.join(MODES)}, "
              f"families {', '.join(families)}; the client retries {args.retries} times with back-off).")
    write_outputs(args.out, rows, requests, header)
    print((args.out / "chaos.md").read_text())


if __name__ == "__main__":
    main()

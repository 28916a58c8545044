"""Requests in flight per device, and devices that are down, shared by every orchestrator process.

Mechanism only: the policies that read it are :func:`hybridiff.deadline.place` (and
:func:`~hybridiff.schedule.failover_device`). Besides its devices, each request's entry holds what
``auto`` weighs (:class:`Job`: steps left, deadline, cost key), and the board keeps per cost key the
step costs learned from every request's steps (:func:`hybridiff.deadline.learn`); a request rewrites
its entry once per step, folding that step's sample in with the same write. Each orchestrator
instance is its own process (and SDXL and SD3 share the same devices), so the state lives in a
small JSON file under a lock.
Entries name their process, and entries of dead processes are dropped on read, so a crashed
instance cannot leave a device looking busy. A device marked down counts as up again
:data:`DOWN_RETRY_SECONDS` after its mark, for one request (the probe): a success clears the mark,
a failure renews it. A board that cannot be parsed is reset, with a log line.

Beside the board live the cancel marks (:class:`CancelMark`): the public front, which sees a client's
cancel, marks its request so that the orchestrator running it (a BLS child, which Triton 2.51 does not
tell) stops between steps.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .deadline import StepSample, learn

BOARD_PREFIX = "hybridiff-load-"  # then the server's pid
CANCEL_PREFIX = "hybridiff-cancel-"  # then the server's pid, "-" and the request's key
WAITING_PREFIX = "waiting-"  # then the request's key: a request admitted, not yet placed (enter_waiting)
REQUEST_KEY = re.compile(r"[0-9a-f]{32}")  # uuid4().hex: names a file, so nothing else is accepted
# How long a device marked down is avoided before one request tries it again. Short against the
# time a supervisor needs to bring a stub back, long against the cost of one failed call.
DOWN_RETRY_SECONDS = 10.0

log = logging.getLogger(__name__)


def _shared_folder() -> Path:
    """/dev/shm where it is writable (RAM), else the temp folder."""
    shm = Path("/dev/shm")
    return shm if shm.is_dir() and os.access(shm, os.W_OK) else Path(tempfile.gettempdir())


def default_board_path() -> Path:
    """One board per running server (the stub's parent process is the tritonserver), in memory.

    /dev/shm is RAM; on a disk-backed /tmp a write can wait for the filesystem's journal, and the
    board is read before every step of an ``auto`` run (what that cost on /tmp: docs/performance.md).
    """
    return _shared_folder() / f"{BOARD_PREFIX}{os.getppid()}.json"


def remove_dead_boards(folder: Path) -> list[Path]:
    """Delete the boards and cancel marks of servers that are no longer running (their pid is in the name).

    Each server start leaves one small file in RAM otherwise (and a front killed between marking a
    cancel and clearing it, one mark). A live server's files are never touched: its pid is alive (a
    reused pid only keeps dead files longer).
    """
    removed = []
    for path in (*folder.glob(f"{BOARD_PREFIX}*.json"), *folder.glob(f"{CANCEL_PREFIX}*")):
        prefix = BOARD_PREFIX if path.name.startswith(BOARD_PREFIX) else CANCEL_PREFIX
        pid = path.name[len(prefix):].removesuffix(".json").split("-")[0]
        if pid.isdigit() and not _alive(int(pid)):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


class CancelMark:
    """A request its client cancelled, marked by the public front for the orchestrator that runs it.

    Triton 2.51 tells a model only of the cancels of its own requests, not of the BLS requests it made,
    and has no BLS cancel: so the front, which sees the client's cancel, leaves an empty file named
    after the request's key (and the server, whose stubs share it), and the orchestrator, which got
    the key as an input, looks for it between steps (an ``os.stat``, microseconds). The front clears
    it once the orchestrator has answered; a server start removes the marks of dead servers.
    """

    def __init__(self, key: str, folder: Path | None = None, server_pid: int | None = None) -> None:
        if not REQUEST_KEY.fullmatch(key):
            raise ValueError(f"a request key is 32 lowercase hex digits, got {key[:40]!r}")
        server = os.getppid() if server_pid is None else server_pid
        self.path = (folder or _shared_folder()) / f"{CANCEL_PREFIX}{server}-{key}"

    def set(self) -> None:
        self.path.touch()

    def is_set(self) -> bool:
        return self.path.exists()

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class Job:
    """What the board records of a request besides its devices: what ``auto`` weighs.

    Mutable on purpose: the ``choose`` of :meth:`InFlightBoard.occupy` may set ``may_yield`` from its
    decision, and the board records the job as it is when ``choose`` returns.
    """

    steps_left: int
    cost_key: str  # family and image size: requests with the same key cost the same per step
    deadline: float | None = None  # board clock (time.time); None: no deadline
    may_yield: bool = False  # a split auto run that may still finish on one device


@dataclass(frozen=True)
class Snapshot:
    """The board at one moment: counts and up devices, the jobs (key -> entry) and the learned costs."""

    loads: list[int]
    up: list[bool]
    jobs: dict[str, dict]
    costs: dict[str, dict[str, float]]
    now: float

    def held(self, family: str) -> int:
        """Requests of ``family`` on the board, running or waiting to be placed."""
        return sum(1 for job in self.jobs.values() if str(job.get("cost_key", "")).startswith(family + ":"))


@dataclass
class _State:
    """The board's content: requests in flight (key -> pid, devices, job), down marks (device -> time)
    and learned step costs (cost key -> averages)."""

    entries: dict[str, dict] = field(default_factory=dict)
    down: dict[int, float] = field(default_factory=dict)
    costs: dict[str, dict[str, float]] = field(default_factory=dict)

    def to_json(self) -> str:
        down = {str(d): t for d, t in self.down.items()}
        return json.dumps({"entries": self.entries, "down": down, "costs": self.costs})


def _parse(text: str) -> _State:
    """The board's state; raises ValueError when the text is not a board."""
    if not text.strip():
        return _State()
    data = json.loads(text)
    if not isinstance(data, dict) or not all(isinstance(data.get(k), dict) for k in ("entries", "down")):
        raise ValueError("not an in-flight board (expected keys 'entries' and 'down')")
    entries = {}
    for key, entry in data["entries"].items():
        if not isinstance(entry, dict) or not isinstance(entry.get("pid"), int):
            raise ValueError(f"entry {key!r} has no pid")
        if not isinstance(entry.get("devices"), list) or not all(isinstance(d, int) for d in entry["devices"]):
            raise ValueError(f"entry {key!r} has no device list")
        entries[key] = entry
    down = {int(d): float(t) for d, t in data["down"].items()}
    costs = data.get("costs", {})
    if not isinstance(costs, dict) or not all(isinstance(v, dict) for v in costs.values()):
        raise ValueError("costs is not a map of cost key -> averages")
    return _State(entries, down, costs)


class InFlightBoard:
    def __init__(self, path: Path, num_devices: int, clock=time.time) -> None:
        self.path = Path(path)
        self.num_devices = num_devices
        self.clock = clock
        self.path.touch(exist_ok=True)

    def _read(self, text: str, repair: bool) -> _State:
        """The live state. An unreadable board counts as empty; ``repair`` (a writer) logs its reset."""
        try:
            state = _parse(text)
        except (ValueError, TypeError) as err:
            if repair:
                log.warning("in-flight board %s was unreadable (%s); reset to empty", self.path, err)
            return _State()
        state.entries = {k: v for k, v in state.entries.items() if _alive(v["pid"])}
        return state

    @contextmanager
    def _locked(self) -> Iterator[_State]:
        """The live state under an exclusive lock; written back when the block ends."""
        with open(self.path, "r+") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                state = self._read(handle.read(), repair=True)
                yield state
                handle.seek(0)
                handle.truncate()
                handle.write(state.to_json())
                handle.flush()
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _shared(self) -> _State:
        """The live state under a shared lock, without writing back (an ``auto`` run reads before every step)."""
        with open(self.path) as handle:
            fcntl.flock(handle, fcntl.LOCK_SH)
            try:
                return self._read(handle.read(), repair=False)
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def snapshot(self) -> Snapshot:
        """Everything the board holds, read-only (an ``auto`` run may read it before every step)."""
        return self._snapshot(self._shared())

    def _snapshot(self, state: _State) -> Snapshot:
        return Snapshot(self._count(state.entries), self._up(state.down), state.entries, state.costs, self.clock())

    def loads(self) -> list[int]:
        """Requests in flight on each device. Read-only: a dead process's entry is dropped by the next writer."""
        return self._count(self._shared().entries)

    def up(self) -> list[bool]:
        """Which devices may be placed on: not marked down, or marked longer ago than the retry time."""
        return self._up(self._shared().down)

    def _up(self, down: dict[int, float]) -> list[bool]:
        now = self.clock()
        return [d not in down or now - down[d] >= DOWN_RETRY_SECONDS for d in range(self.num_devices)]

    def _count(self, entries: dict[str, dict]) -> list[int]:
        counts = [0] * self.num_devices
        for entry in entries.values():
            for device in entry["devices"]:
                if 0 <= device < self.num_devices:
                    counts[device] += 1
        return counts

    def enter_waiting(self, request_key: str, job: Job,
                      refuse: Callable[[Snapshot], str | None] | None = None) -> str | None:
        """Record a request the public front admits, which holds no device until an orchestrator places it:
        its work counts for later arrivals (:func:`deadline.arrival_refusal`), and its deadline is the one
        the orchestrator keeps (:meth:`waited_deadline`). The orchestrator's :meth:`occupy` takes the entry
        over; :meth:`leave_waiting` removes it in any case.

        ``refuse(snapshot)`` decides on the board as it is: a reason to refuse the request (returned, and
        nothing recorded) or None to record it. Deciding and recording under one lock keeps two arrivals
        from both taking the last place, or each being priced without the other.
        """
        with self._locked() as state:
            reason = None if refuse is None else refuse(self._snapshot(state))
            if reason is None:
                state.entries[WAITING_PREFIX + request_key] = {
                    "pid": os.getpid(), "devices": [], "waiting": True, **asdict(job)
                }
        return reason

    def leave_waiting(self, request_key: str) -> None:
        with self._locked() as state:
            state.entries.pop(WAITING_PREFIX + request_key, None)

    def waited_deadline(self, request_key: str) -> float | None:
        """The deadline (board clock) the front recorded for ``request_key`` on its arrival, or None."""
        entry = self._shared().entries.get(WAITING_PREFIX + request_key)
        return None if entry is None else entry.get("deadline")

    @contextmanager
    def occupy(self, choose, job: Job | None = None, request_key: str | None = None) -> Iterator[Occupancy]:
        """Read the board, let ``choose(snapshot)`` decide, and record what it occupies, atomically.

        ``choose`` returns ``(decision, devices)``; the devices count as busy until the block ends
        (or :meth:`Occupancy.update` changes them), and ``job`` is recorded with them. Deciding and
        recording under one lock keeps two requests from both seeing a free device. A chosen device
        whose down mark has expired is this request's to probe: its mark is renewed so that others
        keep off it meanwhile. ``request_key``: the front's key of the request, whose waiting entry
        (:meth:`enter_waiting`) this one replaces.
        """
        key = f"{os.getpid()}-{uuid.uuid4().hex}"
        with self._locked() as state:
            if request_key is not None:
                state.entries.pop(WAITING_PREFIX + request_key, None)
            decision, devices = choose(self._snapshot(state))
            probing = {d for d in devices if d in state.down}
            for device in probing:
                state.down[device] = self.clock()
            entry = {"pid": os.getpid(), "devices": list(devices)}
            state.entries[key] = {**entry, **(asdict(job) if job is not None else {})}
        try:
            yield Occupancy(self, key, decision, probing, job)
        finally:
            with self._locked() as state:
                state.entries.pop(key, None)

    def _update(self, key: str, devices) -> None:
        with self._locked() as state:
            if key in state.entries:
                state.entries[key]["devices"] = list(devices)

    def _progress(self, key: str, steps_left: int, may_yield: bool, sample: StepSample | None) -> None:
        with self._locked() as state:
            entry = state.entries.get(key)
            if entry is None:
                return
            entry["steps_left"], entry["may_yield"] = steps_left, may_yield
            if sample is not None and entry.get("cost_key"):
                mine = set(entry["devices"])
                others = [o for k, o in state.entries.items() if k != key and mine & set(o["devices"])]
                pair = len(mine) == 1 and len(others) == 1 and others[0].get("cost_key") == entry["cost_key"]
                learn(state.costs.setdefault(entry["cost_key"], {}), sample, not others, pair=pair)

    def mark_down(self, device: int) -> list[bool]:
        """Record that ``device`` failed; returns which devices are up now."""
        with self._locked() as state:
            state.down[device] = self.clock()
            return self._up(state.down)

    def mark_up(self, device: int) -> None:
        """``device`` answered again: clear its down mark."""
        with self._locked() as state:
            state.down.pop(device, None)


class Occupancy:
    """One request's entry on the board: the decision it was placed by, its devices, the devices it
    probes (placed on although marked down, their mark having expired) and its job (None: counts only)."""

    def __init__(
        self, board: InFlightBoard, key: str, decision, probing: set[int] | None = None, job: Job | None = None
    ) -> None:
        self.board, self.key, self.decision, self.job = board, key, decision, job
        self.probing = set(probing or ())

    def loads(self) -> list[int]:
        return self.board.loads()

    def snapshot(self) -> Snapshot:
        return self.board.snapshot()

    def update(self, devices) -> None:
        self.board._update(self.key, devices)

    def progress(self, steps_left: int, may_yield: bool, sample: StepSample | None = None) -> None:
        """A step finished: record the steps left and whether the run may still yield, and learn the
        step's cost, in one write."""
        self.board._progress(self.key, steps_left, may_yield, sample)

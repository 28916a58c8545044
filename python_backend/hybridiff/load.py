"""Requests in flight per device, shared by every orchestrator process of one server.

Mechanism only: the policy that reads it is :func:`hybridiff.schedule.place_request`. Each
orchestrator instance is its own process (and SDXL and SD3 share the same devices), so the
counts live in a small JSON file under a lock. Entries name their process, and entries of dead
processes are dropped on read, so a crashed instance cannot leave a device looking busy.
"""

from __future__ import annotations

import fcntl
import json
import os
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

BOARD_PREFIX = "hybridiff-load-"  # then the server's pid


def default_board_path() -> Path:
    """One board per running server (the stub's parent process is the tritonserver), in memory.

    /dev/shm is RAM; on a disk-backed /tmp a write can wait for the filesystem's journal, and the
    board is read before every step of an ``auto`` run (measured: up to 26 ms per step on /tmp).
    """
    shm = Path("/dev/shm")
    folder = shm if shm.is_dir() and os.access(shm, os.W_OK) else Path(tempfile.gettempdir())
    return folder / f"{BOARD_PREFIX}{os.getppid()}.json"


def remove_dead_boards(folder: Path) -> list[Path]:
    """Delete the boards of servers that are no longer running (their pid is in the name).

    Each server start leaves one small file in RAM otherwise. A live server's board is never touched:
    its pid is alive (a reused pid only keeps a dead board longer).
    """
    removed = []
    for path in folder.glob(f"{BOARD_PREFIX}*.json"):
        pid = path.stem[len(BOARD_PREFIX):]
        if pid.isdigit() and not _alive(int(pid)):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class LoadBoard:
    def __init__(self, path: Path, num_devices: int) -> None:
        self.path = Path(path)
        self.num_devices = num_devices
        self.path.touch(exist_ok=True)

    @contextmanager
    def _locked(self) -> Iterator[dict[str, dict]]:
        """The live entries under an exclusive lock; written back when the block ends."""
        with open(self.path, "r+") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                entries = self._live(handle.read())
                yield entries
                handle.seek(0)
                handle.truncate()
                handle.write(json.dumps(entries))
                handle.flush()
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    @staticmethod
    def _live(text: str) -> dict[str, dict]:
        entries = json.loads(text) if text.strip() else {}
        return {k: v for k, v in entries.items() if _alive(v["pid"])}

    def loads(self) -> list[int]:
        """Requests in flight on each device. Read-only (shared lock, no write-back): an ``auto`` run
        asks before every step, and a dead process's entry is dropped by the next writer anyway."""
        with open(self.path) as handle:
            fcntl.flock(handle, fcntl.LOCK_SH)
            try:
                return self._count(self._live(handle.read()))
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _count(self, entries: dict[str, dict]) -> list[int]:
        counts = [0] * self.num_devices
        for entry in entries.values():
            for device in entry["devices"]:
                if 0 <= device < self.num_devices:
                    counts[device] += 1
        return counts

    @contextmanager
    def occupy(self, choose) -> Iterator[Occupancy]:
        """Read the loads, let ``choose(loads)`` decide, and record what it occupies, atomically.

        ``choose`` returns ``(decision, devices)``; the devices count as busy until the block ends
        (or :meth:`Occupancy.update` changes them). Deciding and recording under one lock keeps two
        requests from both seeing a free device.
        """
        key = f"{os.getpid()}-{uuid.uuid4().hex}"
        with self._locked() as entries:
            decision, devices = choose(self._count(entries))
            entries[key] = {"pid": os.getpid(), "devices": list(devices)}
        try:
            yield Occupancy(self, key, decision)
        finally:
            with self._locked() as entries:
                entries.pop(key, None)

    def _update(self, key: str, devices) -> None:
        with self._locked() as entries:
            if key in entries:
                entries[key]["devices"] = list(devices)


class Occupancy:
    """One request's entry on the board: the decision it was placed by, and its devices."""

    def __init__(self, board: LoadBoard, key: str, decision) -> None:
        self.board, self.key, self.decision = board, key, decision

    def loads(self) -> list[int]:
        return self.board.loads()

    def update(self, devices) -> None:
        self.board._update(self.key, devices)

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


def default_board_path() -> Path:
    """One board per running server: the stub's parent process is the tritonserver."""
    return Path(tempfile.gettempdir()) / f"hybridiff-load-{os.getppid()}.json"


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
        with open(self.path, "r+") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                text = handle.read()
                entries = json.loads(text) if text.strip() else {}
                entries = {k: v for k, v in entries.items() if _alive(v["pid"])}
                yield entries
                handle.seek(0)
                handle.truncate()
                handle.write(json.dumps(entries))
                handle.flush()
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def loads(self) -> list[int]:
        """Requests in flight on each device."""
        with self._locked() as entries:
            return self._count(entries)

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

"""What a load level has done so far: plain Python (no Locust, no gevent), so tests can use it."""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass
class Sink:
    """Collects results for one level and tells each user when to stop starting requests.

    A quota per user (not one for the level) keeps the work identical across modes: user i always
    sends the first ``quota`` requests of its own sequence, whichever user happens to be faster.
    """

    quota: int
    deadline: float
    first_request: int = 0  # where in each user's request sequence this level starts
    started_by_user: dict[int, int] = field(default_factory=dict)
    results: list[dict] = field(default_factory=list)

    def may_start(self, user: int) -> bool:
        if self.started_by_user.get(user, 0) >= self.quota or time.perf_counter() >= self.deadline:
            return False
        self.started_by_user[user] = self.started_by_user.get(user, 0) + 1
        return True

    def finished_starting(self, users: int) -> bool:
        """Every user has used its quota, or the level's time is up."""
        if time.perf_counter() >= self.deadline:
            return True
        return all(self.started_by_user.get(u, 0) >= self.quota for u in range(users))

    def record(self, prompt: int, fields: dict, latency_s: float, result, exception) -> None:
        self.results.append({
            "prompt": prompt,
            "fields": fields,
            "latency_s": latency_s,
            "finished": time.perf_counter(),
            "image": None if result is None else result.images[0],
            "mode_run": None if result is None else result.schedules[0]["mode_run"],
            "error": None if exception is None else str(exception),
        })

    @property
    def in_flight(self) -> int:
        return sum(self.started_by_user.values()) - len(self.results)

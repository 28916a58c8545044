"""What the in-flight board costs a request per step: one progress write and one read, on /dev/shm.

    .venv/bin/python -m tools.board_cost      # PYTHONPATH as the Makefile sets it

Eight requests on the board (the most a family holds by default: 4 running + 4 waiting); the figure is
the mean of 1000 calls. docs/overload.md quotes it.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from hybridiff.deadline import StepSample
from hybridiff.inflight import InFlightBoard, Job


def main(calls: int = 1000) -> None:
    shm = Path("/dev/shm")
    folder = shm if shm.is_dir() else Path(tempfile.gettempdir())
    path = folder / f"hybridiff-board-cost-{time.time_ns()}.json"
    board = InFlightBoard(path, 2)
    others = [board.occupy(lambda seen, d=i % 2: (None, (d,)), Job(20, "sdxl:256x256")) for i in range(7)]
    try:
        for other in others:
            other.__enter__()
        with board.occupy(lambda seen: (None, (0,)), Job(calls, "sdxl:256x256")) as me:
            started = time.perf_counter()
            for i in range(calls):
                me.progress(calls - i - 1, False, StepSample("serial", 1, 0.1, 0.08))
            write_s = (time.perf_counter() - started) / calls
            started = time.perf_counter()
            for _ in range(calls):
                board.snapshot()
            read_s = (time.perf_counter() - started) / calls
    finally:
        for other in others:
            other.__exit__(None, None, None)
        path.unlink(missing_ok=True)
    print(f"board in {folder}: progress write {write_s * 1e3:.3f} ms, snapshot read {read_s * 1e3:.3f} ms "
          f"(8 requests on it, mean of {calls})")


if __name__ == "__main__":
    main()

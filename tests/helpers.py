"""Helpers shared by the family and server tests."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Sequence

import numpy as np

from hybridiff.families.base import DenoiseOutput
from hybridiff.local import LocalPipeline
from hybridiff.loop import DenoiseTask, ImageRequest, InProcessTransport, LoopReport, denoise_image


def max_pixel_diff(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())


class RecordingTransport(InProcessTransport):
    """Keeps every task and output, to check what each stage was fed."""

    def __init__(self, denoisers) -> None:
        super().__init__(denoisers)
        self.calls: list[tuple[int, DenoiseTask, DenoiseOutput]] = []

    async def denoise(self, device: int, task: DenoiseTask) -> DenoiseOutput:
        output = await super().denoise(device, task)
        self.calls.append((device, task, output))
        return output


def recorded_run(
    local: LocalPipeline, prompt: str, negative: str | None, request: ImageRequest
) -> tuple[LoopReport, dict[int, list[tuple[int, DenoiseTask, DenoiseOutput]]]]:
    """Run one image and return its report and, per step, the (device, task, output) calls."""
    transport = RecordingTransport(local.denoisers)
    cond = local.branch_conditioning(prompt, negative)
    _, report = asyncio.run(denoise_image(local.family, local.latent_math, transport, cond, request))
    per_step = len(transport.calls) // request.steps
    assert per_step * request.steps == len(transport.calls)
    steps: dict[int, list] = {}
    for i, call in enumerate(transport.calls):
        steps.setdefault(i // per_step, []).append(call)
    return report, steps


def pipeline_steps(report: LoopReport) -> list[int]:
    """The step indices that ran as pipeline steps."""
    return [t for t, phase in enumerate(report.schedule["phases"]) if phase == "pipeline"]


def wait_for(condition, timeout_s: float, poll_s: float = 0.1) -> bool:
    """Poll ``condition`` until it holds or ``timeout_s`` passes; its last value."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(poll_s)
    return condition()


def in_parallel(calls: Sequence[Callable[[], object]], timeout_s: float = 300.0) -> list:
    """Run every call in its own thread at once; their results in order. Raises if any call raised."""
    results: list = [None] * len(calls)
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            results[i] = calls[i]()
        except BaseException as err:  # surfaced below
            errors.append(err)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=timeout_s)
    assert not errors, errors
    return results


def server_board(server, devices: int = 2):
    """The in-flight board of a running ``tools.triton_process.TritonServer``, as its orchestrators see it
    (named after the tritonserver's pid)."""
    from hybridiff.inflight import InFlightBoard, default_board_path

    return InFlightBoard(default_board_path().parent / f"hybridiff-load-{server.process.pid}.json", devices)

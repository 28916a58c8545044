"""Test-only: the reference code's SD3 pipeline bug, reproduced behind a transport, to measure what it costs.

The reference feeds stage 1 the cached output of block n/2 (stage 1's own first block, cached on stage 1's device)
instead of block n/2-1 (stage 0's last), and that cache is written only at the first pipeline step, so the feed is
frozen there. This wrapper does the same to an in-process run: at the pipeline's first step (the warm-up, where
every device runs the whole model) stage 1's device records its block n/2 under stage 0's export names (the loop
keeps the last device's exports, so this recording is what the next step feeds), and every later pipeline step
of that image feeds stage 1 that same recording. Nothing in the serving package knows of it.
"""

from __future__ import annotations

import dataclasses

from hybridiff.families.base import DenoiseOutput
from hybridiff.families.sd3 import SD3Denoiser
from hybridiff.loop import DenoiseTask, InProcessTransport


class FrozenStageFeed:
    """An :class:`InProcessTransport` whose stage-1 feed is the reference's: block n/2, frozen at the warm-up."""

    def __init__(self, inner: InProcessTransport) -> None:
        for denoiser in inner.denoisers:
            if not isinstance(denoiser, SD3Denoiser):
                raise ValueError("the frozen stage-1 feed is the SD3 reference's bug; this family has no such feed")
        self.inner = inner
        self.num_devices = inner.num_devices
        self.feeds_sent: list[dict] = []  # what stage 1 was fed, per pipeline step (for tests)
        self._frozen: dict | None = None

    async def denoise(self, device: int, task: DenoiseTask) -> DenoiseOutput:
        if task.capture_stage == 1:
            self._frozen = None  # a new image's pipeline phase starts
            return await self._capture_wrong_block(device, task)
        if task.stage is not None and task.stale:
            if self._frozen is None:
                self._frozen = task.stale
            task = dataclasses.replace(task, stale=self._frozen)
            self.feeds_sent.append(task.stale)
        return await self.inner.denoise(device, task)

    async def _capture_wrong_block(self, device: int, task: DenoiseTask) -> DenoiseOutput:
        """Stage 1's warm-up pass, recording its first block (block n/2) as if it were stage 0's last."""
        denoiser = self.inner.denoisers[device]
        split, export = denoiser.split, denoiser._middle_export
        wrong = split.owned[1][0]
        denoiser.split = dataclasses.replace(split, exports=(split.exports[0], (wrong,)))
        denoiser._middle_export = wrong
        try:
            return await self.inner.denoise(device, task)
        finally:
            denoiser.split, denoiser._middle_export = split, export

"""Batching requests that meet on one device: several whole-model passes as one forward.

Triton's dynamic batcher hands a denoiser model every request queued while it was busy. Whole
passes with the same shapes are concatenated (each with its own latent and timestep: diffusers'
denoisers take one timestep per sample) and split again afterwards; stage runs and warm-up
captures run one by one. On a GPU this is where throughput comes from; on one CPU core it saves
only the fixed per-forward cost.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch

from .families.base import DenoiseOutput, Denoiser
from .loop import DenoiseTask


def batch_key(task: DenoiseTask) -> tuple | None:
    """Tasks with equal keys can share one forward; None for tasks that must run alone."""
    if task.stage is not None or task.capture_stage is not None:
        return None
    cond_shapes = tuple((name, tuple(t.shape[1:]), t.dtype) for name, t in sorted(task.cond.items()))
    return (tuple(task.sample.shape[1:]), cond_shapes)


def _batch_size(task: DenoiseTask) -> int:
    return next(iter(task.cond.values())).shape[0]


def run_tasks(denoiser: Denoiser, tasks: Sequence[DenoiseTask]) -> list[DenoiseOutput]:
    """Run every task, merging the compatible whole passes; outputs in the order of ``tasks``."""
    outputs: list[DenoiseOutput | None] = [None] * len(tasks)
    groups: dict[tuple, list[int]] = {}
    for index, task in enumerate(tasks):
        key = batch_key(task)
        groups.setdefault(("alone", index) if key is None else key, []).append(index)
    for members in groups.values():
        if len(members) == 1:
            task = tasks[members[0]]
            outputs[members[0]] = denoiser.run(
                task.sample, task.timestep, task.cond, task.stage, task.stale, task.capture_stage
            )
            continue
        sizes = [_batch_size(tasks[i]) for i in members]
        pairs = list(zip(members, sizes, strict=True))
        samples = torch.cat([tasks[i].sample.expand(n, *tasks[i].sample.shape[1:]) for i, n in pairs])
        timesteps = torch.cat([tasks[i].timestep.reshape(-1)[:1].expand(n) for i, n in pairs])
        cond = {name: torch.cat([tasks[i].cond[name] for i in members]) for name in tasks[members[0]].cond}
        merged = denoiser.run(samples, timesteps, cond)
        for i, eps in zip(members, merged.eps.split(sizes), strict=True):
            outputs[i] = replace(merged, eps=eps, batched_requests=len(members))
    return outputs  # type: ignore[return-value]

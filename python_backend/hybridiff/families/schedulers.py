"""Schedulers from a checkpoint folder's ``scheduler/`` config, one fresh instance per image."""

from __future__ import annotations

import json
from pathlib import Path

import diffusers


def load_scheduler_config(folder: Path) -> tuple[type, dict]:
    """The scheduler class the checkpoint names, and its config (read once per process)."""
    config = json.loads((Path(folder) / "scheduler" / "scheduler_config.json").read_text())
    scheduler_class = getattr(diffusers, config["_class_name"])
    return scheduler_class, scheduler_class.from_config(config).config


def new_scheduler(scheduler_class: type, config: dict, steps: int, **set_timesteps_kwargs):
    """A scheduler with its timesteps set; schedulers keep a step index, so never share one.

    ``set_timesteps_kwargs`` go to ``set_timesteps`` as the pipeline passes them (e.g. SD3's ``mu``).
    """
    scheduler = scheduler_class.from_config(config)
    scheduler.set_timesteps(steps, device="cpu", **set_timesteps_kwargs)
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(0)
    return scheduler

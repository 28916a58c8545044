"""Shared fixtures: the built-in tiny SDXL and SD3 checkpoints (built once, reused by every test and server)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
CHECKPOINTS = Path(os.environ.get("HYBRIDIFF_CHECKPOINTS", REPO / "checkpoints"))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def sdxl_tiny() -> Path:
    from export.build_checkpoint import build_sdxl_checkpoint

    return build_sdxl_checkpoint(CHECKPOINTS / "sdxl-tiny", size="tiny")


@pytest.fixture(scope="session")
def sd3_tiny() -> Path:
    from export.build_checkpoint import build_sd3_checkpoint

    return build_sd3_checkpoint(CHECKPOINTS / "sd3-tiny", size="tiny")

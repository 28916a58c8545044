"""The README picture's layout (drawing the images themselves is the families' tested serving code)."""

from __future__ import annotations

import numpy as np

from train.showcase import CAPTION_HEIGHT, GAP, LABEL_WIDTH, SCALE, compose


def test_grid_holds_every_image_scaled_in_its_cell() -> None:
    rng = np.random.default_rng(0)
    rows = [(f"row {r}", [rng.integers(0, 255, (64, 64, 3), dtype=np.uint8) for _ in range(3)]) for r in range(2)]
    grid = compose(rows, ["a red circle on the left", "a blue square at the top", "a green triangle in the center"])
    side = 64 * SCALE
    assert grid.shape == (2 * (side + GAP) + CAPTION_HEIGHT, LABEL_WIDTH + 3 * (side + GAP), 3)
    cell = grid[side + GAP : 2 * side + GAP, LABEL_WIDTH + 2 * (side + GAP) :][:side, :side]
    assert np.array_equal(cell[::SCALE, ::SCALE], rows[1][1][2])

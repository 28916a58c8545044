"""The README picture's layout (drawing the images themselves is the families' tested serving code)."""

from __future__ import annotations

import numpy as np

from train.showcase import CAPTION_HEIGHT, GAP, LABEL_WIDTH, SCALE, compose, psnr


def test_grid_holds_every_image_scaled_in_its_cell() -> None:
    rng = np.random.default_rng(0)
    rows = [(f"row {r}", [rng.integers(0, 255, (64, 64, 3), dtype=np.uint8) for _ in range(3)]) for r in range(2)]
    grid = compose(rows, ["a red circle on the left", "a blue square at the top", "a green triangle in the center"])
    side = 64 * SCALE
    assert grid.shape == (2 * (side + GAP) + CAPTION_HEIGHT, LABEL_WIDTH + 3 * (side + GAP), 3)
    cell = grid[side + GAP : 2 * side + GAP, LABEL_WIDTH + 2 * (side + GAP) :][:side, :side]
    assert np.array_equal(cell[::SCALE, ::SCALE], rows[1][1][2])


def test_psnr_pools_the_error_over_images() -> None:
    a = [np.zeros((4, 4, 3), np.uint8), np.zeros((4, 4, 3), np.uint8)]
    b = [np.zeros((4, 4, 3), np.uint8), np.full((4, 4, 3), 255, np.uint8)]
    assert psnr(a, a) == float("inf")
    assert abs(psnr(a, b) - 10 * np.log10(2)) < 1e-9  # half the pixels off by 255

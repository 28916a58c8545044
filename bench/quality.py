"""Image fidelity against the single-device output, for the benchmark: PSNR and SSIM, computed here (no weights).

SSIM follows Wang et al. 2004: an 11x11 Gaussian window (sigma 1.5), K1=0.01, K2=0.03, data range
255, averaged over the image and the three channels.
"""

from __future__ import annotations

import numpy as np


def psnr(reference: np.ndarray, image: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB of uint8 images; inf when they are identical."""
    mse = np.mean((reference.astype(np.float64) - image.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))


def psnr_pooled(references: list[np.ndarray], images: list[np.ndarray]) -> float:
    """PSNR of the mean squared error over all image pairs (one identical pair does not make it infinite)."""
    errors = [np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
              for a, b in zip(references, images, strict=True)]
    pooled = float(np.mean(errors))
    return float("inf") if pooled == 0 else float(10 * np.log10(255.0**2 / pooled))


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> np.ndarray:
    x = np.arange(size) - (size - 1) / 2
    window = np.exp(-(x**2) / (2 * sigma**2))
    return window / window.sum()


def _filter(channel: np.ndarray, window: np.ndarray) -> np.ndarray:
    """Separable 'valid' Gaussian filtering of a 2-D array."""
    rows = np.apply_along_axis(lambda r: np.convolve(r, window, mode="valid"), 1, channel)
    return np.apply_along_axis(lambda c: np.convolve(c, window, mode="valid"), 0, rows)


def ssim(reference: np.ndarray, image: np.ndarray) -> float:
    """Mean structural similarity of two uint8 HxWx3 images (1.0 when identical)."""
    if reference.shape != image.shape:
        raise ValueError(f"shapes differ: {reference.shape} vs {image.shape}")
    window = _gaussian_window()
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    scores = []
    for ch in range(reference.shape[-1]):
        x = reference[..., ch].astype(np.float64)
        y = image[..., ch].astype(np.float64)
        mu_x, mu_y = _filter(x, window), _filter(y, window)
        var_x = _filter(x * x, window) - mu_x**2
        var_y = _filter(y * y, window) - mu_y**2
        cov = _filter(x * y, window) - mu_x * mu_y
        score = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
        scores.append(score.mean())
    return float(np.mean(scores))

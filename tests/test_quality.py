import numpy as np
import pytest

from bench.quality import psnr, psnr_pooled, ssim


def test_identical_images():
    image = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    assert psnr(image, image) == float("inf")
    assert ssim(image, image) == pytest.approx(1.0)


def test_psnr_of_a_known_error():
    a = np.zeros((8, 8, 3), dtype=np.uint8)
    b = a + 1  # mse 1 -> 20*log10(255)
    assert psnr(a, b) == pytest.approx(48.1308, abs=1e-3)


def test_ssim_falls_with_noise_and_is_symmetric():
    rng = np.random.default_rng(1)
    image = (np.linspace(0, 255, 64)[None, :, None] * np.ones((64, 1, 3))).astype(np.uint8)
    slight = np.clip(image + rng.normal(0, 3, image.shape), 0, 255).astype(np.uint8)
    heavy = np.clip(image + rng.normal(0, 40, image.shape), 0, 255).astype(np.uint8)
    assert 1.0 > ssim(image, slight) > ssim(image, heavy) > 0.0
    assert ssim(image, heavy) == pytest.approx(ssim(heavy, image))
    with pytest.raises(ValueError, match="shapes differ"):
        ssim(image, image[:32])


def test_psnr_pools_the_error_over_images() -> None:
    a = [np.zeros((4, 4, 3), np.uint8), np.zeros((4, 4, 3), np.uint8)]
    b = [np.zeros((4, 4, 3), np.uint8), np.full((4, 4, 3), 255, np.uint8)]
    assert psnr_pooled(a, a) == float("inf")
    assert abs(psnr_pooled(a, b) - 10 * np.log10(2)) < 1e-9  # half the pixels off by 255

import numpy as np
import pytest

from clcluster.imageops import (circular_mask, fourier_crop, fourier_shift, normalise_background, polar_resample,
                                radius_grid, rotate)


def _blob_image(box, seed=0):
    rng = np.random.default_rng(seed)
    img = np.zeros((box, box), np.float32)
    y, x = np.mgrid[:box, :box]
    for _ in range(6):
        cy, cx = rng.uniform(box * 0.3, box * 0.7, 2)
        img += np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / (2 * 2.5 ** 2))
    return img


@pytest.mark.parametrize("method", ["fourier", "bilinear"])
def test_rotation_by_90_equals_rot90_odd_box(method):
    img = _blob_image(33)[None]
    assert np.allclose(rotate(img, [90.0], method=method)[0], np.rot90(img[0]), atol=1e-4)


def test_rotation_by_90_equals_rot90_about_centre_pixel_even_box():
    # even box: the centre is pixel box//2 (RELION), rot90 turns about (box-1)/2, a one-pixel roll apart
    img = _blob_image(32)[None]
    expected = np.roll(np.rot90(img[0]), 1, axis=0)
    assert np.allclose(rotate(img, [90.0])[0][1:, 1:], expected[1:, 1:], atol=1e-5)


@pytest.mark.parametrize("angle", [17.0, 45.0, 133.3, 271.0])
def test_rotation_preserves_centred_disc_energy(angle):
    box = 64
    mask = circular_mask(box, 20, soft_edge=6)
    img = (_blob_image(box, 1) * mask)[None]
    rot = rotate(img, [angle])  # Fourier (shear) rotation, the default
    assert abs((rot ** 2).sum() / (img ** 2).sum() - 1) < 0.01
    # bilinear interpolation agrees on the content (it smooths, so only correlation is checked)
    bil = rotate(img, [angle], method="bilinear")
    assert np.corrcoef(bil.ravel(), rot.ravel())[0, 1] > 0.99


def test_fourier_crop_keeps_mean_and_low_frequencies():
    img = _blob_image(64)[None] + 0.3
    small = fourier_crop(img, 32)
    assert small.shape == (1, 32, 32)
    assert np.isclose(small.mean(), img.mean(), rtol=1e-4)
    f_big = np.fft.fftshift(np.fft.fft2(img[0]))[32 - 8:32 + 8, 32 - 8:32 + 8] / 64 ** 2
    f_small = np.fft.fftshift(np.fft.fft2(small[0]))[16 - 8:16 + 8, 16 - 8:16 + 8] / 32 ** 2
    assert np.allclose(f_big, f_small, atol=1e-5)
    back = fourier_crop(small, 64)  # zero-padding keeps the mean too
    assert np.isclose(back.mean(), img.mean(), rtol=1e-4)


def test_background_normalisation():
    rng = np.random.default_rng(0)
    imgs = (rng.normal(3.0, 2.5, (5, 32, 32)) + _blob_image(32)[None] * 10).astype(np.float32)
    out = normalise_background(imgs, 12)
    bg = out[:, radius_grid(32) > 12]
    assert np.allclose(bg.mean(1), 0, atol=1e-5) and np.allclose(bg.std(1), 1, atol=1e-4)


def test_polar_samples_roll_with_rotation():
    img = _blob_image(64)[None]
    p0 = polar_resample(img, 16, 64, r_max=28)
    k = 8
    p1 = polar_resample(rotate(img, [360.0 * k / 64]), 16, 64, r_max=28)
    assert np.corrcoef(np.roll(p0, -k, axis=-1).ravel(), p1.ravel())[0, 1] > 0.99


def test_fourier_shift_moves_content():
    img = _blob_image(32)[None]
    out = fourier_shift(img, [[3.0, -2.0]])
    assert np.allclose(out[0], np.roll(np.roll(img[0], 3, axis=1), -2, axis=0), atol=1e-4)

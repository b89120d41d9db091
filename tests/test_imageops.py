"""Image operations on both array modules (`xp`/`xpcall` fixtures in conftest.py): every op runs
on NumPy; on a GPU machine the same op runs on CuPy, must return CuPy arrays and match NumPy
within float tolerance. The CuPy cases are skipped ("CuPy/GPU not available") where CuPy or a
CUDA device is missing; they have only been run on a GPU machine."""
import numpy as np
import pytest

from clcluster.image.imageops import (circular_mask, fourier_crop, fourier_crop_filtered, fourier_filter, fourier_shift, gaussian_lowpass, lowpass,
                                normalise_background, polar_resample, radius_grid, rotate)


def _blob_image(box, seed=0):
    rng = np.random.default_rng(seed)
    img = np.zeros((box, box), np.float32)
    y, x = np.mgrid[:box, :box]
    for _ in range(6):
        cy, cx = rng.uniform(box * 0.3, box * 0.7, 2)
        img += np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / (2 * 2.5 ** 2))
    return img


def _radial_power(img):
    """(box//2+1,) power per integer frequency shell of one image (numpy)."""
    box = img.shape[-1]
    p = np.abs(np.fft.rfft2(img)) ** 2
    fy, fx = np.meshgrid(np.fft.fftfreq(box), np.fft.rfftfreq(box), indexing="ij")
    shell = np.minimum(np.rint(np.hypot(fx, fy) * box).astype(int), box // 2)
    return np.bincount(shell.ravel(), p.ravel(), minlength=box // 2 + 1)


@pytest.mark.parametrize("method", ["fourier", "bilinear"])
def test_rotation_by_90_equals_rot90_odd_box(xpcall, method):
    img = _blob_image(33)[None]
    assert np.allclose(xpcall(rotate, img, [90.0], method=method)[0], np.rot90(img[0]), atol=1e-4)


def test_rotation_by_90_equals_rot90_about_centre_pixel_even_box(xpcall):
    # even box: the centre is pixel box//2 (RELION), rot90 turns about (box-1)/2, a one-pixel roll apart
    img = _blob_image(32)[None]
    expected = np.roll(np.rot90(img[0]), 1, axis=0)
    assert np.allclose(xpcall(rotate, img, [90.0])[0][1:, 1:], expected[1:, 1:], atol=1e-5)


@pytest.mark.parametrize("angle", [17.0, 45.0, 133.3, 271.0])
def test_rotation_preserves_centred_disc_energy(xpcall, angle):
    box = 64
    mask = circular_mask(box, 20, soft_edge=6)
    img = (_blob_image(box, 1) * mask)[None]
    rot = xpcall(rotate, img, [angle])  # Fourier (shear) rotation, the default
    assert abs((rot ** 2).sum() / (img ** 2).sum() - 1) < 0.01
    # bilinear interpolation agrees on the content (it smooths, so only correlation is checked)
    bil = xpcall(rotate, img, [angle], method="bilinear")
    assert np.corrcoef(bil.ravel(), rot.ravel())[0, 1] > 0.99


def test_fourier_crop_keeps_mean_and_low_frequencies(xpcall):
    img = _blob_image(64)[None] + 0.3
    small = xpcall(fourier_crop, img, 32)
    assert small.shape == (1, 32, 32)
    assert np.isclose(small.mean(), img.mean(), rtol=1e-4)
    f_big = np.fft.fftshift(np.fft.fft2(img[0]))[32 - 8:32 + 8, 32 - 8:32 + 8] / 64 ** 2
    f_small = np.fft.fftshift(np.fft.fft2(small[0]))[16 - 8:16 + 8, 16 - 8:16 + 8] / 32 ** 2
    assert np.allclose(f_big, f_small, atol=1e-5)
    back = xpcall(fourier_crop, small, 64)  # zero-padding keeps the mean too
    assert np.isclose(back.mean(), img.mean(), rtol=1e-4)


def test_fourier_crop_then_pad_round_trip_keeps_low_frequencies(xpcall):
    # an image band-limited below the small box's Nyquist survives crop 64 → 32 → pad 64 exactly;
    # a generic image keeps its low frequencies and loses exactly the high ones
    # (the band kept is |k| < 15 per axis, below the 32-px box's Nyquist of 16)
    img = _blob_image(64, 2)[None]
    f = np.fft.fftshift(np.fft.fft2(img[0]))
    keep = np.zeros_like(f)
    keep[32 - 15:32 + 15, 32 - 15:32 + 15] = f[32 - 15:32 + 15, 32 - 15:32 + 15]
    limited = np.fft.ifft2(np.fft.ifftshift(keep)).real.astype(np.float32)[None]
    back = xpcall(fourier_crop, xpcall(fourier_crop, limited, 32), 64)
    assert np.allclose(back, limited, atol=1e-5)
    back = xpcall(fourier_crop, xpcall(fourier_crop, img, 32), 64)
    fb = np.fft.fftshift(np.fft.fft2(back[0]))
    assert np.allclose(fb[32 - 15:32 + 15, 32 - 15:32 + 15], f[32 - 15:32 + 15, 32 - 15:32 + 15], atol=1e-3)
    assert np.allclose(fb[:16], 0, atol=1e-3) and np.allclose(fb[:, :16], 0, atol=1e-3)


def test_background_normalisation(xpcall):
    rng = np.random.default_rng(0)
    imgs = (rng.normal(3.0, 2.5, (5, 32, 32)) + _blob_image(32)[None] * 10).astype(np.float32)
    out = xpcall(normalise_background, imgs, 12)
    bg = out[:, radius_grid(32) > 12]
    assert np.allclose(bg.mean(1), 0, atol=1e-5) and np.allclose(bg.std(1), 1, atol=1e-4)


def test_soft_mask_values(xp):
    box, radius, edge = 64, 20.0, 6.0
    m = circular_mask(box, radius, soft_edge=edge, xp=xp)
    assert type(m) is type(xp.zeros(1)) and m.dtype == np.float32 and m.shape == (box, box)
    m = np.asarray(m.get() if hasattr(m, "get") else m)
    r = radius_grid(box)
    assert np.all(m[r <= radius] == 1.0) and np.all(m[r >= radius + edge] == 0.0)
    assert np.all((m >= 0) & (m <= 1))
    c = box // 2
    assert np.isclose(m[c, c + 23], 0.5)  # half-way through the raised-cosine edge: 20 + 6/2 px
    assert np.isclose(m[c, c + 22], 0.5 + 0.5 * np.cos(np.pi * 2 / 6), atol=1e-6)
    row = m[c, c:]
    assert np.all(np.diff(row) <= 1e-7)  # monotone fall-off from the centre
    hard = circular_mask(box, radius, xp=xp)
    hard = np.asarray(hard.get() if hasattr(hard, "get") else hard)
    assert set(np.unique(hard)) == {0.0, 1.0} and hard[c, c + 20] == 1 and hard[c, c + 21] == 0


def test_lowpass_removes_power_beyond_cutoff(xpcall):
    rng = np.random.default_rng(1)
    imgs = rng.normal(size=(4, 64, 64)).astype(np.float32)
    apix, res = 2.0, 10.0  # cut-off 0.1 1/Å = shell 12.8 of 64 at 2 Å/px; edge 0.02 1/Å = 2.56 shells
    out = xpcall(lowpass, imgs, res, apix)
    p_in = sum(_radial_power(i) for i in imgs)
    p_out = sum(_radial_power(i) for i in out)
    beyond = int(np.ceil((1 / res + 0.01) * 64 * apix)) + 1  # past the raised-cosine edge
    assert p_out[beyond:].sum() < 1e-8 * p_in[beyond:].sum()
    passband = int((1 / res - 0.01) * 64 * apix) - 1
    assert np.allclose(p_out[1:passband], p_in[1:passband], rtol=1e-3)


def test_gaussian_lowpass_zero_sigma_is_identity(xpcall):
    img = _blob_image(32)[None].repeat(2, 0)
    out = xpcall(gaussian_lowpass, img, np.array([0.0, 1.5], np.float32))
    assert np.allclose(out[0], img[0], atol=1e-5) and not np.allclose(out[1], img[1], atol=1e-3)


def test_polar_samples_roll_with_rotation(xpcall):
    img = _blob_image(64)[None]
    p0 = xpcall(polar_resample, img, 16, 64, r_max=28)
    k = 8
    rotated = xpcall(rotate, img, [360.0 * k / 64])
    p1 = xpcall(polar_resample, rotated, 16, 64, r_max=28)
    assert np.corrcoef(np.roll(p0, -k, axis=-1).ravel(), p1.ravel())[0, 1] > 0.99


def test_fourier_shift_moves_content(xpcall):
    img = _blob_image(32)[None]
    out = xpcall(fourier_shift, img, np.array([[3.0, -2.0]], np.float32))
    assert np.allclose(out[0], np.roll(np.roll(img[0], 3, axis=1), -2, axis=0), atol=1e-4)


@pytest.mark.parametrize("new_box", [16, 32, 62, 64, 80])
def test_fourier_crop_filtered_equals_filter_then_crop(xpcall, new_box):
    rng = np.random.default_rng(3)
    imgs = rng.normal(size=(3, 64, 64)).astype(np.float32)
    filt = rng.normal(size=(3, 64, 33)).astype(np.float32)
    one_pass = xpcall(fourier_crop_filtered, imgs, new_box, filt)
    assert one_pass.shape == (3, new_box, new_box)
    assert np.allclose(one_pass, fourier_crop(fourier_filter(imgs, filt), new_box), atol=2e-6)
    assert np.allclose(xpcall(fourier_crop_filtered, imgs, new_box), fourier_crop(imgs, new_box), atol=2e-6)


@pytest.mark.parametrize("box", [7, 8, 31, 64, 100, 256])
def test_radial_shells_are_rounded_frequency_radii(box):
    """Shell of each (r)FFT coefficient = round(|k|), k in cycles per box; folded: corners beyond
    Nyquist in shell box//2."""
    from clcluster.image.imageops import radial_shells

    k = np.fft.fftfreq(box) * box
    full = np.rint(np.sqrt(k[:, None] ** 2 + k[None, :] ** 2)).astype(np.int64)
    assert np.array_equal(radial_shells(box, rfft=False, fold=False), full)
    assert np.array_equal(radial_shells(box, rfft=False), np.minimum(full, box // 2))
    half = radial_shells(box)
    assert half.shape == (box, box // 2 + 1) and np.array_equal(half, np.minimum(full, box // 2)[:, : box // 2 + 1])
    assert half[0, 0] == 0 and half.max() == box // 2

"""Options of the reference-free class alignment (`averages.refine_class_poses`): whitening,
re-centring, a soft mask on the running averages. Tiny synthetic data, fixed seeds."""
from __future__ import annotations

import numpy as np
import pytest

from clcluster.em.averages import FilteredImages, aligned_means, recentre, refine_class_poses, whitening_filter
from clcluster.image.imageops import fourier_shift, gaussian_lowpass, radial_shells, rotate

BOX = 32
SNR = 0.03


def radial_power(x: np.ndarray) -> np.ndarray:
    shell = radial_shells(x.shape[-1]).ravel()
    p = (np.abs(np.fft.rfft2(x)) ** 2).sum(0).ravel()
    return np.bincount(shell, weights=p) / np.bincount(shell) / len(x)


def coloured_noise(n: int, rng) -> np.ndarray:
    """White noise with a low-frequency rise (Gaussian low-pass added, 4x the power at DC)."""
    w = rng.standard_normal((n, BOX, BOX)).astype(np.float32)
    return w + 2.0 * gaussian_lowpass(rng.standard_normal((n, BOX, BOX)).astype(np.float32), 3.0) * 3.0


def test_whitening_filter_flattens_a_coloured_spectrum():
    x = coloured_noise(400, np.random.default_rng(0))
    p = radial_power(x)[1:]
    assert p.max() / p.min() > 4  # coloured
    w = FilteredImages(x, whitening_filter(x))
    assert w.shape == x.shape and len(w) == 400
    pw = radial_power(w[0:400])[1:]
    assert pw.max() / pw.min() < 1.5  # flat within noise
    assert np.allclose(w[3:5], w[0:400][3:5], atol=1e-5)


def test_recentre_moves_an_off_centre_blob_to_the_centre():
    y, x = np.mgrid[:BOX, :BOX] - BOX // 2
    blob = np.exp(-((x - 3) ** 2 + (y + 2) ** 2) / 8.0).astype(np.float32)[None]
    out, shift = recentre(blob)
    assert np.allclose(shift, [[-3, 2]], atol=0.3)
    cy, cx = np.unravel_index(np.argmax(out[0]), out[0].shape)
    assert (cy, cx) == (BOX // 2, BOX // 2)


def test_whitened_centred_alignment_finds_an_asymmetric_class_under_coloured_noise():
    """One class of an asymmetric shape, random rotations and shifts up to 3 px, coloured noise:
    the options' average matches the shape better than the plain alignment's."""
    rng = np.random.default_rng(1)
    y, x = np.mgrid[:BOX, :BOX] - BOX // 2
    shape = (np.exp(-((x - 4) ** 2 + y ** 2) / 6.0) + 0.7 * np.exp(-(x ** 2 + (y - 5) ** 2) / 4.0)
             + 0.5 * np.exp(-((x + 4) ** 2 + (y + 3) ** 2) / 10.0)).astype(np.float32)
    shape -= shape.mean()
    n = 150
    angles = rng.uniform(0, 360, n)
    shifts = rng.uniform(-3, 3, (n, 2))
    clean = fourier_shift(rotate(np.repeat(shape[None], n, 0), angles), shifts)
    images = (clean / clean.std() * np.sqrt(SNR) + coloured_noise(n, rng) / 2.3).astype(np.float32)
    labels = np.zeros(n, np.int64)

    def fidelity(cp) -> float:
        avg = aligned_means(images, labels, 1, cp.angle_deg, cp.shift_px)[0]
        avg = gaussian_lowpass(avg[None], 1.0)[0]
        best = -1.0
        for th in range(0, 360, 4):
            r = rotate(avg[None], [th])[0]
            for dx in range(-4, 5):
                for dy in range(-4, 5):
                    s = np.roll(r, (dy, dx), axis=(0, 1))
                    s = s - s.mean()
                    best = max(best, float((s * shape).sum() / (np.linalg.norm(s) * np.linalg.norm(shape))))
        return best

    plain = refine_class_poses(images, labels, 1, iterations=6, max_shift_px=4, seed=0)
    opts = refine_class_poses(images, labels, 1, iterations=6, max_shift_px=4, seed=0, whiten=True, centre=True,
                              mask_radius=0.4)
    f_plain, f_opts = fidelity(plain), fidelity(opts)
    print("fidelity plain", round(f_plain, 3), "whiten+centre+mask", round(f_opts, 3))
    assert opts.angle_deg.shape == (n,) and opts.shift_px.shape == (n, 2) and len(opts.history) == 6
    assert f_opts > 0.92  # measured 0.956
    assert f_opts > f_plain + 0.04  # plain alignment: 0.881


def test_several_starts_keep_each_class_best_run():
    rng = np.random.default_rng(2)
    images = coloured_noise(60, rng)
    labels = np.repeat([0, 1], 30)
    kw = dict(iterations=2, max_shift_px=2, whiten=True, centre=True, mask_radius=0.4)
    single = [refine_class_poses(images, labels, 2, seed=s, **kw) for s in (5, 6, 7)]
    multi = refine_class_poses(images, labels, 2, seed=5, starts=3, **kw)
    for j in (0, 1):
        rows = labels == j
        best = max(float(cp.score[rows].mean()) for cp in single)
        assert float(multi.score[rows].mean()) == pytest.approx(best, abs=1e-6)
        run = int(np.argmax([float(cp.score[rows].mean()) for cp in single]))
        assert np.allclose(multi.angle_deg[rows], single[run].angle_deg[rows])

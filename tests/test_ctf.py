"""CTF and CTF corrections on both array modules (`xp`/`xpcall` fixtures, conftest.py): NumPy
always; CuPy (compared with NumPy within float tolerance) only on a GPU machine, otherwise
skipped with "CuPy/GPU not available"."""
import numpy as np
import pytest

from clcluster.image.ctf import CTFParams, apply_ctf, ctf_2d, electron_wavelength, phase_flip, wiener_filter
from clcluster.image.imageops import fourier_shift, rotate


def _params(n=1, du=15000.0, dv=15000.0, ang=0.0, q0=0.1, ps=0.0, b=0.0):
    return CTFParams(np.full(n, du), np.full(n, dv), np.full(n, ang), np.full(n, 300.0), np.full(n, 2.7),
                     np.full(n, q0), np.full(n, ps), np.full(n, b))


def _ctf(xp, params, box, apix, **kw):
    """ctf_2d on `xp`, checked to stay there and (CuPy) to match NumPy; returned as NumPy."""
    c = ctf_2d(params, box, apix, xp, **kw)
    assert type(c) is type(xp.zeros(1))
    c = c.get() if hasattr(c, "get") else c
    if xp is not np:
        np.testing.assert_allclose(c, ctf_2d(params, box, apix, np, **kw), atol=1e-4)
    return c


def _corr(a, b):
    return np.mean([np.corrcoef(x.ravel(), y.ravel())[0, 1] for x, y in zip(a, b)])


def _clean_projections(sim, n):
    truth = sim.truth.iloc[:n]
    return fourier_shift(rotate(sim.projections[truth["class"].to_numpy()], truth["psi_deg"].to_numpy()),
                         truth[["shift_x_px", "shift_y_px"]].to_numpy())


def test_wavelength_300kv():
    assert np.isclose(electron_wavelength(300), 0.019687, atol=1e-6)


def test_ctf_hand_computed_values(xp):
    box, apix = 128, 1.0
    c = _ctf(xp, _params(), box, apix)[0]
    assert np.isclose(c[0, 0], 0.1, atol=1e-6)  # s = 0: amplitude contrast
    lam, cs = electron_wavelength(300), 2.7e7
    for i in (3, 10, 25):
        s = i / (box * apix)
        chi = np.pi * lam * (-15000.0) * s ** 2 + np.pi / 2 * cs * lam ** 3 * s ** 4 - np.arctan(0.1 / np.sqrt(0.99))
        assert np.isclose(c[0, i], -np.sin(chi), atol=2e-4)
    # zeros where they must be: first zero of an astigmatism-free CTF
    s = np.fft.rfftfreq(box, apix)
    chi = np.pi * lam * (-15000.0) * s ** 2 + np.pi / 2 * cs * lam ** 3 * s ** 4 - np.arctan(0.1 / np.sqrt(0.99))
    first_zero = np.argmax(np.sign(-np.sin(chi[1:])) != np.sign(-np.sin(chi[:-1])))
    assert np.sign(c[0, first_zero]) != np.sign(c[0, first_zero + 1])


def test_ctf_full_grid_and_bfactor(xp):
    # rfft=False gives the full (box, box) grid whose first box//2 columns are the rfft grid's
    # (column box//2 is +Nyquist in the rfft layout, -Nyquist in the full one)
    p = _params(n=2, du=12000.0, dv=14000.0, ang=30.0, b=50.0)
    half = _ctf(xp, p, 64, 1.5)
    full = _ctf(xp, p, 64, 1.5, rfft=False)
    assert half.shape == (2, 64, 33) and full.shape == (2, 64, 64)
    assert np.allclose(full[:, :, :32], half[:, :, :32], atol=1e-6)
    no_b = _ctf(xp, _params(n=2, du=12000.0, dv=14000.0, ang=30.0), 64, 1.5)
    s2 = np.add.outer(np.fft.fftfreq(64, 1.5) ** 2, np.fft.rfftfreq(64, 1.5) ** 2)
    assert np.allclose(half, no_b * np.exp(-50.0 / 4 * s2), atol=1e-6)


def test_astigmatism_direction(xp):
    # defocus U along the astigmatism angle: along x (angle 0) the CTF follows U, along y follows V
    box = 128
    c = _ctf(xp, _params(du=20000.0, dv=10000.0), box, 1.0)[0]
    cu = _ctf(xp, _params(du=20000.0, dv=20000.0), box, 1.0)[0]
    cv = _ctf(xp, _params(du=10000.0, dv=10000.0), box, 1.0)[0]
    assert np.allclose(c[0, :40], cu[0, :40], atol=1e-5)
    assert np.allclose(c[:40, 0], cv[:40, 0], atol=1e-5)


def test_phase_flip_raises_correlation_with_clean(easy_sim, xpcall):
    cfg, sim = easy_sim
    proj = sim.clean[:20]
    clean = _clean_projections(sim, 20)
    flipped = xpcall(phase_flip, proj, sim.ctf.subset(np.arange(20)), cfg.apix)
    assert _corr(flipped, clean) > _corr(proj, clean) + 0.05


def test_wiener_filter_raises_correlation_with_clean(easy_sim, xpcall):
    cfg, sim = easy_sim
    ctf = sim.ctf.subset(np.arange(20))
    clean = _clean_projections(sim, 20)
    # noise-free CTF-modulated images: with a high assumed SNR the filter nearly inverts the CTF
    restored = xpcall(wiener_filter, sim.clean[:20], ctf, cfg.apix, 100.0)
    assert _corr(restored, clean) > 0.95 > _corr(sim.clean[:20], clean)
    # noisy images (SNR 0.5): better than the raw image and at least as good as phase flipping
    noisy = sim.images[:20]
    w = xpcall(wiener_filter, noisy, ctf, cfg.apix, 10.0)
    assert _corr(w, clean) > _corr(noisy, clean) + 0.05
    assert _corr(w, clean) >= _corr(phase_flip(noisy, ctf, cfg.apix), clean)


@pytest.mark.parametrize("snr", [0.1, 1.0, 100.0])
def test_wiener_filter_has_the_phase_flip_sign(xpcall, snr):
    # the Wiener filter CTF / (CTF^2 + 1/snr) is the phase flip sign(CTF) times a positive weight:
    # each Fourier coefficient of the filtered image has the phase of the phase-flipped one
    rng = np.random.default_rng(0)
    imgs = rng.normal(size=(3, 64, 64)).astype(np.float32)
    p = CTFParams(np.array([9000.0, 15000.0, 22000.0]), np.array([9500.0, 14000.0, 22000.0]),
                  np.array([0.0, 40.0, 80.0]))
    fw = np.fft.rfft2(xpcall(wiener_filter, imgs, p, 1.5, snr))
    fp = np.fft.rfft2(xpcall(phase_flip, imgs, p, 1.5))
    c = np.abs(ctf_2d(p, 64, 1.5))
    big = (c > 0.05) & (np.abs(fp) > 1e-2 * np.abs(fp).mean())
    big[:, :, -1] = False  # Nyquist column: irfft2 keeps only its real part
    assert np.all(np.real(fw * np.conj(fp))[big] > 0)
    ratio = np.abs(fw[big]) / np.abs(fp[big])
    assert np.allclose(ratio, (c / (c * c + 1 / snr))[big], rtol=2e-3)


def test_apply_ctf_is_linear(xpcall):
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(2, 1, 32, 32)).astype(np.float32)
    p = _params()
    assert np.allclose(xpcall(apply_ctf, a + b, p, 2.0), xpcall(apply_ctf, a, p, 2.0) + xpcall(apply_ctf, b, p, 2.0),
                       atol=1e-5)


def test_ctf_params_subset_and_host_arrays():
    p = _params(n=5, du=10000.0)
    sub = p.subset(np.array([1, 3]))
    assert len(sub) == 2 and np.allclose(sub.defocus_u, 10000.0) and np.allclose(sub.voltage, 300.0)
    scalar = CTFParams(np.array([1e4, 2e4]), np.array([1e4, 2e4]), np.zeros(2))  # scalar defaults broadcast
    assert ctf_2d(scalar, 32, 1.0).shape == (2, 32, 17)

import numpy as np

from clcluster.ctf import CTFParams, apply_ctf, ctf_2d, electron_wavelength, phase_flip


def _params(n=1, du=15000.0, dv=15000.0, ang=0.0, q0=0.1, ps=0.0, b=0.0):
    return CTFParams(np.full(n, du), np.full(n, dv), np.full(n, ang), np.full(n, 300.0), np.full(n, 2.7),
                     np.full(n, q0), np.full(n, ps), np.full(n, b))


def test_wavelength_300kv():
    assert np.isclose(electron_wavelength(300), 0.019687, atol=1e-6)


def test_ctf_hand_computed_values():
    box, apix = 128, 1.0
    c = ctf_2d(_params(), box, apix)[0]
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


def test_astigmatism_direction():
    # defocus U along the astigmatism angle: along x (angle 0) the CTF follows U, along y follows V
    box = 128
    c = ctf_2d(_params(du=20000.0, dv=10000.0), box, 1.0)[0]
    cu = ctf_2d(_params(du=20000.0, dv=20000.0), box, 1.0)[0]
    cv = ctf_2d(_params(du=10000.0, dv=10000.0), box, 1.0)[0]
    assert np.allclose(c[0, :40], cu[0, :40], atol=1e-5)
    assert np.allclose(c[:40, 0], cv[:40, 0], atol=1e-5)


def test_phase_flip_raises_correlation_with_clean(easy_sim):
    cfg, sim = easy_sim
    proj = sim.clean[:20]
    from clcluster.imageops import fourier_shift, rotate

    truth = sim.truth.iloc[:20]
    clean = fourier_shift(rotate(sim.projections[truth["class"].to_numpy()], truth["psi_deg"].to_numpy()),
                          truth[["shift_x_px", "shift_y_px"]].to_numpy())
    flipped = phase_flip(proj, sim.ctf.subset(np.arange(20)), cfg.apix)
    corr = lambda a, b: np.mean([np.corrcoef(x.ravel(), y.ravel())[0, 1] for x, y in zip(a, b)])
    assert corr(flipped, clean) > corr(proj, clean) + 0.05


def test_apply_ctf_is_linear():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(2, 1, 32, 32)).astype(np.float32)
    p = _params()
    assert np.allclose(apply_ctf(a + b, p, 2.0), apply_ctf(a, p, 2.0) + apply_ctf(b, p, 2.0), atol=1e-5)

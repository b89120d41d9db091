"""Shared fixtures: small simulated data sets (fixed seeds) made in the tests."""
from __future__ import annotations

import numpy as np
import pytest

from clcluster.steps.simulate import SimulationConfig, simulate


@pytest.fixture(scope="session")
def easy_sim():
    """4 views x 50 images, box 64 at 2.5 Å/px, SNR 0.5 (easy)."""
    cfg = SimulationConfig(views=4, images_per_view=50, snr=0.5, seed=3)
    return cfg, simulate(cfg)


@pytest.fixture(scope="session")
def preprocessed_easy(easy_sim):
    """The easy set phase-flipped, cropped to 32 px (5 Å/px), background-normalised."""
    from clcluster.steps.preprocess import PreprocessConfig, preprocess_batch

    cfg, sim = easy_sim
    return preprocess_batch(sim.images, sim.ctf, cfg.apix, PreprocessConfig(box=32)).astype(np.float32)


# --- both array modules ---------------------------------------------------------------------
# Tests of the image ops, CTF, preprocessing and augmentation take the `xp` fixture: they run on
# NumPy always and on CuPy only where CuPy imports and sees a CUDA device (otherwise that case
# is skipped with "CuPy/GPU not available"). The CuPy cases have only ever run on a GPU
# machine; on a CPU-only machine they are reported as skipped, never as passed.
from clcluster.core import backend as _backend  # noqa: E402


@pytest.fixture(params=["numpy", pytest.param("cupy", marks=pytest.mark.gpu)])
def xp(request):
    """The array module under test: numpy, or cupy when a GPU is usable."""
    if request.param == "numpy":
        return np
    if not _backend.gpu_available():
        pytest.skip("CuPy/GPU not available")
    return _backend.cp


@pytest.fixture
def xpcall(xp):
    """call(fn, *args, **kwargs): run fn with the NumPy array arguments moved to `xp`, check that
    every returned array is still an `xp` array (no hidden host round trip) and, for CuPy, that it
    matches the NumPy result within float tolerance (rtol/atol keywords, default 1e-4). Returns the
    result(s) as NumPy arrays, so the test's assertions are written once, for NumPy."""
    def move(a):
        return xp.asarray(a) if isinstance(a, np.ndarray) else a

    def call(fn, *args, rtol=1e-4, atol=1e-4, **kwargs):
        out = fn(*[move(a) for a in args], **{k: move(v) for k, v in kwargs.items()})
        outs = out if isinstance(out, tuple) else (out,)
        for o in outs:
            assert _backend.get_array_module(o) is xp, f"{getattr(fn, '__name__', fn)} returned a {type(o)} for {xp.__name__} input"
        host = tuple(_backend.asnumpy(o) for o in outs)
        if xp is not np:
            ref = fn(*args, **kwargs)
            refs = ref if isinstance(ref, tuple) else (ref,)
            for h, r in zip(host, refs):
                np.testing.assert_allclose(h, r, rtol=rtol, atol=atol)
        return host if isinstance(out, tuple) else host[0]

    return call


def binned_easy_set(views: int, snr: float, seed: int, images_per_view: int = 50):
    """(images, true classes, clean references): a simulated set phase-flipped and Fourier-cropped
    from 64 to 32 px, background-normalised at radius 12 px, with its clean projections prepared alike."""
    from clcluster.image.ctf import phase_flip
    from clcluster.image.imageops import fourier_crop, normalise_background

    cfg = SimulationConfig(views=views, images_per_view=images_per_view, snr=snr, seed=seed)
    sim = simulate(cfg)
    img = normalise_background(fourier_crop(phase_flip(sim.images, sim.ctf, cfg.apix), 32), radius=12)
    refs = normalise_background(fourier_crop(sim.projections, 32), radius=12)
    return img, sim.truth["class"].to_numpy(), refs

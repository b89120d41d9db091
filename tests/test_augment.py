"""Augmentation on both array modules (`xp` fixture, conftest.py): NumPy always; CuPy only on a GPU
machine (skipped with "CuPy/GPU not available" elsewhere). Random streams differ between NumPy
and CuPy generators, so CuPy runs are checked for staying on the device, shapes, seeded
reproducibility and the ops' properties, not compared value by value with NumPy."""
import numpy as np
import pytest

from clcluster.learn.augment import (AugmentConfig, augment, random_blur, random_contrast, random_ctf_envelope, random_erase,
                               random_mirror, random_noise, random_rotation, random_shift, two_views)
from clcluster.core.backend import asnumpy, get_array_module, make_rng
from clcluster.image.imageops import circular_mask, gaussian_lowpass


def _on(xp, x):
    assert get_array_module(x) is xp and x.dtype == np.float32
    return asnumpy(x)


def test_augmentation_reproducible_under_seed(preprocessed_easy, xp):
    x = xp.asarray(preprocessed_easy[:8])
    cfg = AugmentConfig(erase_prob=0.5, ctf_prob=0.5)
    a = _on(xp, augment(x, cfg, make_rng(xp, 1), apix=5.0))
    b = _on(xp, augment(x, cfg, make_rng(xp, 1), apix=5.0))
    c = _on(xp, augment(x, cfg, make_rng(xp, 2), apix=5.0))
    assert np.array_equal(a, b)
    assert not np.allclose(a, c)
    # without a seed: fresh entropy, different views
    d = _on(xp, augment(x, cfg, make_rng(xp, None), apix=5.0))
    e = _on(xp, augment(x, cfg, make_rng(xp, None), apix=5.0))
    assert not np.allclose(d, e)
    v1, v2 = two_views(x, cfg, make_rng(xp, 3), apix=5.0)
    v1, v2 = _on(xp, v1), _on(xp, v2)
    assert v1.shape == x.shape and not np.allclose(v1, v2)


def test_every_op_stays_on_the_device(preprocessed_easy, xp):
    x = xp.asarray(preprocessed_easy[:6])
    rng = make_rng(xp, 0)
    for out in (random_rotation(x, rng), random_shift(x, rng, 1.5), random_noise(x, rng, 0.5, 5.0, 1.0),
                random_blur(x, rng, 1.0, 1.0), random_ctf_envelope(x, rng, 5000, 30000, 1.0, 5.0),
                random_contrast(x, rng, 0.2), random_erase(x, rng, 1.0, 0.3), random_mirror(x, rng, 1.0)):
        assert get_array_module(out) is xp and out.shape == x.shape


def test_random_rotation_keeps_centred_disc_energy(xp):
    rng = np.random.default_rng(0)
    # band-limited content (as particle images are after preprocessing), zero outside a disc
    x = (gaussian_lowpass(rng.normal(size=(10, 64, 64)).astype(np.float32), np.full(10, 1.5)) *
         circular_mask(64, 20, soft_edge=6)).astype(np.float32)
    out = _on(xp, random_rotation(xp.asarray(x), make_rng(xp, 5)))
    ratio = (out ** 2).sum(axis=(1, 2)) / (x ** 2).sum(axis=(1, 2))
    assert np.all(np.abs(ratio - 1) < 0.01) and not np.allclose(out, x)


def test_random_noise_snr(xp):
    rng = np.random.default_rng(1)
    x = rng.normal(0, 2.0, (20, 64, 64)).astype(np.float32)
    out = _on(xp, random_noise(xp.asarray(x), make_rng(xp, 0), 2.0, 2.0, prob=1.0))
    added = (out - x).var(axis=(1, 2))
    assert np.allclose(added, x.var(axis=(1, 2)) / 2.0, rtol=0.1)
    assert np.array_equal(_on(xp, random_noise(xp.asarray(x), make_rng(xp, 0), 2.0, 2.0, prob=0.0)), x)


def test_random_ctf_envelope_damps_and_respects_prob(preprocessed_easy, xp):
    x = xp.asarray(preprocessed_easy[:8])
    assert np.array_equal(_on(xp, random_ctf_envelope(x, make_rng(xp, 0), 5000, 30000, 0.0, 5.0)), asnumpy(x))
    out = _on(xp, random_ctf_envelope(x, make_rng(xp, 0), 5000, 30000, 1.0, 5.0))
    # |CTF| <= 1: the power of every Fourier coefficient can only go down
    fo, fi = np.abs(np.fft.rfft2(out)), np.abs(np.fft.rfft2(asnumpy(x)))
    assert np.all(fo <= fi * (1 + 1e-4) + 1e-4) and (fo ** 2).sum() < 0.9 * (fi ** 2).sum()


def test_contrast_and_mirror(xp):
    x = np.random.default_rng(2).normal(size=(5, 16, 16)).astype(np.float32)
    assert np.allclose(_on(xp, random_contrast(xp.asarray(x), make_rng(xp, 0), 0.0)), x)
    j = _on(xp, random_contrast(xp.asarray(x), make_rng(xp, 0), 0.3))
    scale = j.std(axis=(1, 2)) / x.std(axis=(1, 2))
    assert np.all((scale > 0.7 - 1e-5) & (scale < 1.3 + 1e-5)) and not np.allclose(scale, 1)
    m = asnumpy(random_mirror(xp.asarray(x), make_rng(xp, 0), 1.0))
    assert np.array_equal(m, x[:, :, ::-1])


def test_mirror_off_by_default():
    assert AugmentConfig().mirror_prob == 0.0


def test_random_erase_zeroes_squares(xp):
    x = xp.ones((50, 16, 16), dtype=xp.float32)
    out = _on(xp, random_erase(x, make_rng(xp, 0), prob=1.0, max_frac=0.5))
    assert (out == 0).any() and (out == 1).any()
    for img in out:  # what is zeroed is one axis-aligned square (rows and columns equally many)
        rows, cols = np.flatnonzero((img == 0).any(1)), np.flatnonzero((img == 0).any(0))
        assert (img == 0).sum() == len(rows) * len(cols) and len(rows) == len(cols)


def test_numpy_generator_with_cupy_images_is_refused(xp):
    if xp is np:
        pytest.skip("only meaningful for CuPy images")
    with pytest.raises(TypeError, match="CuPy Generator"):
        augment(xp.zeros((2, 16, 16), dtype=xp.float32), AugmentConfig(), np.random.default_rng(0))


class _CountingGenerator:
    """A Generator that records which of its methods were called."""

    def __init__(self, rng):
        self.rng, self.calls = rng, []

    def __getattr__(self, name):
        self.calls.append(name)
        return getattr(self.rng, name)


def test_batched_views_draw_once_and_stay_on_the_device(preprocessed_easy, xp):
    """The GPU path's `two_views_batched`: one uniform draw for all per-image parameters plus
    one normal draw for the noise (not a dozen small draws per view), views on the images'
    device, reproducible under a seed, two different views of each image."""
    from clcluster.learn.augment import two_views_batched

    x = xp.asarray(preprocessed_easy[:8])
    cfg = AugmentConfig(erase_prob=0.5, ctf_prob=0.5, mirror_prob=0.5)
    a1, a2 = two_views_batched(x, cfg, make_rng(xp, 1), apix=5.0)
    b1, _ = two_views_batched(x, cfg, make_rng(xp, 1), apix=5.0)
    a1, a2, b1 = _on(xp, a1), _on(xp, a2), _on(xp, b1)
    assert a1.shape == a2.shape == x.shape
    assert np.array_equal(a1, b1) and not np.allclose(a1, a2)
    assert np.all(np.isfinite(a1)) and not np.allclose(a1, asnumpy(x))
    counting = _CountingGenerator(make_rng(np, 2))
    two_views_batched(np.asarray(preprocessed_easy[:8]), cfg, counting, apix=5.0)
    assert counting.calls == ["random", "standard_normal"]

"""Cryo-EM-aware augmentation of image batches (n, D, D), NumPy or CuPy, seeded.

Each op draws its random parameters from `rng` (a numpy/cupy Generator) per image; the
composed `augment` produces one random view, `two_views` the pair the contrastive loss needs.
Mirroring is off by default: a mirrored projection is a different view.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from clcluster.core.backend import asnumpy, get_array_module
from clcluster.image.ctf import CTFParams, ctf_2d
from clcluster.image.imageops import fourier_filter, fourier_shift, freq_grid, gaussian_lowpass, rotate
from clcluster.core.config import dataclass_from_dict


@dataclasses.dataclass
class AugmentConfig:
    """Parameter ranges of the augmentation ops (pixels, degrees, Å; probabilities in [0, 1])."""

    rotation: bool = True  # uniform in-plane rotation in [0, 360) degrees
    max_shift_px: float = 2.0  # uniform sub-pixel shift in [-max, max] px per axis
    noise_snr_min: float = 0.5  # extra white noise with SNR drawn log-uniformly in [min, max] ...
    noise_snr_max: float = 5.0
    noise_prob: float = 0.5  # ... with this probability
    blur_sigma_max_px: float = 1.0  # Gaussian blur sigma uniform in [0, max] px
    blur_prob: float = 0.3
    ctf_prob: float = 0.0  # random |CTF| envelope (defocus uniform in the range below)
    ctf_defocus_min_A: float = 5000.0
    ctf_defocus_max_A: float = 30000.0
    contrast_jitter: float = 0.2  # multiply by 1 + U(-j, j), add U(-j, j)
    erase_prob: float = 0.0  # zero a random square of up to erase_max_frac of the box
    erase_max_frac: float = 0.25
    mirror_prob: float = 0.0

    @classmethod
    def from_dict(cls, d: dict | None) -> "AugmentConfig":
        return dataclass_from_dict(cls, d)


def random_rotation(images, rng):
    xp = get_array_module(images)
    return rotate(images, rng.uniform(0, 360, images.shape[0]).astype(xp.float32))


def random_shift(images, rng, max_shift_px: float):
    if max_shift_px <= 0:
        return images
    return fourier_shift(images, rng.uniform(-max_shift_px, max_shift_px, (images.shape[0], 2)))


def random_noise(images, rng, snr_min: float, snr_max: float, prob: float):
    """Add white noise of variance var(image)/snr with snr log-uniform in [snr_min, snr_max]."""
    xp = get_array_module(images)
    n = images.shape[0]
    snr = xp.exp(rng.uniform(np.log(snr_min), np.log(snr_max), n)).astype(xp.float32)
    on = (rng.uniform(0, 1, n) < prob).astype(xp.float32)
    sigma = images.std(axis=(1, 2)) / xp.sqrt(snr) * on
    return images + rng.standard_normal(images.shape, dtype=xp.float32) * sigma[:, None, None]


def random_blur(images, rng, sigma_max_px: float, prob: float):
    xp = get_array_module(images)
    n = images.shape[0]
    sigma = rng.uniform(0, sigma_max_px, n) * (rng.uniform(0, 1, n) < prob)
    return gaussian_lowpass(images, sigma.astype(xp.float32))


def random_ctf_envelope(images, rng, defocus_min_A: float, defocus_max_A: float, prob: float, apix: float):
    """Multiply by |CTF| of a random defocus (what phase-flipped data look like), per image."""
    xp = get_array_module(images)
    n = images.shape[0]
    on = rng.uniform(0, 1, n) < prob
    if not bool(on.any()):
        return images
    df = asnumpy(rng.uniform(defocus_min_A, defocus_max_A, n))
    ctf = xp.abs(ctf_2d(CTFParams(df, df, np.zeros(n)), images.shape[-1], apix, xp))
    on = xp.asarray(on).reshape(n, 1, 1)
    return fourier_filter(images, xp.where(on, ctf, 1.0))


def random_contrast(images, rng, jitter: float):
    xp = get_array_module(images)
    n = images.shape[0]
    scale = 1 + rng.uniform(-jitter, jitter, n).astype(xp.float32)
    offset = rng.uniform(-jitter, jitter, n).astype(xp.float32)
    return images * scale[:, None, None] + offset[:, None, None]


def random_erase(images, rng, prob: float, max_frac: float):
    """Zero a random axis-aligned square (side up to max_frac of the box) in a fraction of images."""
    xp = get_array_module(images)
    n, box = images.shape[0], images.shape[-1]
    on = rng.uniform(0, 1, n) < prob
    size = (rng.uniform(0, max_frac, n) * box).astype(xp.int64)
    y0 = (rng.uniform(0, 1, n) * (box - size)).astype(xp.int64)
    x0 = (rng.uniform(0, 1, n) * (box - size)).astype(xp.int64)
    g = xp.arange(box)
    inside_y = (g[None] >= y0[:, None]) & (g[None] < (y0 + size)[:, None])
    inside_x = (g[None] >= x0[:, None]) & (g[None] < (x0 + size)[:, None])
    mask = inside_y[:, :, None] & inside_x[:, None, :] & on[:, None, None]
    return xp.where(mask, 0.0, images).astype(xp.float32)


def random_mirror(images, rng, prob: float):
    on = rng.uniform(0, 1, images.shape[0]) < prob
    xp = get_array_module(images)
    return xp.where(on[:, None, None], images[:, :, ::-1], images)


def _check_rng(images, rng):
    """The random draws must come from the images' module: a NumPy Generator with CuPy images
    would mix host and device arrays (CuPy refuses implicit conversion)."""
    xp = get_array_module(images)
    if xp is not np and isinstance(rng, np.random.Generator):
        raise TypeError("CuPy images need a CuPy Generator: use backend.make_rng(cupy, seed) "
                        "(cupy.random.default_rng), not numpy.random.default_rng")


def augment(images, cfg: AugmentConfig, rng, apix: float = 1.0):
    """One random view of each image, ops in the order: blur/CTF (signal), rotation, shift,
    noise, contrast, erasing, mirror. `rng` is a Generator of the images' array module
    (`backend.make_rng(xp, seed)`); the views stay on the images' device. Same seed and
    device → same views; NumPy and CuPy generators give different (equally valid) streams."""
    _check_rng(images, rng)
    x = images
    if cfg.blur_prob > 0 and cfg.blur_sigma_max_px > 0:
        x = random_blur(x, rng, cfg.blur_sigma_max_px, cfg.blur_prob)
    if cfg.ctf_prob > 0:
        x = random_ctf_envelope(x, rng, cfg.ctf_defocus_min_A, cfg.ctf_defocus_max_A, cfg.ctf_prob, apix)
    if cfg.rotation:
        x = random_rotation(x, rng)
    x = random_shift(x, rng, cfg.max_shift_px)
    if cfg.noise_prob > 0:
        x = random_noise(x, rng, cfg.noise_snr_min, cfg.noise_snr_max, cfg.noise_prob)
    if cfg.contrast_jitter > 0:
        x = random_contrast(x, rng, cfg.contrast_jitter)
    if cfg.erase_prob > 0:
        x = random_erase(x, rng, cfg.erase_prob, cfg.erase_max_frac)
    if cfg.mirror_prob > 0:
        x = random_mirror(x, rng, cfg.mirror_prob)
    return x.astype(get_array_module(x).float32)


def two_views(images, cfg: AugmentConfig, rng, apix: float = 1.0):
    """Two independent random views of each image (the contrastive pair)."""
    return augment(images, cfg, rng, apix), augment(images, cfg, rng, apix)


# Columns of the one uniform draw per batch in `two_views_batched`.
_U_BLUR, _U_BLUR_ON, _U_CTF_ON, _U_DEFOCUS, _U_ANGLE, _U_SHIFT_X, _U_SHIFT_Y = range(7)
_U_SNR, _U_NOISE_ON, _U_SCALE, _U_OFFSET, _U_ERASE_ON, _U_ERASE_SIZE, _U_ERASE_Y, _U_ERASE_X, _U_MIRROR = range(7, 16)
_U_COLUMNS = 16


def _signal_filter(u, cfg: AugmentConfig, box: int, apix: float, xp):
    """(m, D, D//2+1) Fourier filter: Gaussian blur times the |CTF| envelope (defocus in Å,
    300 kV, Cs 2.7 mm, amplitude contrast 0.1), per image as `u` (m, 16) selects; None when
    neither is enabled. Both are isotropic, so they commute with the in-plane rotation."""
    from clcluster.image.ctf import electron_wavelength

    use_blur = cfg.blur_prob > 0 and cfg.blur_sigma_max_px > 0
    if not use_blur and cfg.ctf_prob <= 0:
        return None
    fy, fx = freq_grid(box, 1.0, xp)
    f2 = (fx ** 2 + fy ** 2)[None]  # 1/px²
    filt = xp.ones((u.shape[0], 1, 1), dtype=xp.float32)
    if use_blur:
        sigma = (u[:, _U_BLUR] * cfg.blur_sigma_max_px * (u[:, _U_BLUR_ON] < cfg.blur_prob)).reshape(-1, 1, 1)
        filt = filt * xp.exp(-2 * (np.pi ** 2) * sigma ** 2 * f2)
    if cfg.ctf_prob > 0:
        lam = float(electron_wavelength(300.0))
        df = (cfg.ctf_defocus_min_A + u[:, _U_DEFOCUS] * (cfg.ctf_defocus_max_A - cfg.ctf_defocus_min_A)).reshape(-1, 1, 1)
        s2 = f2 / apix ** 2  # 1/Å²
        chi = -np.pi * lam * df * s2 + (np.pi / 2) * 2.7e7 * lam ** 3 * s2 ** 2 - float(np.arctan(0.1 / np.sqrt(0.99)))
        on = (u[:, _U_CTF_ON] < cfg.ctf_prob).reshape(-1, 1, 1)
        filt = filt * xp.where(on, xp.abs(xp.sin(chi)), 1.0)
    return filt.astype(xp.float32)


def _erase_mask(u, cfg: AugmentConfig, box: int, xp):
    """(m, D, D) bool: the square each image loses (none where the image is not erased)."""
    size = (u[:, _U_ERASE_SIZE] * cfg.erase_max_frac * box).astype(xp.int64)
    y0 = (u[:, _U_ERASE_Y] * (box - size)).astype(xp.int64)
    x0 = (u[:, _U_ERASE_X] * (box - size)).astype(xp.int64)
    g = xp.arange(box)
    inside_y = (g[None] >= y0[:, None]) & (g[None] < (y0 + size)[:, None])
    inside_x = (g[None] >= x0[:, None]) & (g[None] < (x0 + size)[:, None])
    on = u[:, _U_ERASE_ON] < cfg.erase_prob
    return inside_y[:, :, None] & inside_x[:, None, :] & on[:, None, None]


def two_views_batched(images, cfg: AugmentConfig, rng, apix: float = 1.0):
    """Two random views of each image (n, D, D), for the GPU: both views as one batch of 2n,
    every per-image parameter from ONE uniform draw (2n, 16) and the noise from one normal
    draw, all on the images' device (no host round trip); blur and |CTF| in one Fourier
    filter, rotation and shift in one bilinear resampling. Same op families and ranges as
    `augment` (a different random stream and interpolation, so not value-equal to it).
    `rng`: a Generator of the images' array module, created once and reused across steps."""
    _check_rng(images, rng)
    xp = get_array_module(images)
    n, box = images.shape[0], images.shape[-1]
    m = 2 * n
    u = rng.random((m, _U_COLUMNS), dtype=xp.float32)
    x = xp.concatenate([images, images]).astype(xp.float32, copy=False)
    filt = _signal_filter(u, cfg, box, apix, xp)
    if filt is not None:
        x = fourier_filter(x, filt)
    angles = u[:, _U_ANGLE] * 360 if cfg.rotation else xp.zeros(m, xp.float32)
    shifts = (u[:, [_U_SHIFT_X, _U_SHIFT_Y]] * 2 - 1) * max(cfg.max_shift_px, 0.0)
    if cfg.rotation or cfg.max_shift_px > 0:
        x = rotate(x, angles, shifts, method="bilinear")
    if cfg.noise_prob > 0:
        lo, hi = float(np.log(cfg.noise_snr_min)), float(np.log(cfg.noise_snr_max))  # Python floats: CuPy on the right
        log_snr = lo + u[:, _U_SNR] * (hi - lo)
        sigma = x.std(axis=(1, 2)) / xp.sqrt(xp.exp(log_snr)) * (u[:, _U_NOISE_ON] < cfg.noise_prob)
        x = x + rng.standard_normal(x.shape, dtype=xp.float32) * sigma[:, None, None].astype(xp.float32)
    if cfg.contrast_jitter > 0:
        j = cfg.contrast_jitter
        x = x * (1 + (2 * u[:, _U_SCALE, None, None] - 1) * j) + (2 * u[:, _U_OFFSET, None, None] - 1) * j
    if cfg.erase_prob > 0:
        x = xp.where(_erase_mask(u, cfg, box, xp), 0.0, x)
    if cfg.mirror_prob > 0:
        x = xp.where((u[:, _U_MIRROR] < cfg.mirror_prob)[:, None, None], x[:, :, ::-1], x)
    x = x.astype(xp.float32)
    return x[:n], x[n:]

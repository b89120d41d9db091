"""Image operations on batches of square images (n, D, D), NumPy or CuPy (same code).

Conventions: the image centre (rotation centre, phase origin) is pixel (D//2, D//2) as in
RELION; angles are in degrees, counter-clockwise in the (x = column, y = row) frame;
shifts are in pixels, (dx, dy) moves the content towards +x (columns) and +y (rows).
"""
from __future__ import annotations

import numpy as np

from clcluster.core.backend import asnumpy, get_array_module
from clcluster.image.polar import linear_radii, polar_coordinates

# RELION's default background (particle) radius, as a fraction of the box
BACKGROUND_RADIUS_FRACTION = 0.375


def centred_grid(box: int, xp=np):
    """(y, x) pixel coordinates relative to the centre pixel box//2, each (box, box)."""
    c = xp.arange(box, dtype=xp.float32) - box // 2
    return xp.meshgrid(c, c, indexing="ij")


def radius_grid(box: int, xp=np):
    y, x = centred_grid(box, xp)
    return xp.sqrt(x * x + y * y)


def circular_mask(box: int, radius: float, soft_edge: float = 0.0, xp=np):
    """(box, box) mask: 1 inside `radius` px, raised-cosine edge of width `soft_edge` px, 0 outside."""
    r = radius_grid(box, xp)
    if soft_edge <= 0:
        return (r <= radius).astype(xp.float32)
    t = xp.clip((r - radius) / soft_edge, 0.0, 1.0)
    return (0.5 + 0.5 * xp.cos(np.pi * t)).astype(xp.float32)


def freq_grid(box: int, apix: float = 1.0, xp=np, rfft: bool = True):
    """Spatial frequencies (fy, fx) in 1/Å on the (r)FFT grid of a box, unshifted layout."""
    fy = xp.fft.fftfreq(box, d=apix).astype(xp.float32)
    fx = (xp.fft.rfftfreq(box, d=apix) if rfft else xp.fft.fftfreq(box, d=apix)).astype(xp.float32)
    return xp.meshgrid(fy, fx, indexing="ij")


def radial_shells(box: int, xp=np, rfft: bool = True, fold: bool = True):
    """Integer radial shell round(|k|) (k in cycles per box) of every coefficient of the (r)FFT of
    a (box, box) image, unshifted layout: (box, box//2+1) with rfft, else (box, box); int64.
    fold: the corners beyond Nyquist go into the last shell, box//2; else they keep their own
    shells (> box//2). The shells of every radial spectrum of the package: whitening
    (`steps.preprocess`, `em.averages`) and the realistic simulator's noise profiles."""
    fy, fx = freq_grid(box, 1.0, xp, rfft=rfft)
    shell = xp.rint(xp.sqrt(fx ** 2 + fy ** 2) * box).astype(xp.int64)
    return xp.minimum(shell, box // 2) if fold else shell


def fourier_filter(images, filt):
    """Multiply the rFFT of images (n, D, D) by `filt` ((D, D//2+1) or (n, D, D//2+1)) and return real images."""
    xp = get_array_module(images)
    box = images.shape[-1]
    f = xp.fft.rfft2(images)
    return xp.fft.irfft2(f * filt, s=(box, box)).astype(xp.float32)


def fourier_crop(images, new_box: int):
    """Fourier-crop (or zero-pad) images (n, D, D) to (n, new_box, new_box).

    Keeps the frequencies both boxes share; the mean (DC) and low frequencies are preserved.
    The pixel size grows by D / new_box."""
    xp = get_array_module(images)
    n, box = images.shape[0], images.shape[-1]
    if new_box == box:
        return images.astype(xp.float32, copy=False)
    f = xp.fft.fftshift(xp.fft.fft2(images), axes=(-2, -1))
    out = xp.zeros((n, new_box, new_box), dtype=f.dtype)
    m = min(box, new_box)
    src0, dst0 = box // 2 - m // 2, new_box // 2 - m // 2
    out[:, dst0:dst0 + m, dst0:dst0 + m] = f[:, src0:src0 + m, src0:src0 + m]
    out = xp.fft.ifft2(xp.fft.ifftshift(out, axes=(-2, -1))).real
    return (out * (new_box / box) ** 2).astype(xp.float32)


def normalise_background(images, radius: float):
    """RELION-style normalisation: mean 0 and std 1 of the pixels outside `radius` px."""
    xp = get_array_module(images)
    outside = radius_grid(images.shape[-1], xp) > radius
    bg = images[:, outside]
    mean = bg.mean(axis=1)[:, None, None]
    std = bg.std(axis=1)[:, None, None]
    return ((images - mean) / xp.maximum(std, 1e-12)).astype(xp.float32)


def normalise_whole(images):
    """Mean 0, std 1 over each whole image."""
    xp = get_array_module(images)
    mean = images.mean(axis=(1, 2), keepdims=True)
    std = images.std(axis=(1, 2), keepdims=True)
    return ((images - mean) / xp.maximum(std, 1e-12)).astype(xp.float32)


def bilinear_sample(images, ys, xs):
    """Sample images (n, D, D) at pixel coordinates ys, xs (row, column; each of shape (n, ...)),
    bilinearly; 0 outside the box. Returns float32 of the coordinates' shape."""
    xp = get_array_module(images)
    n, box = images.shape[0], images.shape[-1]
    y0 = xp.floor(ys)
    x0 = xp.floor(xs)
    wy, wx = (ys - y0).astype(xp.float32), (xs - x0).astype(xp.float32)
    y0, x0 = y0.astype(xp.int64), x0.astype(xp.int64)
    flat = images.reshape(n, box * box)
    out_shape = ys.shape
    out = xp.zeros(out_shape, dtype=xp.float32)
    for dy, dx, w in ((0, 0, (1 - wy) * (1 - wx)), (0, 1, (1 - wy) * wx), (1, 0, wy * (1 - wx)), (1, 1, wy * wx)):
        yy, xx = y0 + dy, x0 + dx
        valid = (yy >= 0) & (yy < box) & (xx >= 0) & (xx < box)
        idx = (xp.clip(yy, 0, box - 1) * box + xp.clip(xx, 0, box - 1)).reshape(n, -1)
        vals = xp.take_along_axis(flat, idx, axis=1).reshape(out_shape)
        out += xp.where(valid, vals, 0.0) * w
    return out


def rotate(images, angles_deg, shifts=None, method: str = "fourier"):
    """Rotate each image counter-clockwise by angles_deg[i] about the centre pixel, then
    shift it by shifts[i] = (dx, dy) px. images (n, D, D).

    method "fourier": exact quarter turns plus three Fourier shears (band-limited, keeps the
    energy of a centred particle; content is periodic in the box); "bilinear": interpolation
    (faster, smooths slightly)."""
    if method == "fourier":
        out = rotate_fourier(images, angles_deg)
        return fourier_shift(out, shifts) if shifts is not None else out
    xp = get_array_module(images)
    n, box = images.shape[0], images.shape[-1]
    a = xp.deg2rad(xp.asarray(angles_deg, dtype=xp.float32)).reshape(n, 1, 1)
    y, x = centred_grid(box, xp)
    if shifts is not None:
        s = xp.asarray(shifts, dtype=xp.float32).reshape(n, 2)
        x = x[None] - s[:, 0, None, None]
        y = y[None] - s[:, 1, None, None]
    else:
        x, y = x[None], y[None]
    # output at p = (x, y) takes the input at R(a) p; with rows pointing down this is
    # np.rot90 (counter-clockwise on screen) for a = 90
    cos, sin = xp.cos(a), xp.sin(a)
    xs = cos * x - sin * y
    ys = sin * x + cos * y
    c = box // 2
    return bilinear_sample(images, xp.broadcast_to(ys + c, (n, box, box)), xp.broadcast_to(xs + c, (n, box, box)))


def _quarter_turn(images):
    """rotate(images, 90) exactly: np.rot90 about the centre pixel box//2 (periodic)."""
    xp = get_array_module(images)
    out = xp.rot90(images, 1, axes=(-2, -1))
    return xp.roll(out, 1, axis=-2) if images.shape[-1] % 2 == 0 else out


def _shear(images, amount, axis: int):
    """Periodic Fourier shear: axis=-1 moves row y by -amount*y px along x (out(x, y) = in(x + a y, y));
    axis=-2 moves column x by -amount*x px along y. amount: (n,) per image."""
    xp = get_array_module(images)
    box = images.shape[-1]
    c = (xp.arange(box, dtype=xp.float32) - box // 2)
    f = xp.fft.fftfreq(box).astype(xp.float32)
    a = xp.asarray(amount, dtype=xp.float32).reshape(-1, 1, 1)
    if axis == -1:  # FFT along x, shift depends on the row
        phase = xp.exp(2j * np.pi * f[None, None, :] * a * c[None, :, None])
    else:
        phase = xp.exp(2j * np.pi * f[None, :, None] * a * c[None, None, :])
    return xp.fft.ifft(xp.fft.fft(images, axis=axis) * phase, axis=axis).real.astype(xp.float32)


def rotate_fourier(images, angles_deg):
    """Exact-as-possible rotation (same convention as `rotate`): quarter turns by index
    permutation, the remaining angle in [-45, 45] degrees by three Fourier shears."""
    xp = get_array_module(images)
    a = np.asarray(asnumpy(angles_deg), dtype=np.float64).reshape(-1)
    a = np.broadcast_to(a, (images.shape[0],))
    k = np.round(a / 90.0).astype(int) % 4
    r = np.deg2rad(a - 90.0 * np.round(a / 90.0))
    out = images.astype(xp.float32, copy=True)
    for q in (1, 2, 3):
        sel = np.flatnonzero(k == q)
        if sel.size:
            sub = out[sel]
            for _ in range(q):
                sub = _quarter_turn(sub)
            out[sel] = sub
    t, u = -np.tan(r / 2), np.sin(r)
    if np.any(r != 0):
        out = _shear(out, t, -1)
        out = _shear(out, u, -2)
        out = _shear(out, t, -1)
    return out


def fourier_shift(images, shifts):
    """Shift images (n, D, D) by shifts (n, 2) = (dx, dy) px, sub-pixel exact (periodic)."""
    xp = get_array_module(images)
    box = images.shape[-1]
    fy, fx = freq_grid(box, 1.0, xp)
    s = xp.asarray(shifts, dtype=xp.float32)
    phase = xp.exp(-2j * np.pi * (fx[None] * s[:, 0, None, None] + fy[None] * s[:, 1, None, None]))
    return fourier_filter(images, phase)


def gaussian_lowpass(images, sigma_px):
    """Gaussian blur with per-image sigma (px) applied as a Fourier filter; sigma 0 leaves an image unchanged."""
    xp = get_array_module(images)
    box = images.shape[-1]
    fy, fx = freq_grid(box, 1.0, xp)
    s = xp.asarray(sigma_px, dtype=xp.float32).reshape(-1, 1, 1)
    filt = xp.exp(-2 * (np.pi ** 2) * (s ** 2) * (fx ** 2 + fy ** 2)[None])
    return fourier_filter(images, filt)


def lowpass(images, resolution_A: float, apix: float, edge_width: float = 0.02):
    """Low-pass to `resolution_A` Å with a raised-cosine edge `edge_width` (1/Å) wide."""
    xp = get_array_module(images)
    fy, fx = freq_grid(images.shape[-1], apix, xp)
    f = xp.sqrt(fx ** 2 + fy ** 2)
    f0 = 1.0 / resolution_A
    t = xp.clip((f - f0) / edge_width + 0.5, 0, 1)
    return fourier_filter(images, (0.5 + 0.5 * xp.cos(np.pi * t)).astype(xp.float32))


def polar_grid(box: int, n_radii: int, n_angles: int, r_min: float = 0.5, r_max: float | None = None, xp=np):
    """(ys, xs) pixel coordinates (n_radii, n_angles) of a polar grid about the centre pixel.
    Angle index k is at 360*k/n_angles degrees; `rotate(images, a)` with a = 360*k/n_angles
    rolls the polar samples by -k along the angle axis (np.roll(p, -k, axis=-1))."""
    r_max = box // 2 - 1 if r_max is None else r_max
    xs, ys = polar_coordinates(box, linear_radii(r_min, r_max, n_radii, xp), n_angles, xp=xp)
    return ys, xs


def polar_resample(images, n_radii: int = 16, n_angles: int = 64, r_min: float = 0.5, r_max: float | None = None):
    """Resample images (n, D, D) to polar coordinates (n, n_radii, n_angles), bilinearly."""
    xp = get_array_module(images)
    n, box = images.shape[0], images.shape[-1]
    ys, xs = polar_grid(box, n_radii, n_angles, r_min, r_max, xp)
    shape = (n,) + ys.shape
    return bilinear_sample(images, xp.broadcast_to(ys, shape), xp.broadcast_to(xs, shape))


def fourier_crop_filtered(images, new_box: int, filt=None):
    """fourier_crop(fourier_filter(images, filt), new_box) in one pass for new_box < D (both
    even): one rFFT at the input box, the filter ((D, D//2+1) or (n, D, D//2+1), or None),
    the crop on the rFFT grid, one inverse rFFT at the small box. Same result as the two-step
    form up to float rounding (the new box's Nyquist row is the mean of the +/- Nyquist rows and
    the corner is Re F(h, h), as the real part of `fourier_crop`'s inverse FFT makes them); about 3x fewer FFT operations
    and a third of the memory. Other sizes fall back to the two-step form."""
    xp = get_array_module(images)
    box = images.shape[-1]
    if new_box >= box or box % 2 or new_box % 2:
        x = fourier_filter(images, filt) if filt is not None else images
        return fourier_crop(x, new_box)
    f = xp.fft.rfft2(images)
    if filt is not None:
        f = f * filt
    h = new_box // 2
    out = xp.empty(f.shape[:-2] + (new_box, h + 1), dtype=f.dtype)
    out[..., :h, :] = f[..., :h, :h + 1]
    out[..., h + 1:, :] = f[..., box - h + 1:, :h + 1]
    out[..., h, :] = 0.5 * (f[..., h, :h + 1] + f[..., box - h, :h + 1])
    out[..., h, h] = f[..., h, h]  # the corner: fourier_crop keeps Re F(-h, -h) = Re F(h, h)
    return (xp.fft.irfft2(out, s=(new_box, new_box)) * (new_box / box) ** 2).astype(xp.float32)

"""Local in-plane pose refinement of each particle against its class average, at the pixel size
of the images given (the input images for the export), so that exported poses are not
quantised to the working box's pixels and angle steps.

Pose convention (as `align` and `averages`): image ≈ shift_by(s) ∘ rotate_by(a) (class
average), a in degrees (counter-clockwise, `imageops.rotate`), s = (dx, dy) px.

Method, per particle: for angles a + δ on a local grid (δ in [-angle_range, angle_range]),
rotate the image by -(a + δ) and cross-correlate it with the class average by FFT; the image
is then the average shifted by t = R(a + δ) s (R: the rotation matrix `imageops.rotate` uses),
so the correlation peak inside a disc of `shift_range` px around the expected t gives the
shift, refined to sub-pixel by a parabola through the peak and its neighbours along x and y.
The angle is refined by a parabola through the best grid angle's score and its neighbours'.
Scores are normalised cross-correlations (NCC, mean removed).
"""
from __future__ import annotations

import dataclasses

import numpy as np

from clcluster.image.imageops import BACKGROUND_RADIUS_FRACTION, rotate


@dataclasses.dataclass
class LocalPoses:
    angle_deg: np.ndarray  # (n,) refined a, degrees
    shift_px: np.ndarray  # (n, 2) refined s, px of the images refined against
    score: np.ndarray  # (n,) NCC at the refined pose's grid point
    start_score: np.ndarray  # (n,) NCC at the starting angle (δ = 0; best shift within the window)
    angle_step_deg: float  # spacing of the local angle grid (refined further by the parabola)


def rotation_matrices(angle_deg) -> np.ndarray:
    """(n, 2, 2) R(a) acting on (dx, dy): the input point `imageops.rotate` samples, R(a) p."""
    a = np.deg2rad(np.asarray(angle_deg, dtype=np.float64))
    c, s = np.cos(a), np.sin(a)
    return np.stack([np.stack([c, -s], -1), np.stack([s, c], -1)], -2)


def _parabola_offset(left, centre, right):
    """Vertex offset (in grid steps, clipped to [-0.5, 0.5]) of the parabola through 3 values."""
    den = left - 2.0 * centre + right
    with np.errstate(divide="ignore", invalid="ignore"):
        off = np.where(den < 0, 0.5 * (left - right) / den, 0.0)
    return np.clip(np.nan_to_num(off), -0.5, 0.5)


def _peaks(cc, t0, radius: float):
    """Best correlation within `radius` px of the expected shift t0 (b, 2) = (dx, dy), and its
    sub-pixel position (b, 2). cc (b, D, D): circular cross-correlation, index = shift."""
    b, box = cc.shape[0], cc.shape[-1]
    lag = (np.arange(box) + box // 2) % box - box // 2  # index -> signed shift
    dx = lag[None, None, :] - t0[:, 0, None, None]
    dy = lag[None, :, None] - t0[:, 1, None, None]
    masked = np.where(dx ** 2 + dy ** 2 <= radius ** 2, cc, -np.inf)
    flat = masked.reshape(b, -1).argmax(1)
    iy, ix = np.divmod(flat, box)
    rows = np.arange(b)
    centre = cc[rows, iy, ix]
    ox = _parabola_offset(cc[rows, iy, (ix - 1) % box], centre, cc[rows, iy, (ix + 1) % box])
    oy = _parabola_offset(cc[rows, (iy - 1) % box, ix], centre, cc[rows, (iy + 1) % box, ix])
    return centre, np.stack([lag[ix] + ox, lag[iy] + oy], axis=1)


def correlation_at(cross, t) -> np.ndarray:
    """Circular cross-correlation at sub-pixel shifts t (b, 2) = (dx, dy) from its full 2D
    spectrum cross (b, D, D) = FFT(image) x conj(FFT(reference)): (1/D^2) Re sum F e^{2 pi i k.t / D}."""
    box = cross.shape[-1]
    k = np.fft.fftfreq(box)
    phase_x = np.exp(2j * np.pi * k[None, :] * t[:, 0, None])  # (b, D) along x
    phase_y = np.exp(2j * np.pi * k[None, :] * t[:, 1, None])  # (b, D) along y
    return np.einsum("byx,by,bx->b", cross, phase_y, phase_x).real / box ** 2


def refine_batch(images, labels, references, angle_deg, shift_px, angle_range_deg: float, shift_range_px: float,
                 n_angles: int = 9, ctf_weight=None) -> LocalPoses:
    """Refine the poses of one batch. images (b, D, D) float32, phase-correct (CTF phases
    corrected, or premultiplied), normalised; references (k, D, D) class averages at the same
    pixel size; labels (b,) 0-based; angle_deg (b,), shift_px (b, 2) the starting poses.
    ctf_weight (b, D, D) on the full FFT grid, in the class frame: how the CTF scales the
    signal of each image (|CTF| for phase-flipped images, CTF^2 for premultiplied ones), applied
    to the reference so that the correlation is the matched filter; None: 1."""
    b, box = images.shape[0], images.shape[-1]
    a0 = np.asarray(angle_deg, dtype=np.float64)
    s0 = np.asarray(shift_px, dtype=np.float64).reshape(b, 2)
    refs = references - references.mean(axis=(1, 2), keepdims=True)
    ref_f = np.conj(np.fft.fft2(refs))[np.asarray(labels)]
    if ctf_weight is not None:
        ref_f = ref_f * ctf_weight
    ref_norm = np.sqrt((np.abs(ref_f) ** 2).sum(axis=(1, 2))) / box  # Parseval: norm of the (weighted) reference
    deltas = np.linspace(-angle_range_deg, angle_range_deg, n_angles)
    scores = np.empty((b, n_angles))
    shifts = np.empty((b, n_angles, 2))
    for j, d in enumerate(deltas):
        y = rotate(images, -(a0 + d)).astype(np.float32)
        y = y - y.mean(axis=(1, 2), keepdims=True)
        cross = np.fft.fft2(y) * ref_f
        cc = np.fft.ifft2(cross).real
        norm = np.linalg.norm(y.reshape(b, -1), axis=1) * ref_norm
        t0 = np.einsum("nij,nj->ni", rotation_matrices(a0 + d), s0)
        _, t = _peaks(cc, t0, shift_range_px)
        # the correlation AT the sub-pixel shift (not at the nearest integer one, which would
        # make the angle score depend on how far t is from the pixel grid)
        scores[:, j] = correlation_at(cross, t) / np.maximum(norm, 1e-12)
        shifts[:, j] = np.einsum("nij,nj->ni", rotation_matrices(-(a0 + d)), t)  # s = R(-a) t
    best = scores.argmax(1)
    rows = np.arange(b)
    inner = (best > 0) & (best < n_angles - 1)
    lo, hi = np.clip(best - 1, 0, n_angles - 1), np.clip(best + 1, 0, n_angles - 1)
    off = np.where(inner, _parabola_offset(scores[rows, lo], scores[rows, best], scores[rows, hi]), 0.0)
    step = deltas[1] - deltas[0] if n_angles > 1 else 0.0
    angle = a0 + deltas[best] + off * step
    return LocalPoses(angle, shifts[rows, best], scores[rows, best], scores[:, n_angles // 2], float(step))


def concat(parts: list[LocalPoses]) -> LocalPoses:
    return LocalPoses(*(np.concatenate([getattr(p, f) for p in parts]) for f in
                        ("angle_deg", "shift_px", "score", "start_score")),
                      parts[0].angle_step_deg if parts else 0.0)


def _phase_correct(x, table, rows, params, states, apix: float):
    """Images (b, D, D) with CTF phases corrected (raw: x sign(CTF); flipped / premultiplied:
    as they are) and the matched-filter weight (b, D, D) of each (|CTF|, or CTF^2 for
    premultiplied images) in the class frame; (x, None) without CTF parameters."""
    from clcluster.image.ctf import PREMULTIPLIED, RAW, ctf_2d

    if params is None:
        return x, None
    box = x.shape[-1]
    p = params.subset(rows)
    c = ctf_2d(p, box, apix)
    raw = (states[rows] == RAW).reshape(-1, 1, 1)
    x = np.fft.irfft2(np.fft.rfft2(x) * np.where(raw, np.sign(c), 1.0), s=(box, box)).astype(np.float32)
    return x, (p, states[rows] == PREMULTIPLIED)


def _weights(ctf_info, angle_deg, box: int, apix: float):
    """|CTF| (or CTF^2 for premultiplied images) on the full FFT grid, rotated into the class frame."""
    from clcluster.image.ctf import ctf_2d

    if ctf_info is None:
        return None
    p, premult = ctf_info
    p_ref = dataclasses.replace(p, defocus_angle=np.asarray(p.defocus_angle, dtype=np.float64) + np.asarray(angle_deg))
    c = ctf_2d(p_ref, box, apix, rfft=False)
    return np.where(premult.reshape(-1, 1, 1), c * c, np.abs(c))


def refine_original(table, labels, averages, angle_deg, shift_px, *, angle_range_deg: float, shift_range_px: float,
                    n_angles: int = 9, batch_size: int = 128, ctf: bool = True) -> LocalPoses:
    """Refine the poses of every particle of `table` against `averages` (k, D, D) at the
    particles' own box and pixel size, reading the original images batch by batch (background
    normalised as for the averages, CTF phases corrected per the optics groups' flags).
    shift_px (n, 2): starting shifts in px of these images."""
    from clcluster.em.averages import has_ctf
    from clcluster.image.ctf import CTFParams, ctf_states
    from clcluster.image.imageops import normalise_background
    from clcluster.io.mrc import read_images

    labels = np.asarray(labels, dtype=np.int64)
    n = len(labels)
    apix = float(np.median(table.pixel_size()))
    params = CTFParams.from_table(table) if (ctf and has_ctf(table)) else None
    states = ctf_states(table)
    paths, idx = table.image_refs()
    whole = table.whole_file_rows()
    parts = []
    for s in range(0, n, batch_size):
        rows = np.arange(s, min(n, s + batch_size))
        x = read_images([paths[i] for i in rows], idx[rows], None, whole[rows])
        box = x.shape[-1]
        x = normalise_background(x, BACKGROUND_RADIUS_FRACTION * box).astype(np.float32)
        x, info = _phase_correct(x, table, rows, params, states, apix)
        w = _weights(info, np.asarray(angle_deg)[rows], box, apix)
        parts.append(refine_batch(x, labels[rows], averages, np.asarray(angle_deg)[rows],
                                  np.asarray(shift_px)[rows], angle_range_deg, shift_range_px, n_angles, w))
    return concat(parts)


def refine_array(images, labels, averages, angle_deg, shift_px, *, angle_range_deg: float, shift_range_px: float,
                 n_angles: int = 9, batch_size: int = 256) -> LocalPoses:
    """The same for already preprocessed images (n, D, D) (CTF-corrected, normalised), e.g.
    the working-box copies against working-box averages."""
    labels = np.asarray(labels, dtype=np.int64)
    parts = []
    for s in range(0, len(labels), batch_size):
        rows = np.arange(s, min(len(labels), s + batch_size))
        x = np.asarray(images[s:s + batch_size], dtype=np.float32)
        parts.append(refine_batch(x, labels[rows], averages, np.asarray(angle_deg)[rows],
                                  np.asarray(shift_px)[rows], angle_range_deg, shift_range_px, n_angles))
    return concat(parts)

"""Surround power: does a pick hold structure around the particle that its class average does not explain?

Aggregates (two particles touching), a neighbour reaching into the box and carbon edges put
particle-band power outside the particle radius where a lone particle leaves noise. The pick
contrast (`image.pickscore`) does not see aggregates: they hold as much power inside the disc,
relative to around it, as a particle does. Measured per pick, with its pose and its class average:

1. the pick in its class frame (pose undone), filtered to the particle band of the pick contrast
   (amplitude sqrt(w(s)) per Fourier shell s, so that powers are weighted by w(s));
2. its class average (the aligned mean of the same images, same band) scaled to the pick by least
   squares inside the particle radius and subtracted, so that the particle's own density beyond
   the radius (a long view, an off-centre pick) is not counted;
3. the residual's mean power per pixel outside the disc of the particle radius (a hard edge: a
   soft one lets the particle's own edge into the count);
4. the score: the robust z of its log over the stack (median, 1.4826 x MAD), so that nothing
   depends on the pixel size, the SNR or the noise level.

Picks above `export.max_surround_z` leave particles_selected. All images are (n, D, D) working-box
pixels; radii in pixels; poses as `em.align.to_reference_frame` takes them.
"""
from __future__ import annotations

import numpy as np

from clcluster.em.align import to_reference_frame
from clcluster.em.averages import aligned_means, robust_z
from clcluster.image.imageops import circular_mask, radial_shells

MIN_OUTSIDE_PIXELS = 16  # fewer pixels around the particle radius: no surround power


def band_filter(shell_weights: np.ndarray, box: int) -> np.ndarray:
    """(box, box//2+1) rFFT amplitude filter sqrt(w(s)) of the per-shell band weights (box//2+1,)."""
    return np.sqrt(np.clip(shell_weights, 0.0, None))[radial_shells(box)]


def _band(images: np.ndarray, filt: np.ndarray) -> np.ndarray:
    box = images.shape[-1]
    return np.fft.irfft2(np.fft.rfft2(images) * filt, s=(box, box))


def surround_power(images, labels: np.ndarray, k: int, angle_deg, shift_px, radius_px: float,
                   shell_weights: np.ndarray, batch: int = 1024) -> np.ndarray:
    """(n,) mean band power outside the particle radius (px) of each pick of images (n, D, D)
    (array-like, read in batches) after its class average is subtracted (module docstring); NaN
    where the disc leaves fewer than MIN_OUTSIDE_PIXELS pixels of the box around it.
    labels (n,) 0..k-1; angle_deg (n,) degrees, shift_px (n, 2) px: the poses of the averages."""
    labels = np.asarray(labels)
    box = images.shape[-1]
    filt = band_filter(shell_weights, box)
    inside = circular_mask(box, radius_px).astype(np.float64)  # hard edge: a soft one lets the particle in
    outside = 1.0 - inside
    if outside.sum() < MIN_OUTSIDE_PIXELS:
        return np.full(len(labels), np.nan)
    references = _band(aligned_means(images, labels, k, angle_deg, shift_px, batch).astype(np.float64), filt)
    ref_energy = np.maximum((references ** 2 * inside).sum(axis=(1, 2)), 1e-30)
    out = np.empty(len(labels))
    for s in range(0, len(labels), batch):
        rows = slice(s, s + batch)
        x = _band(np.asarray(to_reference_frame(np.asarray(images[rows], dtype=np.float32), angle_deg[rows],
                                                shift_px[rows]), dtype=np.float64), filt)
        t = references[labels[rows]]
        scale = (x * t * inside).sum(axis=(1, 2)) / ref_energy[labels[rows]]
        residual = x - scale[:, None, None] * t
        out[rows] = (residual ** 2 * outside).sum(axis=(1, 2)) / outside.sum()
    return out


def surround_z(power: np.ndarray) -> np.ndarray:
    """(n,) robust z of log(power) (n,) over the stack (`averages.robust_z`, no spread floor); NaN
    where the power is NaN."""
    power = np.asarray(power, dtype=np.float64)
    return robust_z(np.log(np.maximum(power, 1e-300)), np.ones(len(power)), min_relative_spread=0.0)

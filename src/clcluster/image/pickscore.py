"""Pick contrast: does a pick hold more particle-band power inside the particle radius than around it?

A per-particle screen for picks that look like noise (empty ice; in whitened images also weak
carbon edges and ice), in the spirit of cryoSPARC's pick power score, made scale-free and given
a threshold from a noise model instead of a hand-set value:

1. Per Fourier shell s, the power of each image inside a soft disc of the particle radius,
   P_in(s), and outside it, P_out(s), each per unit of mask energy (so that stationary noise gives
   the same expected value in both).
2. The particle band: weights w(s) = max(0, median P_in(s) / median P_out(s) - 1) over the stack
   (shell 0 excluded),
   the shells in which the typical pick holds more power inside than around (the data decide;
   nothing depends on the pixel size or the SNR).
3. The score of a pick: log(sum_s w(s) P_in(s) / sum_s w(s) P_out(s)); 0 for stationary noise,
   > 0 for a particle in the disc, < 0 for structure around it (carbon edges, neighbours).
4. The null: the same score for Gaussian noise images with the stack's background spectrum (median
   P_out, free of the particles' own power), which a noise-only pick would score.
5. The cut: the fraction of noise-like picks pi0 is estimated from the left tail (the share of
   picks below the null's 20 % quantile over 0.2, Storey's estimator); picks below a threshold t
   are noise-like, with t the highest value at which the estimated loss of the other picks,
   (F(t) - pi0 F0(t)) / (1 - pi0), stays within `max_good_loss` (F: the scores' CDF, F0: the null's)
   and at least half the picks below t are estimated noise-like (pi0 F0(t) >= F(t) / 2), so that
   a stack without noise-like picks loses none.
   The estimate counts particles that score like noise into pi0, so the real loss can exceed it
   at very low SNR (docs/realistic.md measures it).
6. With `particle_model` (the export's selection): a second estimate of the loss from a fitted
   model of the particles' scores, a normal distribution N(mu, sd) in the mixture
   pi0 f0 + (1 - pi0) N(mu, sd) (f0: the null's density; EM), whose left tail below t is the loss;
   the cut keeps the larger of the two estimates within `max_good_loss`. Storey's estimate fails
   where particles score like noise, the normal one where their scores have a heavy left tail;
   the larger is the conservative one. The refinement's fit, which only leaves the picks out of
   the fit and labels them afterwards, uses Storey's alone.

All images are (n, D, D) working-box pixels; radii in pixels.
"""
from __future__ import annotations

import dataclasses
import logging

import numpy as np
from scipy.special import ndtr

from clcluster.image.imageops import BACKGROUND_RADIUS_FRACTION, circular_mask, radial_shells

log = logging.getLogger(__name__)

NULL_TAIL_QUANTILE = 0.2  # Storey's lambda: the null quantile below which picks are counted for pi0
NULL_MAX_QUANTILE = 0.99  # never cut above this quantile of the noise-only scores
MIN_NOISE_SHARE = 0.5  # the picks cut must be estimated noise-like for at least this share
MIN_PICKS = 50  # fewer picks: no screen (the band and pi0 need a stack)
NULL_DENSITY_BINS = 100  # histogram bins of the null's density in the particle model's mixture
MIXTURE_ITERATIONS = 300


@dataclasses.dataclass
class PickContrast:
    scores: np.ndarray  # (n,) log power ratio inside / around the particle radius in the particle band
    noise_like: np.ndarray  # (n,) bool: below the threshold
    threshold: float  # score cut (-inf: nothing cut)
    noise_fraction: float  # estimated fraction of noise-like picks (pi0); NaN where no cut ran (off, too few picks, no band)
    weights: np.ndarray  # (D//2+1,) particle-band weight per Fourier shell
    estimated_loss: float = float("nan")  # estimated fraction of the other picks below the threshold


def shell_powers(images, radius_px: float, batch: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Mean power per Fourier shell inside a soft disc of `radius_px` and outside it, each divided
    by the mask's energy: two (n, D//2+1) float64 arrays. Each image's mean is removed first."""
    box = images.shape[-1]
    inside = circular_mask(box, radius_px, soft_edge=0.05 * box).astype(np.float64)
    outside = 1.0 - inside
    shells = radial_shells(box).ravel()
    per_shell_mean = np.zeros((len(shells), box // 2 + 1))
    per_shell_mean[np.arange(len(shells)), shells] = 1.0
    per_shell_mean /= per_shell_mean.sum(axis=0)
    out_in, out_out = [], []
    for i in range(0, len(images), batch):
        x = np.asarray(images[i:i + batch], dtype=np.float64)
        x = x - x.mean(axis=(1, 2), keepdims=True)
        for mask, out in ((inside, out_in), (outside, out_out)):
            p = np.abs(np.fft.rfft2(x * mask)) ** 2 / (mask ** 2).sum()
            out.append(p.reshape(len(x), -1) @ per_shell_mean)
    return np.concatenate(out_in), np.concatenate(out_out)


def band_weights(inner: np.ndarray, outer: np.ndarray) -> np.ndarray:
    """(S,) weight per shell: how much more power the median pick holds inside than around, >= 0;
    0 for shell 0, whose split between inside and outside is fixed by the removed image mean."""
    w = np.clip(np.median(inner, axis=0) / np.maximum(np.median(outer, axis=0), 1e-30) - 1.0, 0.0, None)
    w[0] = 0.0
    return w


def contrast_scores(inner: np.ndarray, outer: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """(n,) log(sum w P_in / sum w P_out)."""
    return np.log(np.maximum(inner @ weights, 1e-30) / np.maximum(outer @ weights, 1e-30))


def noise_images(spectrum: np.ndarray, box: int, n: int, rng) -> np.ndarray:
    """(n, box, box) Gaussian noise whose radial power per shell follows `spectrum` (S,)."""
    amplitude = np.sqrt(spectrum[radial_shells(box)])
    white = np.fft.rfft2(rng.standard_normal((n, box, box)))
    return np.fft.irfft2(white * amplitude, s=(box, box))


def null_scores(background: np.ndarray, weights: np.ndarray, box: int, radius_px: float, n: int, seed: int) -> np.ndarray:
    """(n,) scores of noise-only picks with the radial power spectrum `background` (S,)."""
    noise = noise_images(background, box, n, np.random.default_rng(seed))
    return contrast_scores(*shell_powers(noise, radius_px), weights)


def particle_score_model(scores: np.ndarray, null: np.ndarray, pi0: float) -> tuple[float, float, float]:
    """(pi0, mu, sd): the mixture pi0 f0 + (1 - pi0) N(mu, sd) fitted to scores (n,) by EM, f0
    the density of the null scores (a histogram), started from Storey's pi0."""
    density, edges = np.histogram(null, bins=NULL_DENSITY_BINS, density=True)
    f0 = np.interp(scores, 0.5 * (edges[1:] + edges[:-1]), density, left=0.0, right=0.0)
    pi0 = float(np.clip(pi0, 0.01, 0.99))
    mu, sd = float(np.median(scores)), float(np.std(scores)) + 1e-12
    for _ in range(MIXTURE_ITERATIONS):
        f1 = np.exp(-0.5 * ((scores - mu) / sd) ** 2) / (sd * np.sqrt(2 * np.pi))
        noise = pi0 * f0 / np.maximum(pi0 * f0 + (1 - pi0) * f1, 1e-300)
        pi0 = float(np.clip(noise.mean(), 0.0, 1.0 - 1e-6))
        w = 1.0 - noise
        mu = float((w * scores).sum() / max(w.sum(), 1e-12))
        sd = float(np.sqrt((w * (scores - mu) ** 2).sum() / max(w.sum(), 1e-12))) + 1e-12
    return pi0, mu, sd


def normal_cdf(x: np.ndarray, mu: float, sd: float) -> np.ndarray:
    """The normal CDF of N(mu, sd) at x."""
    return ndtr((np.asarray(x, dtype=np.float64) - mu) / sd)


def noise_cut(scores: np.ndarray, null: np.ndarray, max_good_loss: float,
              particle_model: bool = False) -> tuple[float, float, float]:
    """(threshold, pi0, estimated loss at the threshold): the highest score cut at which the
    estimated loss of picks that are not noise stays within `max_good_loss` (fraction) and at
    least MIN_NOISE_SHARE of the picks below the cut are estimated noise-like (pi0 F0(t) >= 0.5
    F(t): a stack without noise-like picks loses none), and Storey's noise-like fraction pi0.
    particle_model: the loss is the larger of Storey's estimate and the fitted normal model's
    (module docstring, step 6)."""
    null = np.sort(null)
    pi0 = min(1.0, float(np.mean(scores < np.quantile(null, NULL_TAIL_QUANTILE))) / NULL_TAIL_QUANTILE)
    if pi0 >= 1.0:
        return -np.inf, pi0, 0.0
    sorted_scores = np.sort(scores)
    candidates = sorted_scores[sorted_scores <= np.quantile(null, NULL_MAX_QUANTILE)]
    below_all = np.searchsorted(sorted_scores, candidates, side="left") / len(scores)
    below_null = np.searchsorted(null, candidates, side="left") / len(null)
    loss = (below_all - pi0 * below_null) / (1.0 - pi0)
    if particle_model and len(candidates):
        _, mu, sd = particle_score_model(scores, null, pi0)
        loss = np.maximum(loss, normal_cdf(candidates, mu, sd))
    mostly_noise = pi0 * below_null >= MIN_NOISE_SHARE * below_all
    within = np.flatnonzero((loss <= max_good_loss) & mostly_noise)
    if not len(within):
        return -np.inf, pi0, 0.0
    return float(candidates[within[-1]]), pi0, float(loss[within[-1]])


def pick_contrast(images, radius_px: float | None, max_good_loss: float, seed: int = 0, batch: int = 1024,
                  particle_model: bool = False) -> PickContrast:
    """Score every pick of `images` (n, D, D) array-like and flag the noise-like ones (module
    docstring); radius_px: the particle radius (None or <= 0: BACKGROUND_RADIUS_FRACTION x box);
    particle_model: bound the loss by the fitted model of the particles' scores as well (step 6)."""
    box = images.shape[-1]
    radius_px = radius_px if radius_px and radius_px > 0 else BACKGROUND_RADIUS_FRACTION * box
    inner, outer = shell_powers(images, radius_px, batch)
    weights = band_weights(inner, outer)
    scores = contrast_scores(inner, outer, weights)
    none = np.zeros(len(scores), dtype=bool)
    if len(scores) < MIN_PICKS or not weights.any() or max_good_loss <= 0:
        if len(scores) >= MIN_PICKS and not weights.any():
            log.warning("pick contrast: no Fourier shell holds more power inside the particle radius "
                        "than around it; no pick is screened as noise-like")
        return PickContrast(scores, none, -np.inf, float("nan"), weights)
    null = null_scores(np.median(outer, axis=0), weights, box, radius_px, max(len(scores), 2000), seed)
    threshold, pi0, loss = noise_cut(scores, null, max_good_loss, particle_model)
    return PickContrast(scores, scores < threshold, threshold, pi0, weights, loss)

"""Class averages and per-class quality: reference-free in-plane alignment within each class
(polar cross-correlation from `align`), CTF-aware (Wiener) averaging of the ORIGINAL images at
the input box and pixel size, Fourier ring correlation of half-set averages.

Pose convention (as `align`): image ≈ shift_by(s) ∘ rotate_by(a) (class average), angle a in
degrees as `imageops.rotate` takes it, shift s = (dx, dy) px. This equals RELION's in-plane
convention with rlnAnglePsi = a and rlnOrigin{X,Y} = -s (see `relion_pose`).

Wiener average of class j (per Fourier component k, in the class frame):

    A_j(k) = sum_i CTF_i(k) X_i(k) / (sum_i CTF_i(k)^2 + 1/snr)

with X_i the particle brought into the class frame and CTF_i its CTF rotated with it
(astigmatism angle + a_i); `snr` is the assumed per-component SNR of one image
(config export.wiener_snr).
"""
from __future__ import annotations

import dataclasses
import logging

import numpy as np
import pandas as pd
import torch

from clcluster.em.align import PolarCache, PolarGrid, align_all, class_polar_means, polar_transform, to_reference_frame
from clcluster.image.ctf import CTF_LABELS, CTFParams, ctf_2d, ctf_states, to_ctf_weighted
from clcluster.image.imageops import (BACKGROUND_RADIUS_FRACTION, circular_mask, fourier_shift, normalise_background,
                                      radial_shells, radius_grid)
from clcluster.io.mrc import read_images
from clcluster.core.rng import HALF_SETS_OFFSET

log = logging.getLogger(__name__)


# ---- alignment within each class ---------------------------------------------------------------
def aligned_means(images, labels: np.ndarray, k: int, angle_deg=None, shift_px=None, batch: int = 1024) -> np.ndarray:
    """Plain class means (k, box, box) of images (n, box, box) (array-like, read in batches),
    each particle brought into its class frame first when a pose is given."""
    box = images.shape[-1]
    labels = np.asarray(labels)
    sums = np.zeros((k, box, box), np.float64)
    for s in range(0, len(labels), batch):
        x = np.asarray(images[s:s + batch], dtype=np.float32)
        if angle_deg is not None:
            x = to_reference_frame(x, angle_deg[s:s + batch], shift_px[s:s + batch])
        np.add.at(sums, labels[s:s + batch], x)
    counts = np.bincount(labels, minlength=k)
    return (sums / np.maximum(counts, 1)[:, None, None]).astype(np.float32)


@dataclasses.dataclass
class ClassPoses:
    angle_deg: np.ndarray  # (n,) a of the pose, degrees
    shift_px: np.ndarray  # (n, 2) s of the pose, px of the images aligned (working box)
    score: np.ndarray  # (n,) NCC with the class average
    history: list  # mean NCC per iteration


# images whose radial power spectrum estimates the noise spectrum for `whiten` (at low SNR the
# spectrum of the images is mostly that of the noise)
SPECTRUM_IMAGES = 2000


def whitening_filter(images, n_images: int = SPECTRUM_IMAGES, batch: int = 1024) -> np.ndarray:
    """rFFT filter (box, box//2+1) float32 that whitens images (n, box, box): 1/sqrt of the radial
    power spectrum of the first n_images (mostly noise at low SNR), normalised to mean 1 over the
    coefficients, DC set to 0."""
    box = images.shape[-1]
    shell = radial_shells(box)
    sums = np.zeros(box // 2 + 1)
    count = 0
    for s in range(0, min(len(images), n_images), batch):
        x = np.asarray(images[s:min(s + batch, n_images)], dtype=np.float32)
        sums += np.bincount(shell.ravel(), weights=(np.abs(np.fft.rfft2(x)) ** 2).sum(0).ravel(), minlength=box // 2 + 1)
        count += len(x)
    spec = sums / np.maximum(np.bincount(shell.ravel(), minlength=box // 2 + 1) * max(count, 1), 1)
    filt = 1.0 / np.sqrt(np.maximum(spec[shell], 1e-12 * spec.max()))
    filt[0, 0] = 0.0
    return (filt / filt.mean()).astype(np.float32)


class FilteredImages:
    """Read-only view of images (n, D, D) (array-like) with a Fourier filter (D, D//2+1) applied
    slice by slice, so that memory stays one slice."""

    def __init__(self, images, filt: np.ndarray):
        self.images, self.filt = images, filt
        self.shape = tuple(images.shape)

    def __len__(self):
        return self.shape[0]

    def __getitem__(self, rows):
        x = np.asarray(self.images[rows], dtype=np.float32)
        return np.fft.irfft2(np.fft.rfft2(x) * self.filt, s=x.shape[-2:]).astype(np.float32)


def recentre(refs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each image (k, D, D) shifted so that the centre of mass of its part above its median lies
    at the box centre (D//2, D//2). -> (recentred images, shifts applied (k, 2) px (dx, dy))."""
    box = refs.shape[-1]
    y, x = np.mgrid[:box, :box] - box // 2
    p = np.clip(refs - np.median(refs, axis=(-2, -1), keepdims=True), 0, None)
    m = p.sum(axis=(-2, -1)) + 1e-12
    c = np.stack([(p * x).sum(axis=(-2, -1)) / m, (p * y).sum(axis=(-2, -1)) / m], axis=-1)
    c = np.clip(c, -box / 4, box / 4)
    return fourier_shift(refs, -c).astype(np.float32), -c


def alignment_grid(box: int, n_angles: int, max_shift_px: int) -> PolarGrid:
    """The polar grid of the alignment against class averages: n_angles rotation steps, integer
    shifts within max_shift_px px, radii out to box//2 - 2 - max_shift_px px (at least 8)."""
    return PolarGrid(box, n_radii=max(8, box // 2 - 2 - max_shift_px), n_angles=n_angles, max_shift=max_shift_px)


def centred_polar(means: np.ndarray, cache: PolarCache) -> torch.Tensor:
    """Polar references (K, R, A) of Cartesian class averages (K, D, D), sampled about the box
    centre on the grid of `cache` (the unshifted one of its offsets)."""
    centre_offset = int(np.argmin(np.abs(cache.pg.offsets).sum(1)))
    return polar_transform(torch.as_tensor(means, device=cache.device), cache.pg, cache.grid)[:, centre_offset]


def refine_class_poses(images, labels: np.ndarray, k: int, angle_deg=None, shift_px=None, iterations: int = 4,
                       n_angles: int = 128, max_shift_px: int = 2, device: str = "cpu", batch_size: int = 512,
                       seed: int = 0, cache_mb: float = 1000, whiten: bool = False, centre: bool = False,
                       mask_radius: float = 0.0, starts: int = 1) -> ClassPoses:
    """Reference-free alignment of every particle to its own class's running average.

    Starts from the given pose (average of the particles brought into their frames) or, without
    one, from the rotationally averaged class mean (which fixes only the centre; a faint random
    perturbation breaks the rotational symmetry). Each iteration aligns every particle over all
    n_angles rotations and integer shifts within max_shift_px against its class average (one FFT
    along the polar angle, `align.align_all` with the class as the only candidate), then rebuilds
    the averages from the aligned particles. The particles' polar transforms are kept in memory
    up to cache_mb MB, else recomputed each iteration (memory: one batch).

    Options (off by default; each rebuilds the averages as Cartesian images of the aligned
    particles every iteration): `whiten` aligns images divided by the square root of their radial
    power spectrum (`whitening_filter`: at low SNR the noise's, so that low-frequency noise does
    not dominate the correlation; the poses apply to the unfiltered images); `centre` shifts each
    average so that its centre of mass lies at the box centre (`recentre`), so that a class does
    not drift off-centre; `mask_radius` > 0 multiplies each average by a soft circular mask of
    that radius (fraction of the box; raised-cosine edge 0.1 box wide outside it). `starts` > 1
    (without a given pose): that many runs from differently perturbed rotational averages (seeds
    seed, seed+1, ...); each class keeps the run whose mean NCC over its members is highest
    (`history` is then that of the first run)."""
    labels = np.asarray(labels, dtype=np.int64)
    if starts > 1 and angle_deg is None:
        runs = [refine_class_poses(images, labels, k, None, None, iterations, n_angles, max_shift_px, device, batch_size,
                                   seed + r, cache_mb, whiten, centre, mask_radius) for r in range(starts)]
        return best_run_per_class(runs, labels, k)
    box = images.shape[-1]
    cartesian = whiten or centre or mask_radius > 0
    if whiten:
        images = FilteredImages(images, whitening_filter(images))
    pg = alignment_grid(box, n_angles, max_shift_px)
    cache = PolarCache(images, pg, device=device, batch_size=batch_size, max_bytes=cache_mb * 1e6)
    mask = circular_mask(box, mask_radius * box, soft_edge=0.1 * box) if mask_radius > 0 else None

    def polar_refs(a, s):
        means = aligned_means(images, labels, k, a, s, batch_size)
        if centre:
            means, _ = recentre(means)
        if mask is not None:
            means = means * mask
        return centred_polar(means, cache)

    if angle_deg is not None:
        refs = polar_refs(angle_deg, shift_px)
    else:
        refs = _rotational_start(cache, labels, k, seed)
    candidates = labels[:, None]
    history = []
    res = None
    for it in range(max(1, iterations)):
        res, new_refs, _ = align_all(cache, refs, candidates, accumulate=not cartesian)
        history.append(float(res.score.mean()))
        log.info("class-average alignment iteration %d: mean NCC with own class %.4f", it + 1, history[-1])
        refs = polar_refs(res.angle_deg, res.shift_px) if cartesian and it + 1 < iterations else new_refs
    return ClassPoses(res.angle_deg.astype(np.float64), res.shift_px.astype(np.float64), res.score, history)


@dataclasses.dataclass
class Rescue:
    kept: np.ndarray  # (n,) bool: in a selected class, or rescued from a junk-suggested one
    matched_class: np.ndarray  # (n,) 0-based selected class each particle matches best (-1: not compared)
    score: np.ndarray  # (n,) NCC with that class's average (NaN: not compared)
    threshold: float  # NCC a rescued particle reached at least


def rescue_particles(images, labels: np.ndarray, selected: np.ndarray, angle_deg, shift_px, quantile: float,
                     n_angles: int = 128, max_shift_px: int = 2, device: str = "cpu", batch_size: int = 512,
                     cache_mb: float = 1000) -> Rescue:
    """Particles of junk-suggested classes that look like a selected class.

    A junk class collects what fits no view (empty ice, carbon edges, blobs) but also good
    particles that fitted no class well. Every particle (n, D, D working box) is aligned (all
    n_angles rotations, integer shifts within max_shift_px) to the aligned means of the selected
    classes (selected (K,) bool; poses angle_deg (n,) degrees, shift_px (n, 2) px in the class
    frame); a particle of a junk class is rescued when its best NCC reaches the `quantile` of the
    selected classes' own members' best NCC (so at most about that fraction of the kept members
    would fail the same test). quantile <= 0, no selected class or no junk class: nothing rescued."""
    labels = np.asarray(labels, dtype=np.int64)
    selected = np.asarray(selected, dtype=bool)
    member = selected[labels]
    n = len(labels)
    none = Rescue(member.copy(), np.full(n, -1), np.full(n, np.nan), float("nan"))
    if quantile <= 0 or not selected.any() or member.all():
        return none
    box = images.shape[-1]
    sel = np.flatnonzero(selected)
    means = aligned_means(images, labels, len(selected), angle_deg, shift_px, batch_size)[sel]
    cache = PolarCache(images, alignment_grid(box, n_angles, max_shift_px), device=device, batch_size=batch_size,
                       max_bytes=cache_mb * 1e6)
    refs = centred_polar(means, cache)
    res, _, _ = align_all(cache, refs, None, accumulate=False)
    threshold = float(np.quantile(res.score[member], quantile))
    kept = member | (res.score >= threshold)
    log.info("rescued %d of %d particles of junk-suggested classes (NCC with a selected class >= %.4f, the %g "
             "quantile of the selected members')", int((kept & ~member).sum()), int((~member).sum()), threshold, quantile)
    return Rescue(kept, sel[res.labels], res.score.astype(np.float64), threshold)


def _rotational_start(cache: PolarCache, labels: np.ndarray, k: int, seed: int) -> torch.Tensor:
    """Starting polar references (K, R, A): each class's rotationally averaged polar mean plus
    a faint random perturbation (5 % of its std; seeded) that breaks the rotational symmetry."""
    refs = class_polar_means(cache, labels, k).mean(dim=-1, keepdim=True).expand(-1, -1, cache.pg.n_angles).clone()
    g = torch.Generator().manual_seed(seed)
    return refs + 0.05 * refs.std() * torch.randn(refs.shape, generator=g).to(refs.device)


def best_run_per_class(runs: list[ClassPoses], labels: np.ndarray, k: int) -> ClassPoses:
    """The poses of each class from the run whose mean NCC over the class's members is highest
    (labels (n,) 0-based; `history` of the first run)."""
    counts = np.maximum(np.bincount(labels, minlength=k), 1)
    mean_score = np.stack([np.bincount(labels, weights=cp.score, minlength=k) / counts for cp in runs])
    pick = mean_score.argmax(axis=0)[labels]  # (n,) run kept for each particle's class
    rows = np.arange(len(labels))
    return ClassPoses(np.stack([cp.angle_deg for cp in runs])[pick, rows],
                      np.stack([cp.shift_px for cp in runs])[pick, rows],
                      np.stack([cp.score for cp in runs])[pick, rows], runs[0].history)


def relion_pose(angle_deg, shift_px, apix_A: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rlnAnglePsi [deg, in (-180, 180]], rlnOriginXAngst, rlnOriginYAngst) of poses (a, s)
    whose shifts are px at apix_A Å/px.

    RELION (Conventions, `Projector::rotate2D`): the observation is the reference rotated by
    psi (output pixel p samples the reference at A(psi)^T p, the same map as imageops.rotate
    by a), and the origin offsets shift the observation into the reference frame (relion_
    reconstruct shifts each image by +origin before back-projection; re-centring picks is
    coordinate - origin). Our pose moves the reference by +s, so origin = -s."""
    psi = (np.asarray(angle_deg, dtype=np.float64) + 180.0) % 360.0 - 180.0
    psi[psi == -180.0] = 180.0
    s = np.asarray(shift_px, dtype=np.float64).reshape(-1, 2) * apix_A
    return psi, -s[:, 0], -s[:, 1]


# ---- CTF-aware averaging of the original images -----------------------------------------------------
def has_ctf(table) -> bool:
    return all(table.column(c) is not None for c in CTF_LABELS)


@dataclasses.dataclass
class WienerAverages:
    full: np.ndarray  # (k, box, box) float32
    halves: np.ndarray  # (2, k, box, box) float32
    apix: float
    counts: np.ndarray  # (k,)


def _average_pixel_size(table) -> float:
    """The median pixel size (Å/px) of the particles (a warning when they differ)."""
    apix_all = table.pixel_size()
    apix = float(np.median(apix_all))
    if not np.allclose(apix_all, apix, rtol=1e-3):
        log.warning("particles have several pixel sizes (%s Å/px); averaging at %.4f Å/px",
                    np.unique(apix_all)[:5], apix)
    return apix


def _ctf_weighted(x: np.ndarray, p: CTFParams | None, states, angle_deg: np.ndarray, apix: float):
    """(images x CTF (n, D, D), CTF^2 in the class frame (n, D, D//2+1)) of a batch of
    normalised images x: the CTF applied to bring every input state to CTF x raw image, and the
    CTF rotated with the particle (astigmatism angle + angle_deg, degrees). Without CTF
    parameters p: x unchanged and CTF^2 = 1."""
    box = x.shape[-1]
    if p is None:
        return x, np.ones((len(x), box, box // 2 + 1))
    c = to_ctf_weighted(ctf_2d(p, box, apix), states)  # CTF x raw image, whatever the input state
    x = np.fft.irfft2(np.fft.rfft2(x) * c, s=(box, box)).astype(np.float32)
    # the CTF seen in the class frame: rotated with the particle (astigmatism angle + a)
    p_ref = dataclasses.replace(p, defocus_angle=np.asarray(p.defocus_angle, dtype=np.float64) + angle_deg)
    return x, ctf_2d(p_ref, box, apix).astype(np.float64) ** 2


def _wiener_solve(num: np.ndarray, den: np.ndarray, k: int, snr: float, apix: float, labels: np.ndarray) -> WienerAverages:
    """Averages sum CTF_i X_i / (sum CTF_i^2 + 1/snr) from the sums num, den (2K, D, D//2+1)
    of the two half sets (rows half x K + class)."""
    box = num.shape[1]
    reg = 1.0 / snr
    num = num.reshape(2, k, box, box // 2 + 1)
    den = den.reshape(2, k, box, box // 2 + 1)
    full = np.fft.irfft2(num.sum(0) / (den.sum(0) + reg), s=(box, box)).astype(np.float32)
    hv = np.fft.irfft2(num / (den + reg), s=(box, box)).astype(np.float32)
    return WienerAverages(full, hv, apix, np.bincount(labels, minlength=k))


def wiener_class_averages(table, labels: np.ndarray, k: int, angle_deg, shift_px, *, snr: float = 1.0,
                          halves: np.ndarray | None = None, batch_size: int = 256, ctf: bool = True) -> WienerAverages:
    """CTF-aware class averages from the particles' ORIGINAL images (read through
    `io.mrc.read_images`, batch by batch, grouped by stack), at their box and pixel size.

    angle_deg (n,), shift_px (n, 2): poses in px of THESE images. halves (n,) in {0, 1}: half
    set of each particle (the full average uses both). Images are normalised as RELION does
    (background outside 0.375 x box: mean 0, std 1). Without CTF columns (or ctf=False) the
    CTF is taken as 1 (plain aligned means, regularised the same way).

    Images already corrected (the optics groups' `_rlnCtfDataArePhaseFlipped` /
    `_rlnCtfDataAreCtfPremultiplied`, see `ctf.ctf_states`) are brought to CTF x raw image by
    |CTF| (phase flipped) or left as they are (premultiplied) instead of x CTF, so every
    particle enters the numerator as CTF_i X_i and the denominator as CTF_i^2 (RELION's CTF^2
    weighting of premultiplied data)."""
    labels = np.asarray(labels, dtype=np.int64)
    n = len(labels)
    halves = np.zeros(n, np.int64) if halves is None else np.asarray(halves, dtype=np.int64)
    apix = _average_pixel_size(table)
    params = CTFParams.from_table(table) if (ctf and has_ctf(table)) else None
    states = ctf_states(table)
    paths, idx = table.image_refs()
    whole = table.whole_file_rows()
    names = table.particles["rlnImageName"].astype(str).to_numpy() if "rlnImageName" in table.particles else None
    num = den = None
    for s in range(0, n, batch_size):
        rows = np.arange(s, min(n, s + batch_size))
        x = read_images([paths[i] for i in rows], idx[rows], None if names is None else names[rows], whole[rows])
        box = x.shape[-1]
        if num is None:
            num = np.zeros((2 * k, box, box // 2 + 1), np.complex128)
            den = np.zeros((2 * k, box, box // 2 + 1), np.float64)
        x = normalise_background(x, BACKGROUND_RADIUS_FRACTION * box)
        a = np.asarray(angle_deg, dtype=np.float64)[rows]
        x, c2 = _ctf_weighted(x, None if params is None else params.subset(rows), states[rows], a, apix)
        f = np.fft.rfft2(to_reference_frame(x, a, np.asarray(shift_px, dtype=np.float64)[rows]))
        key = halves[rows] * k + labels[rows]
        for j in np.unique(key):
            sel = key == j
            num[j] += f[sel].sum(axis=0)
            den[j] += c2[sel].sum(axis=0)
    if num is None:
        raise ValueError("no particles to average")
    return _wiener_solve(num, den, k, snr, apix, labels)


# ---- resolution -------------------------------------------------------------------------------------
def frc(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Fourier ring correlation of images a, b (..., D, D): (..., D//2 + 1), ring r = |k| rounded."""
    box = a.shape[-1]
    fa, fb = np.fft.rfft2(a), np.fft.rfft2(b)
    fy = np.fft.fftfreq(box) * box
    fx = np.fft.rfftfreq(box) * box
    ring = np.rint(np.sqrt(fy[:, None] ** 2 + fx[None, :] ** 2)).astype(np.int64).ravel()
    nr = box // 2 + 1
    keep = ring < nr
    ring = ring[keep]
    lead = a.shape[:-2]
    fa = fa.reshape(lead + (-1,))[..., keep]
    fb = fb.reshape(lead + (-1,))[..., keep]

    def ringsum(v):
        v2 = v.reshape(-1, v.shape[-1])
        out = np.stack([np.bincount(ring, weights=row, minlength=nr) for row in v2])
        return out.reshape(lead + (nr,))

    cross = ringsum((fa * np.conj(fb)).real)
    pa, pb = ringsum(np.abs(fa) ** 2), ringsum(np.abs(fb) ** 2)
    return cross / np.sqrt(np.maximum(pa * pb, 1e-30))


def resolution_from_frc(curve: np.ndarray, box: int, apix: float, threshold: float = 0.143) -> float:
    """Resolution (Å) where the FRC first falls below `threshold`: 1 / (frequency of the last
    ring above it), rings counted from 1 (the DC ring 0 is skipped). Nyquist (2 apix) when it
    never falls; box * apix when ring 1 is already below."""
    c = np.asarray(curve)[1:]
    below = np.flatnonzero(~(c >= threshold))
    last = (below[0] if below.size else len(c))  # number of rings above threshold
    if last == 0:
        return float(box * apix)
    return float(box * apix / last)


def half_set_resolution(halves: np.ndarray, apix: float, threshold: float = 0.143,
                        mask_radius: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(resolution Å (k,), FRC curves (k, D//2+1)) of the half-set averages halves (2, k, D, D),
    each softly masked (radius 0.45 x box, 0.05 x box edge by default)."""
    box = halves.shape[-1]
    r = 0.45 * box if mask_radius is None else mask_radius
    m = circular_mask(box, r - 0.05 * box, soft_edge=0.05 * box)
    curves = frc(halves[0] * m, halves[1] * m)
    res = np.array([resolution_from_frc(c, box, apix, threshold) for c in curves])
    return res, curves


def split_halves(labels: np.ndarray, seed: int = 0) -> np.ndarray:
    """A random half (0 or 1) per particle, balanced within each class."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed + HALF_SETS_OFFSET)
    out = np.zeros(len(labels), np.int64)
    for j in np.unique(labels):
        rows = np.flatnonzero(labels == j)
        perm = rng.permutation(rows)
        out[perm[1::2]] = 1
    return out


# ---- quality and ranking -----------------------------------------------------------------------------
# robust z-scores need a spread: at least this many non-empty classes, and a floor on the spread
# as a fraction of the median class's mean NCC: classes of different views differ by a few per
# cent in how well their members match (more or less structure), which is no sign of junk
MAD_TO_SIGMA = 1.4826  # the MAD of a normal distribution times this is its standard deviation
MIN_CLASSES_FOR_COHERENCE = 5
NOISE_EXCESS_Z = 3.0  # a class holds more noise-like picks than real particles would: binomial z above this
MIN_RELATIVE_SPREAD = 0.05
# energy_concentration: the share of a class average's contrast energy in its most extreme 5 % of
# pixels, and the least spread of its robust z (a fraction of the median class's share): the views
# of one map differ by a third (0.26-0.41 over the 20 classes of a perfect partition of the ribosome,
# where white noise gives 0.28), so only a class far beyond that is an outlier
CONCENTRATION_TOP = 0.05
CONCENTRATION_MIN_RELATIVE_SPREAD = 0.2


def robust_z(values: np.ndarray, counts: np.ndarray, min_relative_spread: float = MIN_RELATIVE_SPREAD) -> np.ndarray:
    """Robust z-score (K,) of a per-class figure against the other classes: (value - median) /
    spread over the non-empty classes with a finite value, spread = 1.4826 MAD but at least
    min_relative_spread x |median| (classes of different views differ by that much anyway); NaN
    for empty classes, and for all when fewer than MIN_CLASSES_FOR_COHERENCE classes count."""
    m = np.asarray(values, dtype=np.float64)
    ok = (np.asarray(counts) > 0) & np.isfinite(m)
    z = np.full(len(m), np.nan)
    if ok.sum() < MIN_CLASSES_FOR_COHERENCE:
        return z
    med = np.median(m[ok])
    spread = max(MAD_TO_SIGMA * np.median(np.abs(m[ok] - med)), min_relative_spread * abs(med), 1e-12)
    z[ok] = (m[ok] - med) / spread
    return z


def noise_excess_z(labels: np.ndarray, k: int, noise_like: np.ndarray, allowance: float) -> np.ndarray:
    """(k,) binomial z of each class's count of noise-like picks (noise_like (n,) bool) against
    the share `allowance` (0..1) that real particles may have; NaN for empty classes."""
    counts = np.bincount(labels, minlength=k).astype(np.float64)
    flagged = np.bincount(labels, weights=np.asarray(noise_like, dtype=np.float64), minlength=k)
    p = float(np.clip(allowance, 1e-3, 0.5))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, (flagged - counts * p) / np.sqrt(counts * p * (1 - p)), np.nan)


def coherence_z(mean_ncc: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """`robust_z` (K,) of each class's mean particle-to-average NCC. A class far below the
    others holds particles that do not resemble their own average: junk gathered in a catch-all
    class (empty ice, carbon edges, blobs), which a half-set FRC ranks high because both halves
    are aligned to the same average."""
    return robust_z(mean_ncc, counts)


def energy_concentration(averages: np.ndarray, radius_px: float, top_fraction: float = CONCENTRATION_TOP) -> np.ndarray:
    """Share (K,) of each class average's contrast energy inside a disc of radius_px pixels about
    the centre (pixels minus their mean inside the disc, squared) carried by its `top_fraction`
    most extreme pixels, for averages (K, D, D). A view of a macromolecule spreads its contrast
    over the particle; a class of ice blobs, gold beads or hot spots puts it into a compact
    spot, and its share stands far above the other classes'."""
    inside = radius_grid(averages.shape[-1]) < radius_px
    v = np.asarray(averages, dtype=np.float64)[:, inside]
    e = np.sort((v - v.mean(1, keepdims=True)) ** 2, axis=1)[:, ::-1]
    top = max(1, int(round(top_fraction * e.shape[1])))
    return e[:, :top].sum(1) / np.maximum(e.sum(1), 1e-300)


def class_quality(labels: np.ndarray, k: int, resolution_A: np.ndarray, distance=None, margin=None, score=None,
                  junk_resolution_A: float = 0.0, min_class_fraction: float = 0.01, select=None,
                  min_coherence_z: float | None = None, concentration=None,
                  max_concentration_z: float | None = None, noise_like=None,
                  noise_allowance: float = 0.05) -> pd.DataFrame:
    """One row per class (1-based `class`): size, fraction, resolution (Å), mean particle-to-
    centroid distance and margin, mean NCC with the average; `rank` (1 = best: finest
    resolution, then largest), automatic `suggestion` (junk when smaller than
    min_class_fraction of the particles or, with junk_resolution_A > 0, coarser than that;
    else good) and
    `selected` (the user's list `select` when given, else the suggestion; never empty: the best
    ranked class is kept when nothing else is). `coherence_z`: `coherence_z` of the mean NCC; with
    `min_coherence_z` (a number, e.g. -3) classes below it are also suggested as junk; where the
    picks' noise-like flags `noise_like` (n,) bool are given, only those of them that also hold
    more noise-like picks than real particles would (`noise_excess_z` > NOISE_EXCESS_Z, a binomial
    z against the share `noise_allowance` that the pick screen may take of real particles): a
    class of weak particles resembles its blurred average poorly too, but its picks are not
    noise-like.
    `concentration_z`: `robust_z` of the averages' `energy_concentration` (K,) where given (spread
    at least CONCENTRATION_MIN_RELATIVE_SPREAD of the median); with
    `max_concentration_z` (e.g. 3) classes above it (a compact spot: ice, beads) are suggested as
    junk too."""
    labels = np.asarray(labels)
    n = max(len(labels), 1)
    counts = np.bincount(labels, minlength=k)

    def per_class(v):
        if v is None:
            return np.full(k, np.nan)
        v = np.asarray(v, dtype=np.float64)
        s = np.bincount(labels, weights=v, minlength=k)
        return np.where(counts > 0, s / np.maximum(counts, 1), np.nan)

    q = pd.DataFrame({
        "class": np.arange(1, k + 1), "particles": counts, "fraction": counts / n,
        "resolution_A": np.asarray(resolution_A, dtype=np.float64),
        "mean_distance": per_class(distance), "mean_margin": per_class(margin), "mean_ncc": per_class(score),
    })
    res_key = np.where(counts > 0, q["resolution_A"].fillna(np.inf), np.inf)
    order = np.lexsort((-counts, res_key))
    rank = np.empty(k, np.int64)
    rank[order] = np.arange(1, k + 1)
    q["rank"] = rank
    q["coherence_z"] = coherence_z(q["mean_ncc"].to_numpy(), counts)
    junk = (q["fraction"] < min_class_fraction) | (counts == 0)
    if junk_resolution_A > 0:
        junk |= q["resolution_A"].fillna(np.inf) > junk_resolution_A
    if min_coherence_z is not None:
        incoherent = q["coherence_z"].fillna(np.inf).to_numpy() < min_coherence_z
        if noise_like is not None:
            q["noise_excess_z"] = noise_excess_z(labels, k, noise_like, noise_allowance)
            incoherent &= q["noise_excess_z"].to_numpy() > NOISE_EXCESS_Z
        junk |= incoherent
    if concentration is not None:
        q["concentration_z"] = robust_z(concentration, counts, CONCENTRATION_MIN_RELATIVE_SPREAD)
        if max_concentration_z is not None:
            junk |= q["concentration_z"].fillna(-np.inf).to_numpy() > max_concentration_z
    q["suggestion"] = np.where(junk, "junk", "good")
    if select:
        bad = [c for c in select if not 1 <= int(c) <= k]
        if bad:
            raise ValueError(f"export.select names classes {bad} outside 1..{k}")
        q["selected"] = q["class"].isin([int(c) for c in select])
    else:
        q["selected"] = ~junk
    if not q["selected"].any() and counts.any():
        best = int(order[0])
        log.warning("no class passes the automatic selection (fraction >= %g, resolution <= %g Å where > 0, coherence "
                    "z >= %s, concentration z <= %s); keeping the best-ranked class %d only", min_class_fraction,
                    junk_resolution_A, min_coherence_z, max_concentration_z, best + 1)
        q.loc[best, "selected"] = True
    return q

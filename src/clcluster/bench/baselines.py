"""Baselines for the accuracy benchmark: PCA + K-means on pixels, rotation-invariant features
(no alignment) + clustering, and an oracle that matches each image to the true clean
projections (the ceiling at a given SNR).

All take preprocessed images (n, D, D) (phase-flipped, Fourier-cropped, normalised) and return
integer labels (n,). Pixels and degrees as in `imageops`.
"""
from __future__ import annotations

import numpy as np
import torch
from sklearn.cluster import KMeans, SpectralClustering
from sklearn.decomposition import PCA

from clcluster.image.imageops import polar_resample
# The rotation/shift scan is shared with ML2D (one implementation); it belongs in a layer-2
# `align` module once that exists, so that this step no longer imports another step.
from clcluster.em.align import PolarScanner

__all__ = ["pca_kmeans", "invariant_features", "invariant_kmeans", "oracle_labels"]


def pca_kmeans(images, k: int, n_components: int = 50, seed: int = 0) -> np.ndarray:
    """K-means (k-means++, 10 inits) on the first `n_components` principal components of the raw
    pixels of images (n, D, D). Not rotation invariant: the classic weak baseline. -> (n,) labels."""
    x = np.asarray(images, dtype=np.float32).reshape(len(images), -1)
    nc = int(min(n_components, x.shape[0], x.shape[1]))
    z = PCA(nc, random_state=seed).fit_transform(x)
    return KMeans(k, n_init=10, random_state=seed).fit_predict(z).astype(np.int64)


def invariant_features(images, n_radii: int = 12, n_angles: int = 64, r_max: float | None = None,
                       max_freq: int = 8, cross_freq: int = 4) -> np.ndarray:
    """Rotation-invariant features (n, f) of images (n, D, D), computed without alignment.

    Each image is resampled to polar coordinates (n_radii radii from 1 px to r_max px, default
    0.3 D, i.e. 10 px at D = 32, x n_angles angles) and Fourier-transformed along the angle: P(rho, m). An in-plane
    rotation by phi multiplies P(rho, m) by exp(-i m phi), so these are invariant:
      - ring means P(rho, 0) and magnitudes |P(rho, m)| for 1 <= m < max_freq;
      - cross-radius products P(rho1, m) conj(P(rho2, m)) (real and imaginary parts) for all
        radius pairs and 1 <= m <= cross_freq, which keep the relative angular phase between rings
        (what plain magnitudes lose), signed-square-rooted to the scale of magnitudes.
    Shifts are not removed (small shifts only perturb the features). Each block is scaled to unit
    total variance."""
    x = np.asarray(images, dtype=np.float32)
    n, box = x.shape[0], x.shape[-1]
    r_max = round(0.3 * box) if r_max is None else r_max
    p = polar_resample(x, n_radii, n_angles, r_min=1.0, r_max=r_max)  # (n, Nr, Na)
    w = np.linspace(1.0, r_max, n_radii, dtype=np.float32)[None, :, None]  # ring circumference weight
    f = np.fft.rfft(p, axis=-1) * np.sqrt(w) / n_angles
    mf = min(max_freq, f.shape[-1])
    blocks = [f[:, :, 0].real, np.abs(f[:, :, 1:mf]).reshape(n, -1)]
    i1, i2 = np.triu_indices(n_radii, 1)
    cf = min(cross_freq, f.shape[-1] - 1)
    c = f[:, i1, 1:cf + 1] * np.conj(f[:, i2, 1:cf + 1])  # (n, pairs, cf)
    c = np.concatenate([c.real, c.imag], axis=1).reshape(n, -1)
    blocks.append(np.sign(c) * np.sqrt(np.abs(c)))
    out = []
    for b in blocks:
        b = b - b.mean(0)
        out.append(b / max(np.sqrt((b ** 2).sum(1).mean()), 1e-12))
    return np.concatenate(out, axis=1).astype(np.float32)


def invariant_kmeans(images, k: int, seed: int = 0, n_components: int = 30, method: str = "spectral",
                     n_neighbors: int = 10) -> np.ndarray:
    """Alignment-free clustering of images (n, D, D): `invariant_features`, PCA-denoised to
    `n_components`, then spectral clustering on a symmetric k-nearest-neighbour graph
    (method="spectral", n_neighbors) or K-means (method="kmeans"). -> (n,) labels."""
    feats = invariant_features(images)
    nc = int(min(n_components, feats.shape[0], feats.shape[1]))
    z = PCA(nc, whiten=False, random_state=seed).fit_transform(feats)
    if method == "kmeans":
        return KMeans(k, n_init=10, random_state=seed).fit_predict(z).astype(np.int64)
    if method != "spectral":
        raise ValueError(f"method must be 'spectral' or 'kmeans', not {method!r}")
    sc = SpectralClustering(k, affinity="nearest_neighbors", n_neighbors=min(n_neighbors, len(z) - 1),
                            assign_labels="cluster_qr", random_state=seed)
    return sc.fit_predict(z).astype(np.int64)


def oracle_labels(images, references, n_rotations: int = 72, max_shift: float = 3, r_max: float | None = None,
                  score: str = "matched", device="cpu", batch_size: int | None = None) -> np.ndarray:
    """Label of the true reference each image matches best: the ceiling at a given SNR.

    images (n, D, D); references (K, D, D): the clean projections prepared like the images
    (e.g. fourier_crop + normalise_background, no CTF: the images are phase-flipped but still
    carry |CTF|, so references multiplied by a typical |CTF| would match slightly better; kept
    simple). Correlations are taken over a disc of radius r_max px around each shifted centre
    (default D//2 - 1 - ceil(max_shift)) with zero-mean references; score="matched" divides by the
    reference norm only (matched filter: the likelihood-ratio choice under white noise of unknown
    amplitude), score="ncc" also by the zero-mean image window norm (normalised
    cross-correlation). The score is maximised over n_rotations in-plane rotations and integer
    shifts |t| <= max_shift px. -> (n,) labels (index into references)."""
    if score not in ("matched", "ncc"):
        raise ValueError(f"score must be 'matched' or 'ncc', not {score!r}")
    x = torch.as_tensor(np.ascontiguousarray(images, dtype=np.float32))
    n, box = x.shape[0], x.shape[-1]
    kref = len(references)
    scan = PolarScanner(box, n_rotations, max_shift, r_max, device=device)
    w = scan.weights
    qp = scan.polar(torch.as_tensor(np.asarray(references, dtype=np.float32), device=scan.device), centred_only=True)
    qp = qp[:, 0]  # (K, Nr, Na)
    qp = qp - (qp.sum(-1) * w).sum(-1)[:, None, None] / (w.sum() * scan.n_rot)  # weighted zero mean
    qn = torch.sqrt((qp.pow(2).sum(-1) * w).sum(-1))  # (K,)
    wq = scan.weighted_conj(scan.spectrum(qp[:, None]))
    labels = np.empty(n, np.int64)
    for sl in scan.batches(n, kref, batch_size):
        p = scan.polar(x[sl].to(scan.device))  # (b, S, Nr, Na)
        if score == "ncc":
            s1 = (p.sum(-1) * w).sum(-1)
            s2 = (p.pow(2).sum(-1) * w).sum(-1)
            pn = torch.sqrt(torch.clamp(s2 - s1 * s1 / (w.sum() * scan.n_rot), min=1e-12))  # (b, S)
        else:
            pn = torch.ones(p.shape[:2], device=p.device)
        c = scan.correlate(scan.spectrum(p), wq)  # (Na, b*S, K)
        b = sl.stop - sl.start
        c = c.reshape(scan.n_rot, b, scan.n_shifts, kref) / (pn[None, :, :, None] * qn)
        labels[sl] = c.amax(dim=(0, 2)).argmax(1).cpu().numpy()
    return labels

"""Scores of a 2D classification on a realistic simulated stack (see docs/realistic.md).

- view coherence: median angle (degrees) between a good particle's true viewing direction and
  its class's mean direction (the normalised mean of the class's good members' directions);
  the same for K-means on the true directions (a perfect partition into K classes) and for
  random labels, and the normalised score (random - method) / (random - K-means on truth):
  0 = random, 1 = as coherent as the perfect partition.
- selection: the fraction of junk removed and of good particles kept by a class selection,
  overall and per junk kind, and the purity of the kept set.
- fidelity: per class average, the best normalised correlation with clean projections over
  a grid of directions, in-plane rotations and small shifts, both low-passed to a common
  resolution, inside a circular mask; with and without each image's rotational average
  (without it, only the view's detail counts); the size-weighted mean over the good classes
  (classes whose members are mostly good particles, weighted by their number of good members).
"""
from __future__ import annotations

import numpy as np
from sklearn.cluster import KMeans

from clcluster.image.imageops import circular_mask, lowpass, radius_grid, rotate


# ---------------------------------------------------------------------------------------------
# view coherence
def class_mean_directions(dirs: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """(k, 3) normalised mean direction of each label's members (zeros where empty)."""
    s = np.zeros((k, 3))
    np.add.at(s, labels, dirs)
    n = np.linalg.norm(s, axis=1, keepdims=True)
    return np.where(n > 0, s / np.maximum(n, 1e-12), 0.0)


def median_view_angle(dirs: np.ndarray, labels: np.ndarray) -> float:
    """Median angle (degrees) between unit directions dirs (n, 3) and their class's mean
    direction; labels (n,) are any integers."""
    _, lab = np.unique(labels, return_inverse=True)
    means = class_mean_directions(dirs, lab, lab.max() + 1)
    cos = np.clip(np.sum(dirs * means[lab], axis=1), -1, 1)
    return float(np.median(np.degrees(np.arccos(cos))))


def coherence_references(dirs: np.ndarray, k: int, seed: int = 0, repeats: int = 5) -> dict:
    """{"kmeans_truth_deg", "random_deg"}: the median view angle of K-means (k classes) on the
    true directions (best of 4 inits) and of random labels (mean of `repeats` draws)."""
    km = KMeans(k, n_init=4, random_state=seed).fit_predict(dirs)
    rng = np.random.default_rng(seed)
    rand = np.mean([median_view_angle(dirs, rng.integers(0, k, len(dirs))) for _ in range(repeats)])
    return {"kmeans_truth_deg": median_view_angle(dirs, km), "random_deg": float(rand)}


def view_score(method_deg: float, refs: dict) -> float:
    """(random - method) / (random - K-means on truth): 0 random, 1 perfect partition."""
    return float((refs["random_deg"] - method_deg) / max(refs["random_deg"] - refs["kmeans_truth_deg"], 1e-9))


# ---------------------------------------------------------------------------------------------
# selection
def selection_scores(kinds: np.ndarray, kept: np.ndarray, good_kind: str = "particle") -> dict:
    """kinds (n,) truth kind per pick, kept (n,) bool: {"junk_removed", "good_kept",
    "purity_in", "purity_kept", "removed_<kind>" per junk kind} (fractions)."""
    kinds = np.asarray(kinds).astype(str)
    kept = np.asarray(kept, bool)
    good = kinds == good_kind
    out = {"junk_removed": float((~kept[~good]).mean()) if (~good).any() else float("nan"),
           "good_kept": float(kept[good].mean()) if good.any() else float("nan"),
           "purity_in": float(good.mean()),
           "purity_kept": float(good[kept].mean()) if kept.any() else float("nan")}
    for kind in sorted(set(kinds) - {good_kind}):
        out[f"removed_{kind}"] = float((~kept[kinds == kind]).mean())
    return out


# ---------------------------------------------------------------------------------------------
# fidelity
def rotational_average(images: np.ndarray) -> np.ndarray:
    """(n, D, D) images' rotational averages (mean per integer radius, put back on the grid)."""
    box = images.shape[-1]
    r = np.rint(radius_grid(box)).astype(np.int64).ravel()
    cnt = np.bincount(r)
    flat = images.reshape(len(images), -1)
    prof = np.stack([np.bincount(r, weights=row, minlength=len(cnt)) for row in flat]) / np.maximum(cnt, 1)
    return prof[:, r].reshape(images.shape).astype(np.float32)


def _unit_masked(images: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """(n, P) zero-mean (inside the mask), unit-norm masked pixel vectors."""
    m = mask.ravel() > 0
    v = images.reshape(len(images), -1)[:, m] * mask.ravel()[m]
    v = v - v.mean(1, keepdims=True)
    return v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)


def prepare_for_fidelity(images: np.ndarray, apix: float, resolution_A: float, remove_rotavg: bool) -> np.ndarray:
    """Low-pass to resolution_A and, optionally, subtract the rotational average."""
    x = lowpass(np.asarray(images, np.float32), resolution_A, apix)
    return x - rotational_average(x) if remove_rotavg else x


def rotational_average_operator(box: int) -> np.ndarray:
    """(D*D, D*D) matrix M with (flattened image) @ M = its rotational average."""
    r = np.rint(radius_grid(box)).astype(np.int64).ravel()
    same = (r[:, None] == r[None, :]).astype(np.float32)
    return same / same.sum(0, keepdims=True)


def best_correlations(averages: np.ndarray, references: np.ndarray, apix: float, resolution_A: float = 20.0,
                      remove_rotavg: bool = True, n_rotations: int = 72, max_shift_px: int = 2) -> np.ndarray:
    """(k,) best normalised correlation of each average (k, D, D) with any reference (m, D, D)
    over n_rotations in-plane rotations and integer shifts |dx|, |dy| <= max_shift_px, inside a
    soft circular mask of radius 0.4 D, both low-passed to resolution_A; with remove_rotavg,
    each rotated and shifted average and each reference loses its rotational average (about
    the box centre) first. Empty (all-zero) averages get NaN."""
    box = averages.shape[-1]
    mask = circular_mask(box, 0.4 * box, soft_edge=0.05 * box)
    refs = _unit_masked(prepare_for_fidelity(references, apix, resolution_A, remove_rotavg), mask)
    avgs = prepare_for_fidelity(averages, apix, resolution_A, False)
    rot_avg = rotational_average_operator(box) if remove_rotavg else None
    angles = np.arange(n_rotations) * 360.0 / n_rotations
    shifts = [(dy, dx) for dy in range(-max_shift_px, max_shift_px + 1) for dx in range(-max_shift_px, max_shift_px + 1)]
    out = np.full(len(averages), np.nan)
    for j, a in enumerate(avgs):
        if not np.any(averages[j]):
            continue
        rots = rotate(np.repeat(a[None], n_rotations, 0), angles)
        variants = np.concatenate([np.roll(rots, s, axis=(1, 2)) for s in shifts]).reshape(-1, box * box)
        if rot_avg is not None:
            variants = variants - variants @ rot_avg
        out[j] = float((_unit_masked(variants.reshape(-1, box, box), mask) @ refs.T).max())
    return out


def good_class_weights(labels: np.ndarray, good: np.ndarray, k: int) -> np.ndarray:
    """(k,) number of good members of classes whose members are mostly good, else 0."""
    n_good = np.bincount(labels[good], minlength=k)
    n_all = np.bincount(labels, minlength=k)
    return np.where(n_good > 0.5 * n_all, n_good, 0).astype(np.float64)


def weighted_fidelity(corr: np.ndarray, weights: np.ndarray) -> float:
    """Size-weighted mean of per-class correlations over classes with weight > 0."""
    ok = (weights > 0) & np.isfinite(corr)
    return float(np.sum(corr[ok] * weights[ok]) / np.sum(weights[ok])) if ok.any() else float("nan")


def fibonacci_directions(m: int) -> np.ndarray:
    """(m, 3) nearly uniform unit directions on the whole sphere (Fibonacci lattice)."""
    i = np.arange(m) + 0.5
    z = 1 - 2 * i / m
    phi = np.pi * (1 + 5 ** 0.5) * i
    s = np.sqrt(1 - z * z)
    return np.stack([s * np.cos(phi), s * np.sin(phi), z], axis=1)

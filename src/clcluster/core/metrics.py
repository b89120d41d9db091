"""Clustering scores against a ground truth (Hungarian-matched accuracy, ARI, NMI) and between
runs with different seeds (per-class stability, ARI)."""
from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score


def hungarian_accuracy(truth, labels) -> float:
    """Fraction of particles whose label maps to their true class under the best one-to-one
    matching of labels to classes (unmatched labels count as wrong)."""
    truth = np.asarray(truth)
    labels = np.asarray(labels)
    t_vals, t_idx = np.unique(truth, return_inverse=True)
    l_vals, l_idx = np.unique(labels, return_inverse=True)
    counts = np.zeros((len(l_vals), len(t_vals)), dtype=np.int64)
    np.add.at(counts, (l_idx, t_idx), 1)
    rows, cols = linear_sum_assignment(-counts)
    return float(counts[rows, cols].sum() / max(len(truth), 1))


def scores(truth, labels) -> dict:
    """{"accuracy", "ari", "nmi"} of a labelling against the truth."""
    return {"accuracy": hungarian_accuracy(truth, labels),
            "ari": float(adjusted_rand_score(truth, labels)),
            "nmi": float(normalized_mutual_info_score(truth, labels))}


def class_stability(labels_a, labels_b, k: int) -> np.ndarray:
    """How well each class of run A holds together in run B, (k,) float64 in [0, 1]: for class j
    of A (labels 0..k-1), the largest number of its particles that share one label in B, divided
    by its size; NaN for classes with no particles. labels_a, labels_b: (n,) labels of the same
    particles from two runs (B's labels any non-negative integers). 1: the class reappears whole
    (whatever B calls it); 0.5: it is split in two halves; about 1/k: scattered at random."""
    a = np.asarray(labels_a, dtype=np.int64)
    b = np.asarray(labels_b, dtype=np.int64)
    if a.shape != b.shape:
        raise ValueError(f"label arrays of different shapes {a.shape} and {b.shape}")
    if len(a) and (a.min() < 0 or a.max() >= k):
        raise ValueError(f"run A's labels lie outside 0..{k - 1}")
    _, b_idx = np.unique(b, return_inverse=True)
    counts = np.zeros((k, int(b_idx.max()) + 1 if len(b) else 1), dtype=np.int64)
    np.add.at(counts, (a, b_idx.ravel()), 1)
    size = counts.sum(1)
    return np.where(size > 0, counts.max(1) / np.maximum(size, 1), np.nan)


def seed_stability(labels_main, labels_runs, k: int) -> tuple[np.ndarray, float]:
    """Per-class stability of a main run against one or more other runs on the same particles,
    and their agreement: (stability (k,): `class_stability` averaged over the runs (NaN for classes
    without particles), mean adjusted Rand index (scikit-learn) between the main run and each
    run). labels_main (n,); labels_runs: a list of (n,) arrays or a (runs, n) array."""
    runs = [np.asarray(r) for r in labels_runs]
    if not runs:
        raise ValueError("seed_stability needs at least one other run")
    per_run = np.stack([class_stability(labels_main, r, k) for r in runs])
    stability = per_run.mean(0)  # NaN where the class is empty (the same in every run: same labels_main)
    ari = float(np.mean([adjusted_rand_score(labels_main, r) for r in runs]))
    return stability, ari

"""Clustering scores against a ground truth: Hungarian-matched accuracy, ARI, NMI."""
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

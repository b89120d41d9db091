"""Baselines on small, easy synthetic data."""
import numpy as np
import pytest

from clcluster.bench.baselines import invariant_features, invariant_kmeans, oracle_labels, pca_kmeans
from clcluster.image.imageops import rotate
from clcluster.core.metrics import hungarian_accuracy
from conftest import binned_easy_set


@pytest.fixture(scope="module")
def easy():
    return binned_easy_set(5, 0.5, 2)


def test_oracle_finds_true_views(easy):
    img, truth, refs = easy
    labels = oracle_labels(img, refs, n_rotations=36, max_shift=2)
    assert (labels == truth).mean() >= 0.95  # no relabelling: the oracle names the true class


def test_invariant_kmeans_far_above_chance(easy):
    img, truth, _ = easy
    for method in ("spectral", "kmeans"):
        assert hungarian_accuracy(truth, invariant_kmeans(img, 5, seed=0, method=method)) >= 0.45  # chance is about 0.2


def test_invariant_features_are_rotation_invariant(easy):
    img, _, _ = easy
    f0 = invariant_features(img[:20])
    f1 = invariant_features(rotate(img[:20], np.full(20, 90.0)))  # exact on the pixel grid
    assert f0.shape[0] == 20 and f0.ndim == 2
    assert np.allclose(f0, f1, atol=1e-3 * np.abs(f0).max())


def test_pca_kmeans_returns_k_labels(easy):
    img, truth, _ = easy
    labels = pca_kmeans(img, 5, n_components=20, seed=0)
    assert labels.shape == truth.shape and set(np.unique(labels)) == set(range(5))

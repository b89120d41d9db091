import numpy as np

from clcluster.core.metrics import hungarian_accuracy, scores


def test_hungarian_accuracy_is_permutation_invariant():
    t = np.repeat(np.arange(4), 25)
    assert hungarian_accuracy(t, (t + 1) % 4) == 1.0
    rng = np.random.default_rng(0)
    assert hungarian_accuracy(t, rng.permutation(t)) < 0.5
    s = scores(t, t)
    assert s["ari"] == 1.0 and s["nmi"] == 1.0


def test_class_stability_is_one_for_the_same_partition_under_another_naming():
    from clcluster.core.metrics import class_stability, seed_stability

    a = np.repeat(np.arange(4), 10)
    b = (a + 2) % 4  # same partition, other class numbers
    np.testing.assert_array_equal(class_stability(a, b, 4), np.ones(4))
    stab, ari = seed_stability(a, [b, b], 4)
    np.testing.assert_array_equal(stab, np.ones(4))
    assert ari == 1.0


def test_class_stability_of_a_split_class_and_an_empty_class():
    from clcluster.core.metrics import class_stability

    a = np.array([0] * 8 + [1] * 4)
    b = np.array([5] * 4 + [6] * 4 + [7] * 3 + [5])  # class 0 split in two halves; class 1 keeps 3 of 4
    s = class_stability(a, b, 3)  # class 2 has no particles
    np.testing.assert_allclose(s[:2], [0.5, 0.75])
    assert np.isnan(s[2])


def test_seed_stability_averages_over_runs_and_random_labels_score_low():
    from clcluster.core.metrics import seed_stability

    a = np.repeat(np.arange(2), 6)
    same = a.copy()
    halves = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3])  # every class split in two halves
    stab, ari = seed_stability(a, np.stack([same, halves]), 2)
    np.testing.assert_allclose(stab, [0.75, 0.75])
    assert 0 < ari < 1
    rng = np.random.default_rng(0)
    big = np.repeat(np.arange(10), 200)
    stab_r, ari_r = seed_stability(big, [rng.permutation(big)], 10)
    assert np.all(stab_r < 0.2) and abs(ari_r) < 0.02


def test_class_stability_refuses_mismatched_runs():
    import pytest

    from clcluster.core.metrics import class_stability, seed_stability

    with pytest.raises(ValueError):
        class_stability(np.zeros(3, int), np.zeros(4, int), 2)
    with pytest.raises(ValueError):
        class_stability(np.array([0, 2]), np.array([0, 1]), 2)
    with pytest.raises(ValueError):
        seed_stability(np.zeros(3, int), [], 2)

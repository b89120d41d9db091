import numpy as np

from clcluster.core.metrics import hungarian_accuracy, scores


def test_hungarian_accuracy_is_permutation_invariant():
    t = np.repeat(np.arange(4), 25)
    assert hungarian_accuracy(t, (t + 1) % 4) == 1.0
    rng = np.random.default_rng(0)
    assert hungarian_accuracy(t, rng.permutation(t)) < 0.5
    s = scores(t, t)
    assert s["ari"] == 1.0 and s["nmi"] == 1.0

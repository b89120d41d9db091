import numpy as np

from clcluster.augment import AugmentConfig, augment, random_erase, two_views


def test_augmentation_reproducible_under_seed(preprocessed_easy):
    x = preprocessed_easy[:8]
    cfg = AugmentConfig(erase_prob=0.5, ctf_prob=0.5)
    a = augment(x, cfg, np.random.default_rng(1), apix=5.0)
    b = augment(x, cfg, np.random.default_rng(1), apix=5.0)
    c = augment(x, cfg, np.random.default_rng(2), apix=5.0)
    assert np.array_equal(a, b)
    assert not np.allclose(a, c)
    v1, v2 = two_views(x, cfg, np.random.default_rng(3), apix=5.0)
    assert v1.shape == x.shape and not np.allclose(v1, v2)


def test_mirror_off_by_default():
    assert AugmentConfig().mirror_prob == 0.0


def test_random_erase_zeroes_squares():
    x = np.ones((50, 16, 16), np.float32)
    out = random_erase(x, np.random.default_rng(0), prob=1.0, max_frac=0.5)
    assert (out == 0).any() and (out == 1).any()

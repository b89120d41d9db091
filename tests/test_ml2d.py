"""ML2D on small, easy synthetic data: recovery of the views, monotone log-likelihood, pose convention."""
import numpy as np
import pytest

from clcluster.image.imageops import rotate
from clcluster.core.metrics import hungarian_accuracy
from clcluster.em.align import PolarCache, PolarGrid, PolarScanner, align_all, polar_references
from clcluster.em.ml2d import ML2D, SparseSchedule, classify, image_data, ml2d, polish
from conftest import binned_easy_set


@pytest.fixture(scope="module")
def easy():
    return binned_easy_set(4, 1.0, 3)


def test_ml2d_recovers_views(easy):
    img, truth, _ = easy
    res = ml2d(img, 4, n_rotations=36, max_shift=2, n_starts=2, max_iter=15, seed=0)
    assert hungarian_accuracy(truth, res.labels) >= 0.9
    assert res.references.shape == (4, 32, 32) and res.labels.shape == (len(img),)
    assert res.class_probability.shape == (len(img), 4)
    assert np.allclose(res.class_probability.sum(1), 1, atol=1e-4)
    assert abs(res.alpha.sum() - 1) < 1e-6 and res.sigma > 0
    assert res.log_likelihood == max(res.start_log_likelihoods)


def test_classify_with_the_fitted_model_reproduces_the_last_e_step(easy):
    """`classify` (the fitted model held fixed, images read in batches) gives the labels and poses
    of ML2D's own last E-step; particles it never saw are classified as well as those it fitted."""
    img, truth, _ = easy
    fit = np.arange(len(img)) % 2 == 0
    res = ml2d(img[fit], 4, n_rotations=36, max_shift=2, n_starts=2, max_iter=10, seed=0)
    lab, prob, rot, shift = classify(img[fit], res, batch_size=17)
    assert np.array_equal(lab, res.labels)
    assert np.allclose(prob, res.class_probability.max(1), atol=1e-4)
    assert np.allclose(rot, res.rotation_deg) and np.array_equal(shift, res.shift)
    new = classify(img[~fit], res)[0]
    assert hungarian_accuracy(truth[~fit], new) >= 0.9
    # candidates: every class listed reproduces the full E-step; one class listed is that class
    every = classify(img[fit], res, batch_size=17, candidates=np.tile(np.arange(4)[::-1], (int(fit.sum()), 1)))
    assert np.array_equal(every[0], lab) and np.allclose(every[1], prob, atol=1e-4) and np.allclose(every[2], rot)
    one = np.random.default_rng(2).integers(0, 4, (int(fit.sum()), 1))
    lab1, prob1 = classify(img[fit], res, candidates=one)[:2]
    assert np.array_equal(lab1, one[:, 0]) and np.allclose(prob1, 1, atol=1e-5)


def test_ml2d_model_steps_by_hand_are_the_function(easy):
    """The ML2D model object: start, then e_step and m_step by hand, gives ml2d's log-likelihoods,
    labels and poses to the bit."""
    import torch

    img, _, _ = easy
    x = np.ascontiguousarray(img[:80], dtype=np.float32)
    ref0 = x[[0, 30, 60]]
    res = ml2d(x, 3, n_rotations=24, max_shift=1, init_references=ref0, max_iter=3, tol=0)
    scan = PolarScanner(x.shape[-1], 24, 1)
    data = image_data(torch.as_tensor(x), scan, 3, None, None, 1e9)
    model = ML2D(scan, 3, "gaussian", 1).start(ref0, float(data.xx.mean() / data.npix))
    lls = []
    for it in range(4):
        st = model.e_step(data)
        lls.append(st.log_likelihood)
        if it < 3:
            model.m_step(st, data)
    assert lls == res.log_likelihood_history and len(lls) == 4
    assert np.array_equal(st.labels, res.labels)
    assert np.array_equal(scan.rotation_deg(st.rot_i), res.rotation_deg)
    assert np.isclose(model.sigma2, res.sigma ** 2, rtol=1e-12)


def test_ml2d_log_likelihood_never_decreases(easy):
    img, _, _ = easy
    res = ml2d(img[::2], 3, n_rotations=36, max_shift=2, n_starts=1, max_iter=8, tol=0, seed=1)
    h = np.asarray(res.log_likelihood_history)
    assert len(h) == 9
    assert np.all(np.diff(h) >= -1e-6 * np.abs(h[1:]))


def test_ml2d_uniform_prior_and_batches_agree(easy):
    img, _, _ = easy
    a = ml2d(img[:60], 2, n_rotations=24, max_shift=1, n_starts=1, max_iter=3, shift_prior="uniform", batch_size=7)
    b = ml2d(img[:60], 2, n_rotations=24, max_shift=1, n_starts=1, max_iter=3, shift_prior="uniform",
             cache_bytes=0)
    assert np.array_equal(a.labels, b.labels)
    assert np.allclose(a.log_likelihood_history, b.log_likelihood_history, rtol=1e-6)
    assert a.offset_sigma is None


def test_pose_convention(easy):
    """rotate(reference, rotation_deg, shift) reproduces the image."""
    _, _, refs = easy
    ref = refs[:1]
    angles = np.array([0.0, 40.0, 200.0, 310.0])
    shifts = np.array([[0, 0], [1, -2], [-2, 1], [2, 2]], dtype=np.float32)
    imgs = rotate(np.repeat(ref, 4, 0), angles, shifts)
    imgs = imgs + np.random.default_rng(0).normal(0, 0.05, imgs.shape).astype(np.float32)
    res = ml2d(imgs, 1, n_rotations=72, max_shift=3, init_references=ref, max_iter=2)
    d = (res.rotation_deg - angles + 180) % 360 - 180
    assert np.all(np.abs(d) <= 5.0 + 1e-6)
    assert np.array_equal(res.shift, shifts)


def test_polish_mends_a_corrupted_classification(easy):
    """ML2D started from a classification (poses from the true views, 30 % of the labels scrambled)
    ends near the truth; the log-likelihood does not fall from that start. An empty class gets a
    starting reference too."""
    img, truth, refs = easy
    pg = PolarGrid(32, n_angles=64, max_shift=2)
    a = align_all(PolarCache(img, pg), polar_references(refs, pg), truth[:, None], accumulate=False)[0]
    rng = np.random.default_rng(0)
    labels = truth.copy()
    bad = rng.random(len(labels)) < 0.3
    labels[bad] = rng.integers(0, 4, bad.sum())
    assert hungarian_accuracy(truth, labels) < 0.85
    res = polish(img, labels, a.angle_deg, a.shift_px, 4, max_iter=10, n_rotations=64, max_shift=2)
    assert hungarian_accuracy(truth, res.labels) >= 0.95
    h = np.asarray(res.log_likelihood_history)
    assert h[-1] >= h[0]
    labels[labels == 3] = 0  # class 3 empty: it starts from a random subset's average
    res = polish(img, labels, a.angle_deg, a.shift_px, 4, max_iter=2, n_rotations=64, max_shift=2)
    assert res.references.shape == (4, 32, 32) and np.isfinite(res.references).all()


def test_scanner_shift_grid_and_fit():
    s = PolarScanner(32, n_rotations=64, max_shift=3)
    assert s.n_shifts == 29 and s.r_max == 12
    assert np.all((s.shifts ** 2).sum(1) <= 9)
    with pytest.raises(ValueError):
        PolarScanner(16, max_shift=3, r_max=8)


def test_truncated_e_step_matches_the_full_one_and_never_lowers_its_bound(easy):
    """With every class listed as a candidate, the sparse E-step gives ML2D's own results; with
    3 candidates per particle (the true view, a random class, the true view again) it still
    finds the views, a repeated candidate counts once, and its log-likelihood bound never falls."""
    img, truth, refs = easy
    kw = dict(n_rotations=36, max_shift=2, init_references=refs, max_iter=4)
    full = ml2d(img, 4, **kw)
    every = ml2d(img, 4, candidates=np.tile(np.arange(4), (len(img), 1)), **kw)
    assert np.array_equal(full.labels, every.labels)
    assert np.allclose(full.log_likelihood_history, every.log_likelihood_history, rtol=1e-6)
    assert np.allclose(full.class_probability, every.class_probability, atol=1e-4)
    assert np.allclose(full.references, every.references, atol=1e-4)
    rng = np.random.default_rng(1)
    cand = np.stack([truth, rng.integers(0, 4, len(img)), truth], axis=1)
    sparse = ml2d(img, 4, candidates=cand, **dict(kw, max_iter=8))
    assert hungarian_accuracy(truth, sparse.labels) >= 0.95
    assert np.all(np.diff(sparse.log_likelihood_history) >= -1e-6 * abs(sparse.log_likelihood))
    post = sparse.class_probability
    assert np.allclose(post.sum(1), 1, atol=1e-4)
    outside = np.ones_like(post, dtype=bool)
    outside[np.arange(len(img))[:, None], cand] = False
    assert np.all(post[outside] == 0)
    with pytest.raises(ValueError, match="candidates"):
        ml2d(img, 4, candidates=cand + 4, **kw)


def test_sparse_schedule_compares_few_classes_between_full_e_steps_and_ends_with_a_full_one(easy, monkeypatch):
    """A `SparseSchedule` (2 of 4 classes, every 3rd E-step full) from a warm start: the E-steps
    between full ones list each image's 2 most probable classes, the last E-step is a full one
    (its posteriors are those `classify` gives with the fitted model), and the views are found
    as without it."""
    img, truth, _ = easy
    sched = SparseSchedule(classes=2, full_every=3)
    assert sched.applies(4) and not sched.applies(3) and not SparseSchedule(0, 3).applies(8)
    prob = np.array([[0.1, 0.5, 0.3, 0.1], [0.6, 0.0, 0.1, 0.3]])
    assert [sorted(r) for r in sched.candidates(prob, "cpu").tolist()] == [[1, 2], [0, 3]]
    seen = []
    e_step = ML2D.e_step
    monkeypatch.setattr(ML2D, "e_step", lambda self, data: seen.append(data.candidates) or e_step(self, data))
    warm = ml2d(img, 4, n_rotations=36, max_shift=2, n_starts=1, seed=0, max_iter=6).references  # as the refinement hands over
    kw = dict(n_rotations=36, max_shift=2, init_references=warm, max_iter=6, tol=-1.0)
    seen.clear()
    res = ml2d(img, 4, sparse=sched, **kw)
    widths = [None if c is None else c.shape[1] for c in seen]
    assert widths == [None, 2, 2, None, 2, 2, None], widths  # 6 M-steps, the 7th E-step a full one
    assert hungarian_accuracy(truth, res.labels) >= 0.9
    assert np.mean(res.labels == ml2d(img, 4, **kw).labels) >= 0.98  # as the full E-steps find
    assert np.all(res.class_probability > 0)  # every class compared in the last E-step
    lab, p = classify(img, res)[:2]
    assert np.array_equal(lab, res.labels) and np.allclose(p, res.class_probability.max(1), atol=1e-4)
    seen.clear()
    ml2d(img, 4, sparse=sched, **dict(kw, max_iter=4))  # stopping after a sparse E-step adds a full one
    assert [None if c is None else c.shape[1] for c in seen] == [None, 2, 2, None, 2, None]


def test_balanced_prior_counteracts_growth_within_its_bound():
    """A class above its equal share gets a lower prior, one below a higher one, equal shares
    leave the priors as they are, and no prior moves more than BALANCE_MAX_RATIO from 1/K."""
    from clcluster.em.ml2d import BALANCE_MAX_RATIO, balanced_prior

    uniform = np.full(4, 0.25)
    assert np.allclose(balanced_prior(uniform, np.full(4, 25.0), 100), uniform)
    a = balanced_prior(uniform, np.array([70.0, 10, 10, 10]), 100)
    assert a[0] < 0.25 < a[1] and np.isclose(a.sum(), 1) and np.allclose(a[1:], a[1])
    for _ in range(30):  # a class that never gets particles: the prior rises, but only so far
        a = balanced_prior(a, np.array([0.0, 40, 30, 30]), 100)
    ratio = a * 4
    assert ratio.max() / ratio.min() <= BALANCE_MAX_RATIO ** 2 + 1e-6 and a[0] == a.max()


def test_balanced_ml2d_keeps_a_rare_view(easy):
    """Balanced priors push towards equal classes, but a view with a fifth of the others' images
    keeps its own class where the likelihood tells it apart (the prior is bounded), and the views
    are recovered as well as without balance."""
    img, truth, _ = easy
    rng = np.random.default_rng(0)
    keep = (truth != 0) | (rng.random(len(truth)) < 0.2)
    for balance in (False, True):
        res = ml2d(img[keep], 4, n_rotations=36, max_shift=2, n_starts=2, max_iter=40, seed=0, balance=balance)
        assert hungarian_accuracy(truth[keep], res.labels) >= 0.9, balance
    assert res.n_iter < 40  # balanced: stops once fewer than 0.2 % of the labels change

def test_log_evidence_tells_particles_from_noise(easy):
    """The fitted model's log-likelihood ratio against noise alone: clearly positive for the
    particles it was fitted on, lower for noise images of the fitted sigma, and over one listed
    class never above the ratio over all classes."""
    from clcluster.em.ml2d import log_evidence

    img, truth, _ = easy
    res = ml2d(img, 4, n_rotations=36, max_shift=2, n_starts=1, max_iter=10, seed=0)
    every = log_evidence(img, res)
    noise = np.random.default_rng(0).standard_normal(img.shape).astype(np.float32) * np.float32(res.sigma)
    assert every.shape == (len(img),) and np.median(every) > np.quantile(log_evidence(noise, res), 0.99)
    one = log_evidence(img, res, np.array([int(res.labels[0])]))
    assert np.all(one <= every + 1e-3)

import numpy as np
import torch

from clcluster.em.align import PolarCache, PolarGrid, align_all, hard_em, polar_transform, to_reference_frame
from clcluster.image.imageops import fourier_shift, rotate
from clcluster.core.metrics import hungarian_accuracy


def test_pose_is_recovered_and_undone():
    ref = np.zeros((1, 32, 32), np.float32)
    ref[0, 10:14, 16:24] = 1
    ref[0, 16:20, 12:15] = 2
    img = fourier_shift(rotate(ref, [37.0]), [[1.0, -1.0]])
    pg = PolarGrid(32, max_shift=2)
    refp = polar_transform(torch.from_numpy(ref), pg)[:, int(np.argmin(np.abs(pg.offsets).sum(1)))]
    res, _, _ = align_all(PolarCache(img, pg), refp)
    assert abs(res.angle_deg[0] - 37.0) <= 360 / 64
    assert np.allclose(res.shift_px[0], [1.0, -1.0])
    back = to_reference_frame(img, res.angle_deg, res.shift_px)
    assert np.corrcoef(back.ravel(), ref.ravel())[0, 1] > 0.9


def test_hard_em_recovers_views_on_easy_data(easy_sim, preprocessed_easy):
    cfg, sim = easy_sim
    cache = PolarCache(preprocessed_easy, PolarGrid(32, max_shift=2))
    best = max((hard_em(cache, np.random.default_rng(r).integers(0, 4, len(preprocessed_easy)), 4, seed=r)
                for r in range(3)), key=lambda r: r.objective)
    assert hungarian_accuracy(sim.truth["class"], best.alignment.labels) >= 0.9


def test_split_merge_escapes_two_views_in_one_class():
    """A converged EM state in which two views share one class while another view is held by
    two classes: split-and-merge moves find the views again, and the objective never falls."""
    from clcluster.em.align import soft_em, split_merge, split_merge_moves
    from conftest import binned_easy_set

    img, truth, _ = binned_easy_set(views=5, snr=0.3, seed=4, images_per_view=40)
    cache = PolarCache(img, PolarGrid(32, max_shift=2))
    start = truth.copy()
    start[truth == 1] = 0  # views 0 and 1 merged
    halves = np.flatnonzero(truth == 2)
    start[halves[::2]] = 1  # view 2 split over classes 1 and 2
    stuck = soft_em(cache, start, 5, None, max_iter=4, anneal_iterations=1, seed=0, c0=0.5,
                    refs0=_aligned_refs(cache, start, 5))
    assert hungarian_accuracy(truth, stuck.alignment.labels) < 0.9
    moves = split_merge_moves(stuck.refs, stuck.alignment.labels, stuck.alignment.score, 5, trials=6)
    assert moves and all(j != l for j, _, l in moves)
    out = split_merge(cache, stuck, 5, None, trials=6, rounds=4, seed=0)
    assert out.objective >= stuck.objective
    assert hungarian_accuracy(truth, out.alignment.labels) >= 0.95


def _aligned_refs(cache, labels, k):
    """References from a partition through one hard-EM pass from the rotational class means."""
    from clcluster.em.align import class_polar_means

    refs = class_polar_means(cache, labels, k)
    for _ in range(3):
        _, refs, _ = align_all(cache, refs, labels[:, None])
    return refs


def test_wide_passes_compare_only_similar_classes(monkeypatch):
    """With 0 < wide < K, the wide passes of the soft EM compare each particle with its
    candidates and the `wide` classes most similar to its own (never all K), and still recover
    the views from a start with a quarter of the labels scrambled."""
    import clcluster.em.align as al
    from conftest import binned_easy_set

    img, truth, _ = binned_easy_set(views=6, snr=1.0, seed=5, images_per_view=30)
    cache = PolarCache(img, PolarGrid(32, max_shift=2))
    refs = _aligned_refs(cache, truth, 6)
    sim = al.similar_classes(refs, 3)
    assert sim.shape == (6, 3) and np.array_equal(sim[:, 0], np.arange(6))
    seen = []
    real = al.soft_align_all
    monkeypatch.setattr(al, "soft_align_all", lambda c, r, cand, *a, **kw: (
        seen.append(None if cand is None else cand.shape[1]), real(c, r, cand, *a, **kw))[1])
    rng = np.random.default_rng(0)
    start = truth.copy()
    bad = rng.random(len(start)) < 0.25
    start[bad] = rng.integers(0, 6, bad.sum())
    near = np.stack([start, (start + 1) % 6], axis=1)
    out = al.soft_em(cache, start, 6, near, max_iter=8, anneal_iterations=2, seed=0, full_every=2, top_m=2, wide=3)
    assert seen and None not in seen and seen[0] == 2 + 3  # wide pass: 2 candidates + 3 similar classes
    assert hungarian_accuracy(truth, out.alignment.labels) >= 0.95

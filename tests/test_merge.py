"""More classes, then merged: aligned similarity of references, their grouping, merged starts,
and the over-split ML2D stage of the refinement on easy data."""
import numpy as np

from clcluster.core.metrics import hungarian_accuracy
from clcluster.em.merge import aligned_similarity, group_references, merged_references
from clcluster.image.imageops import rotate
from conftest import binned_easy_set


def _ncc(a, b):
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def test_aligned_similarity_finds_the_rotation_between_references():
    _, _, refs = binned_easy_set(3, 1.0, 3)
    stack = np.stack([refs[0], rotate(refs[0][None], [30.0])[0], rotate(refs[0][None], [-100.0])[0], refs[1]])
    sim, angle = aligned_similarity(stack)
    assert sim.shape == angle.shape == (4, 4) and np.allclose(np.diag(sim), 1, atol=1e-4)
    assert sim[0, 1] > 0.98 and sim[0, 2] > 0.98 and sim[0, 3] < 0.9
    for j in (1, 2):  # rotate(reference j, angle[i, j]) matches reference i
        assert _ncc(rotate(stack[j][None], [angle[0, j]])[0], stack[0]) > 0.98
        assert _ncc(stack[j], stack[0]) < 0.9


def test_rotated_copies_group_together_and_merge_into_their_view():
    _, _, refs = binned_easy_set(3, 1.0, 3)
    rng = np.random.default_rng(1)
    views = np.array([0, 1, 2, 0, 1, 2, 0])
    copies = np.stack([rotate(refs[v][None], [rng.uniform(0, 360)])[0] for v in views])
    copies += 0.1 * copies.std() * rng.standard_normal(copies.shape).astype(np.float32)
    sim, angle = aligned_similarity(copies)
    groups = group_references(sim, 3)
    assert hungarian_accuracy(views, groups) == 1.0 and groups[0] == 0  # numbered by first appearance
    sizes = np.array([5.0, 1, 1, 1, 1, 1, 1])
    merged = merged_references(copies, sizes, groups, angle)
    assert merged.shape == (3, 32, 32)
    # each group's average lies in its lead's frame (the largest member; copy 0 for view 0)
    assert _ncc(merged[0], copies[0]) > 0.97
    assert max(_ncc(merged[0], c) for c in copies[[3, 6]]) < 0.9  # the others were turned, not just added
    assert np.array_equal(group_references(sim[:2, :2], 3), [0, 1])  # fewer references than groups: one each


def test_oversplit_ml_stage_recovers_the_views(monkeypatch, caplog, easy_sim, preprocessed_easy):
    """Above refine_guards_max_k classes the ML2D stage fits 2K classes, merges them into K and
    fits K from there, and recovers the views of easy data (200 images and K=4, so the minimum
    class size and the guards' class count are lowered for the test)."""
    import logging
    import re

    from clcluster.em.align import Alignment
    from clcluster.steps import cluster as cluster_mod

    monkeypatch.setattr(cluster_mod, "OVERSPLIT_MIN_CLASS_SIZE", 20)
    _, sim = easy_sim
    truth = sim.truth["class"].to_numpy()
    n = len(truth)
    rng = np.random.default_rng(0)
    noisy = np.where(rng.random(n) < 0.3, rng.integers(0, 4, n), truth)  # a start with 30 % of labels scrambled
    a = Alignment(noisy, np.zeros(n, np.float32), np.zeros(n, np.float32), np.zeros((n, 2), np.float32), np.zeros(n, np.float32))
    cfg = cluster_mod.ClusterConfig(refine_ml_iterations=10, refine_angles=32, refine_guards_max_k=3)
    assert cluster_mod.oversplit_classes(n, 4, cfg) == 8
    assert cluster_mod.oversplit_classes(n, 4, cluster_mod.ClusterConfig(refine_oversplit=1, refine_guards_max_k=3)) == 4
    assert cluster_mod.oversplit_classes(n, 4, cluster_mod.ClusterConfig()) == 4  # K <= refine_guards_max_k: guards instead
    assert cluster_mod.oversplit_classes(100, 4, cfg) == 4  # 12.5 a class: too few
    calls = []
    real = cluster_mod.polish
    monkeypatch.setattr(cluster_mod, "polish", lambda *x, **kw: calls.append(x[4]) or real(*x, **kw))
    with caplog.at_level(logging.INFO, logger="clcluster.steps.cluster"):
        ml = cluster_mod.likelihood_polish(preprocessed_easy, a, 4, cfg)
    assert calls == [8]  # the over-split fit; the K-class fit starts from the merged references
    assert ml.references.shape[0] == 4 and hungarian_accuracy(truth, ml.labels) >= 0.9
    assert re.search(r"ML2D over 8 classes: \d+ iterations, \S+ s; merged into 4", caplog.text)

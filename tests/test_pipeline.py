"""The classifier end to end through the package API (no Snakemake): easy data far above chance."""
import numpy as np
import pytest

from clcluster.steps.cluster import ClusterConfig, cluster
from clcluster.steps.embed import embed_images
from clcluster.core.metrics import hungarian_accuracy
from clcluster.learn.models import load_encoder
from clcluster.steps.train import TrainConfig, train


@pytest.fixture(scope="module")
def trained(tmp_path_factory, preprocessed_easy):
    d = tmp_path_factory.mktemp("train")
    np.save(d / "shard_0.npy", preprocessed_easy.astype(np.float16))
    train([d / "shard_0.npy"], d / "encoder.pt", TrainConfig(steps=25, batch_size=64), seed=0, device="cpu", apix=5.0)
    enc, _ = load_encoder(d / "encoder.pt")
    return enc, d


def test_clustering_of_easy_set_far_above_chance(easy_sim, preprocessed_easy, trained):
    cfg, sim = easy_sim
    enc, _ = trained
    feats = embed_images(enc, preprocessed_easy)
    assert np.allclose(np.linalg.norm(feats, axis=1), 1, atol=1e-5)
    res = cluster(feats, 4, ClusterConfig(n_init=4, refine_restarts=2), seed=0, images=preprocessed_easy, device="cpu")
    truth = sim.truth["class"].to_numpy()
    acc = hungarian_accuracy(truth, res.labels)
    assert acc >= 0.85, acc  # chance is ~0.3 for 4 balanced classes
    # a shuffled labelling would miss the floor
    assert hungarian_accuracy(truth, np.random.default_rng(0).permutation(res.labels)) < 0.5
    assert res.angle_deg is not None and res.shift_px.shape == (len(truth), 2)
    # the ML2D stage's posterior of the assigned class: a probability, confident on easy data
    assert res.probability.shape == (len(truth),) and np.all((res.probability > 0) & (res.probability <= 1 + 1e-6))
    assert np.median(res.probability) > 0.9


def test_guards_run_only_up_to_their_class_count(monkeypatch, caplog, easy_sim, preprocessed_easy, trained):
    """Above cluster.refine_guards_max_k classes: one refinement from the K-means classes and no
    split-and-merge moves; at or below it, every restart and the moves."""
    import logging
    import re

    from clcluster.steps import cluster as cluster_mod

    enc, _ = trained
    feats = embed_images(enc, preprocessed_easy)
    starts, moves = [], []
    real_chain, real_sm = cluster_mod.refine_chain, cluster_mod.split_merge
    monkeypatch.setattr(cluster_mod, "refine_chain", lambda *a, **kw: starts.append(1) or real_chain(*a, **kw))
    monkeypatch.setattr(cluster_mod, "split_merge", lambda *a, **kw: moves.append(1) or real_sm(*a, **kw))
    cfg = dict(n_init=2, refine_restarts=2, refine_iterations=6, refine_ml_iterations=3, refine_split_merge_rounds=1,
               stability_runs=0)
    with caplog.at_level(logging.INFO, logger="clcluster.steps.cluster"):
        cluster(feats, 4, ClusterConfig(refine_guards_max_k=3, **cfg), seed=0, images=preprocessed_easy, device="cpu")
    assert len(starts) == 1 and not moves
    assert "refine_guards_max_k=3" in caplog.text and "at most 6 annealed EM passes" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="clcluster.steps.cluster"):
        cluster(feats, 4, ClusterConfig(refine_guards_max_k=3, refine_lean_iterations=3, **cfg), seed=0, images=preprocessed_easy, device="cpu")
    assert len(starts) == 2 and re.search(r"restart 1: mean NCC \S+ after 3 iterations", caplog.text)  # lean EM: 3 passes
    starts.clear()
    cluster(feats, 4, ClusterConfig(refine_guards_max_k=4, **cfg), seed=0, images=preprocessed_easy, device="cpu")
    assert len(starts) == 2 and len(moves) == 2
    cluster(feats, 4, ClusterConfig(refine_guards_max_k=0, **cfg), seed=0, images=preprocessed_easy, device="cpu")
    assert len(starts) == 4 and len(moves) == 4


def test_ml_stage_compares_all_classes_unless_told(monkeypatch, preprocessed_easy):
    """The ML2D stage of a refinement runs the exact E-step over all K by default, and a
    truncated one (embedding neighbours + refine_ml_wide similar classes) when asked."""
    from clcluster.steps import cluster as cluster_mod
    from clcluster.em.align import PolarCache, PolarGrid

    seen, iters = [], []
    real = cluster_mod.polish
    monkeypatch.setattr(cluster_mod, "polish", lambda *a, **kw: seen.append(kw["candidates"]) or iters.append(kw["max_iter"]) or real(*a, **kw))
    img = preprocessed_easy
    rng = np.random.default_rng(0)
    lab0, near = rng.integers(0, 4, len(img)), rng.integers(0, 4, (len(img), 2))
    cache = PolarCache(img, PolarGrid(img.shape[-1], n_angles=32, max_shift=1))
    cfg = dict(refine_iterations=4, refine_anneal_iterations=2, refine_split_merge=0, refine_ml_iterations=2, refine_wide=2)
    for ml_wide in (0, 2):
        cluster_mod.refine_chain(cache, img, lab0, near, 4, ClusterConfig(refine_ml_wide=ml_wide, **cfg))
    assert seen[0] is None
    assert seen[1].shape == (len(img), 2 + 2)
    assert iters == [2, 2]
    # the cost cap: iterations x classes compared <= refine_ml_budget
    cluster_mod.refine_chain(cache, img, lab0, near, 4, ClusterConfig(refine_ml_budget=6, **cfg))
    cluster_mod.refine_chain(cache, img, lab0, near, 4, ClusterConfig(refine_ml_budget=6, refine_ml_wide=1, **cfg))
    assert iters[2:] == [1, 2]  # 6 // 4 classes; 6 // (1 similar + 2 neighbours)
    assert cluster_mod.ml_iterations(50, ClusterConfig()) == 24 and cluster_mod.ml_iterations(10, ClusterConfig()) == 60
    assert cluster_mod.ml_iterations(50, ClusterConfig(refine_ml_budget=0)) == 60


def test_encoder_alone_beats_chance(easy_sim, preprocessed_easy, trained):
    cfg, sim = easy_sim
    enc, _ = trained
    res = cluster(embed_images(enc, preprocessed_easy), 4, ClusterConfig(n_init=4, refine=False), seed=0)
    assert hungarian_accuracy(sim.truth["class"], res.labels) >= 0.45


def test_training_writes_loss_curve_and_resumes_from_checkpoint(tmp_path, preprocessed_easy):

    import torch

    np.save(tmp_path / "s.npy", preprocessed_easy[:64].astype(np.float16))
    cfg = TrainConfig(steps=6, batch_size=16, checkpoint_minutes=0)
    train([tmp_path / "s.npy"], tmp_path / "ref.pt", cfg, seed=1, device="cpu")
    assert (tmp_path / "ref_loss.csv").read_text().count("\n") == 7 and (tmp_path / "ref_loss.png").exists()
    assert not (tmp_path / "ref.ckpt").exists()  # removed once training completed
    # an interrupted run: 3 steps, then a checkpoint as the signal handler writes it, then resume
    part = TrainConfig(steps=6, batch_size=16, checkpoint_minutes=0)
    import signal

    from clcluster.steps import train as train_mod

    calls = {"n": 0}
    orig = train_mod.nt_xent

    def counting(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            signal.raise_signal(signal.SIGUSR1)
        return orig(*a, **k)

    train_mod.nt_xent = counting
    try:
        with pytest.raises(SystemExit) as e:
            train([tmp_path / "s.npy"], tmp_path / "run.pt", part, seed=1, device="cpu")
        assert e.value.code == 128 + signal.SIGUSR1
    finally:
        train_mod.nt_xent = orig
    assert (tmp_path / "run.ckpt").exists() and not (tmp_path / "run.pt").exists()
    train([tmp_path / "s.npy"], tmp_path / "run.pt", part, seed=1, device="cpu")
    a = torch.load(tmp_path / "ref.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "run.pt", weights_only=True)["state_dict"]
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=1e-5), k


def test_refinement_on_a_subset_then_streamed_assignment_of_all(easy_sim, preprocessed_easy, trained):
    """Above refine_subset particles, refinement runs on a random subset and every particle is
    then aligned once to the refined classes; mini-batch K-means above minibatch_above."""
    from clcluster.learn.data import RowView

    cfg, sim = easy_sim
    enc, _ = trained
    feats = embed_images(enc, preprocessed_easy).astype(np.float16)
    cc = ClusterConfig(n_init=4, refine_restarts=2, refine_subset=100, minibatch_above=150, cache_mb=0, batch_size=32)
    res = cluster(feats, 4, cc, seed=0, images=RowView(preprocessed_easy, np.arange(len(feats))), device="cpu")
    truth = sim.truth["class"].to_numpy()
    assert res.labels.shape == (200,) and "assign_s" in res.timings
    assert hungarian_accuracy(truth, res.labels) >= 0.85
    # every particle got a pose from the streamed alignment pass, with an NCC score in [-1, 1]
    assert np.all(res.score >= -1) and np.all(res.score <= 1) and res.shift_px.shape == (200, 2)
    assert res.probability.shape == (200,) and np.all((res.probability > 0) & (res.probability <= 1 + 1e-6))


def test_streamed_assignment_matches_direct_distances():
    from clcluster.steps.cluster import assign, centroid_distances

    rng = np.random.default_rng(0)
    f, c = rng.normal(size=(1000, 8)).astype(np.float32), rng.normal(size=(5, 8)).astype(np.float32)
    lab, own, margin, near = assign(f, c, 2, chunk=64)
    d = centroid_distances(f, c)
    assert np.array_equal(lab, d.argmin(1)) and np.array_equal(near[:, 0], lab)
    assert np.allclose(own, d.min(1), atol=1e-5)
    assert np.allclose(margin, np.sort(d, 1)[:, 1] - d.min(1), atol=1e-5)


def test_merge_embeddings_keeps_shard_order_in_float16(tmp_path):
    from clcluster.steps.cluster import merge_embeddings

    parts = [np.full((n, 4), i, np.float32) for i, n in enumerate((3, 5, 2))]
    paths = []
    for i, p in enumerate(parts):
        np.save(tmp_path / f"e{i}.npy", p)
        paths.append(tmp_path / f"e{i}.npy")
    merged = merge_embeddings(paths)
    assert merged.dtype == np.float16 and np.array_equal(merged, np.concatenate(parts))
    np.save(tmp_path / "bad.npy", np.zeros((2, 3), np.float32))
    with pytest.raises(ValueError, match="feature sizes"):
        merge_embeddings(paths + [tmp_path / "bad.npy"])

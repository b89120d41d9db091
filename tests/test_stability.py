"""Seed stability in the cluster step: further runs with seeds of their own on a subset, compared
with the main run; the main run's labels do not depend on them."""
import numpy as np

from clcluster.steps.cluster import ClusterConfig, cluster, write_assignments

CFG = dict(n_init=2, refine_restarts=2, refine_iterations=8, refine_ml_iterations=4, refine_split_merge_rounds=1)


def features(n: int) -> np.ndarray:
    """Uninformative embeddings (n, 8): the refinement alone separates the easy set's views."""
    f = np.random.default_rng(1).normal(size=(n, 8)).astype(np.float32)
    return f / np.linalg.norm(f, axis=1, keepdims=True)


def test_stability_runs_leave_the_main_labels_alone_and_agree_on_easy_data(preprocessed_easy, monkeypatch):
    from clcluster.steps import cluster as cluster_mod

    feats = features(len(preprocessed_easy))
    off = cluster(feats, 4, ClusterConfig(stability_runs=0, **CFG), seed=0, images=preprocessed_easy, device="cpu")
    assert off.stability is None and off.seed_ari is None
    seeds, sizes = [], []
    real = cluster_mod.cluster
    monkeypatch.setattr(cluster_mod, "cluster",
                        lambda f, k, c, seed=0, **kw: seeds.append(seed) or sizes.append(len(f)) or real(f, k, c, seed=seed, **kw))
    on = cluster_mod.cluster(feats, 4, ClusterConfig(stability_runs=2, stability_subset=120, **CFG), seed=0,
                             images=preprocessed_easy, device="cpu")
    np.testing.assert_array_equal(on.labels, off.labels)  # the extra runs draw from streams of their own
    assert seeds[0] == 0 and len(set(seeds)) == 3 and sizes == [200, 120, 120]
    assert on.stability.shape == (4,) and np.all((on.stability >= 0) & (on.stability <= 1))
    assert on.seed_ari > 0.8 and np.nanmin(on.stability) > 0.8  # easy data: the same classes whatever the seed
    assert "stability_s" in on.timings


def test_stability_of_alignment_free_labels_and_what_assignments_npz_holds(tmp_path):
    """Without refinement the runs are K-means from other seeds; assignments.npz gets the per-class
    stability (k,) and the mean ARI; a subset smaller than K skips the runs."""
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 8)) * 5
    blobs = np.concatenate([c + rng.normal(size=(50, 8)) for c in centres]).astype(np.float32)
    res = cluster(blobs, 3, ClusterConfig(n_init=2, refine=False, stability_runs=1, stability_subset=90), seed=0)
    np.testing.assert_allclose(res.stability, 1.0)
    assert res.seed_ari == 1.0
    write_assignments(res, np.arange(150)[::-1], tmp_path)
    with np.load(tmp_path / "assignments.npz") as z:
        assert z["stability"].shape == (3,) and float(z["seed_ari"]) == 1.0 and z["labels"].shape == (150,)
    # six well-separated blobs forced into 3 classes: other seeds pair them differently
    many = np.concatenate([c + rng.normal(size=(40, 8)) for c in rng.normal(size=(6, 8)) * 5]).astype(np.float32)
    few = cluster(many, 3, ClusterConfig(n_init=1, refine=False, stability_runs=3, stability_subset=240), seed=0)
    assert few.stability.shape == (3,) and few.seed_ari < 1.0
    skipped = cluster(blobs, 3, ClusterConfig(n_init=1, refine=False, stability_runs=1, stability_subset=2), seed=0)
    assert skipped.stability is None


def test_realistic_benchmark_reports_the_seed_ari_of_the_cl_pipeline(tmp_path):
    """The realistic benchmark's CL rows carry the seed ARI (a second master seed) and the
    cluster step's own stability ARI; --no-seed-ari (seed_ari False) leaves the column out."""
    import copy

    from clcluster.bench.realistic_benchmark import RealisticBenchmarkConfig, run_realistic_benchmark
    from clcluster.core.config import load_config
    from clcluster.steps.simulate import SimulationConfig

    cfg = copy.deepcopy(load_config(None))
    cfg["train"].update(steps=3, batch_size=32)
    cfg["cluster"].update(n_init=2, refine_iterations=4, refine_restarts=1, refine_ml_iterations=2)
    sc = SimulationConfig(volumes=("builtin:0",), box=32, apix=5.0, mode="realistic",
                          realistic={"particles": 120, "junk_fraction": 0.25})
    kw = dict(classes=3, fidelity_directions=20)
    df = run_realistic_benchmark(RealisticBenchmarkConfig(methods=("cl_kmeans", "cl_refined"), **kw), cfg, tmp_path, sc)
    by = df.set_index("method")
    assert by["seed_ari"].between(-1, 1).all() and -1 <= by.loc["cl_refined", "stability_ari"] <= 1
    assert "seed_ari" in (tmp_path / "results.md").read_text()
    off = run_realistic_benchmark(RealisticBenchmarkConfig(methods=("cl_refined",), seed_ari=False, **kw), cfg,
                                  tmp_path / "off", sc)
    assert "seed_ari" not in off and off["stability_ari"].between(-1, 1).all()

"""The benchmark harness on a tiny, easy grid: every method runs on the same stack, scores are
written as CSV, Markdown and a plot, and the methods that should be near-perfect on easy data are."""
import copy
from pathlib import Path

import yaml

from clcluster.bench.benchmark import BenchmarkConfig, run_benchmark

REPO = Path(__file__).resolve().parents[1]


def test_benchmark_runs_every_method_and_writes_its_tables(tmp_path):
    cfg = yaml.safe_load((REPO / "config/config.yaml").read_text())
    run_cfg = copy.deepcopy(cfg)
    run_cfg["train"].update(steps=4, batch_size=32)
    run_cfg["cluster"].update(n_init=2, refine_iterations=10, refine_split_merge_rounds=1, refine_ml_iterations=5)
    methods = ("cl_kmeans", "cl_refined", "refine_random", "ml2d", "pca_kmeans", "oracle")
    bc = BenchmarkConfig(snrs=(1.0,), volumes=("builtin:0",), views=3, images_per_view=30, methods=methods, ml2d_starts=1)
    df = run_benchmark(bc, run_cfg, tmp_path)
    assert sorted(df["method"]) == sorted(methods) and (df["n"] == 90).all() and (df["k"] == 3).all()
    assert df["accuracy"].between(0, 1).all() and (df["seconds"] >= 0).all()
    acc = df.set_index("method")["accuracy"]
    assert acc["oracle"] >= 0.95 and acc["cl_refined"] >= 0.9 and acc["refine_random"] >= 0.9
    for name in ("results.csv", "results.md", "accuracy_vs_snr.png"):
        assert (tmp_path / name).stat().st_size > 0
    md = (tmp_path / "results.md").read_text()
    assert "| cl_refined |" in md and "SNR 1.0" in md
    # CL-Clustering run again with a second master seed: easy data, the same classes
    seed_ari = df.set_index("method")["seed_ari"]
    assert seed_ari["cl_refined"] >= 0.8 and -1 <= seed_ari["cl_kmeans"] <= 1 and seed_ari[["ml2d", "oracle"]].isna().all()
    assert df.set_index("method")["stability_ari"]["cl_refined"] >= 0.8  # the cluster step's own subset runs
    assert "| cl_refined | seed_ari |" in md

"""What the ML2D stage's balanced class priors and its over-split-then-merge start do on a
realistic stack (whitened, as `preprocess.whiten: true` prepares it), measured by view coherence.

    python benchmarks/balanced_ml2d.py [--particles 4000] [--snr 0.05] [--seeds 1 2] [--junk]

Rows: ML2D (Scheres' class priors, `balance=False`) against balanced priors (`balance=True`),
started from the true poses of the perfect partition (K-means on the true directions) and from
random references (averages of random subsets, one start per seed); then the over-split start
(ML2D with balanced priors over 2K classes, references grouped into K by `em.merge`, balanced ML2D
over K from the groups' averages). At most 60 iterations (30 for the K-class fit after the
over-split); ML2D's priors run all of them, balanced ones stop as in the pipeline (fewer than
0.2 % of the labels changed).
With --junk: how well per-particle scores of the balanced fit tell junk from particles (area under
the ROC curve) and what a likelihood-ratio test against pure noise would remove.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
from sklearn.metrics import roc_auc_score

from clcluster.bench.realistic_benchmark import truth_partition
from clcluster.bench.realistic_scores import coherence_references, median_view_angle, view_score
from clcluster.em.merge import aligned_similarity, group_references, merged_references
from clcluster.em.ml2d import log_evidence, ml2d, polish
from clcluster.core.config import load_config
from refinement_start import realistic_stack

K = 20
ITERATIONS = 60


def junk_report(images, kinds: np.ndarray, good: np.ndarray, fit) -> None:
    """AUCs of per-particle scores of a balanced fit, and a likelihood-ratio test against noise."""
    lab = fit.labels
    junk_share = np.bincount(lab[~good], minlength=K) / np.maximum(np.bincount(lab, minlength=K), 1)
    clean = np.flatnonzero(junk_share < 0.5)
    scores = {"log-evidence, all classes": log_evidence(images, fit, np.arange(K)),
              "log-evidence, classes < 50 % junk": log_evidence(images, fit, clean),
              "class probability": fit.class_probability.max(1)}
    print(f"\nclasses >= 50 % junk: {K - len(clean)}, holding {np.isin(lab[~good], np.setdiff1d(np.arange(K), clean)).mean():.2f} "
          "of the junk\n\n| score | AUC all junk | " + " | ".join(np.unique(kinds[~good])) + " |")
    for name, s in scores.items():
        per_kind = [roc_auc_score(good[good | (kinds == k)], s[good | (kinds == k)]) for k in np.unique(kinds[~good])]
        print(f"| {name} | {roc_auc_score(good, s):.2f} | " + " | ".join(f"{v:.2f}" for v in per_kind) + " |")
    noise = np.random.default_rng(0).standard_normal((1000,) + images.shape[1:]).astype(np.float32)
    null = log_evidence(noise * np.float32(np.sqrt(fit.model["sigma2"])), fit, np.arange(K))
    every = scores["log-evidence, all classes"]
    for q in (0.95, 0.99):
        t = np.quantile(null, q)
        print(f"test against noise at its {q:.0%} quantile: good kept {(every[good] > t).mean():.2f}, "
              + ", ".join(f"{k} removed {(every[kinds == k] <= t).mean():.2f}" for k in np.unique(kinds[~good])))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--particles", type=int, default=4000)
    ap.add_argument("--snr", type=float, default=0.05)
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--ribosome", default="../shared/data/volumes/clean70SRibosome_vol_65p.mrc")
    ap.add_argument("--junk", action="store_true")
    a = ap.parse_args()
    images, truth, good, (psi, shift) = realistic_stack(a.ribosome, a.particles, a.snr, load_config("config/config.yaml"))
    dirs = truth[["dir_x", "dir_y", "dir_z"]].to_numpy()
    coh = coherence_references(dirs[good], K, 0)
    common = dict(n_rotations=64, max_shift=3)

    def row(start: str, fit: str, labels: np.ndarray, t0: float) -> None:
        sizes = np.bincount(labels, minlength=K)
        deg = median_view_angle(dirs[good], labels[good])
        print(f"| {start} | {fit} | {deg:.1f} | {view_score(deg, coh):.2f} | {sizes.min()}-{sizes.max()} | "
              f"{time.time() - t0:.0f} |", flush=True)

    print(f"K-means on the true directions {coh['kmeans_truth_deg']:.1f} deg, random labels {coh['random_deg']:.1f} deg\n")
    print("| start | fit | view median (deg) | view score | class sizes | seconds |\n|---|---|---|---|---|---|")
    perfect = truth_partition(dirs, good, K, 0)
    for balance in (False, True):
        t = time.time()
        fit = polish(images, perfect, psi, shift, K, max_iter=ITERATIONS, balance=balance, **common)
        row("true poses of the perfect partition", f"{'balanced' if balance else 'ML2D'} priors", fit.labels, t)
    for seed in a.seeds:
        for balance in (False, True):
            t = time.time()
            fit = ml2d(images, K, n_starts=1, max_iter=ITERATIONS, seed=seed, balance=balance, tol=0, **common)
            row(f"random references (seed {seed})", f"{'balanced' if balance else 'ML2D'} priors", fit.labels, t)
        t = time.time()
        fine = ml2d(images, 2 * K, n_starts=1, max_iter=ITERATIONS, seed=seed, balance=True, tol=0, **common)
        similarity, angle = aligned_similarity(fine.references)
        refs = merged_references(fine.references, fine.class_probability.sum(0), group_references(similarity, K), angle)
        fit = ml2d(images, K, init_references=refs, max_iter=ITERATIONS // 2, seed=seed, balance=True, **common)
        row(f"random references (seed {seed})", f"balanced over {2 * K}, merged into {K}, balanced over {K}", fit.labels, t)
    if a.junk:
        junk_report(images, truth["kind"].to_numpy().astype(str), good, fit)


if __name__ == "__main__":
    main()

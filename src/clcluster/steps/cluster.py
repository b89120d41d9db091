"""Clustering: merge the shards' embeddings, K-means++ (scikit-learn; mini-batch above a size),
then the optional alignment-based refinement in which each particle is compared, over in-plane
rotations and shifts, only with the class averages of its m nearest centroids in embedding space.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import time
from pathlib import Path

import numpy as np
from sklearn.cluster import KMeans, MiniBatchKMeans

from clcluster.core.backend import select_device
from clcluster.core.cli_args import add_config, add_device, run_config
from clcluster.core.config import dataclass_from_dict
from clcluster.core.metrics import seed_stability
from clcluster.core.rng import KMEANS_SAMPLE, OVERSPLIT, REFINE_SUBSET, STABILITY, stream_seed
from clcluster.em.align import (
    Alignment,
    PolarCache,
    PolarGrid,
    align_all,
    hard_em,
    polar_references,
    similar_classes,
    soft_em,
    split_merge,
)
from clcluster.em.merge import aligned_similarity, group_references, merged_references
from clcluster.em.ml2d import ML2DResult, SparseSchedule, classify, ml2d, polish
from clcluster.em.restarts import best_restart, random_partition
from clcluster.image.pickscore import pick_contrast
from clcluster.learn.data import RowView, random_rows

log = logging.getLogger(__name__)

# The ML2D stage over-splits only where each of its classes would hold at least this many particles.
OVERSPLIT_MIN_CLASS_SIZE = 100


@dataclasses.dataclass
class ClusterConfig:
    """The cluster step's settings. Fields the run configuration sets are described in
    config.schema.yaml `cluster:` (same defaults; tests/test_config.py fails on drift). The fields
    marked "schedule" are the refinement's inner schedule: fixed constants the run configuration
    cannot set (the schema refuses them), kept as fields so that tests and ablations can vary them."""

    n_init: int = 10
    minibatch_above: int = 200_000
    candidates: int = 3
    refine: bool = True
    refine_method: str = "soft"  # schedule: soft = annealed EM over classes, shifts, rotations; hard = best match only
    refine_iterations: int = 25
    refine_anneal_iterations: int = 8  # schedule: passes over which the inverse temperature rises to its white-noise value
    refine_full_every: int = 4  # schedule: every N-th pass is wide and adds each particle's best `candidates` classes
    refine_wide: int = 12  # schedule: classes a wide pass compares (those most like the particle's own; 0 = all K)
    refine_restarts: int = 2
    refine_split_merge: int = 6  # schedule: split-and-merge moves tried per round on the best restart (0 = off)
    refine_split_merge_rounds: int = 4  # schedule: rounds of those moves (stops at the first with none kept)
    refine_guards_max_k: int = 12
    refine_lean_iterations: int = 15  # schedule: annealed EM passes (at most) above refine_guards_max_k classes
    refine_ml_iterations: int = 60
    refine_ml_wide: int = 0  # schedule: 0 = ML2D stage over all K classes (exact E-step); > 0 = truncated E-step
    refine_ml_budget: int = 1200
    refine_ml_sparse_classes: int = 8  # schedule: classes a truncated ML2D E-step compares (0 = every E-step over all K)
    refine_ml_full_every: int = 8  # schedule: every N-th ML2D E-step compares all K classes
    refine_balance: bool = True
    refine_oversplit: int = 2
    refine_noise_screen: float = 0.05
    refine_ml_max_shift_px: int = 3  # schedule: ML2D stage translation search radius (working-box px)
    refine_max_shift_px: int = 2
    refine_angles: int = 64
    refine_subset: int = 20_000
    assign_candidates: int = 0  # schedule: classes compared per particle in the final assignment pass (0 = all K)
    cache_mb: int = 2000
    batch_size: int = 512
    stability_runs: int = 1
    stability_subset: int = 1000

    @classmethod
    def from_dict(cls, d):
        return dataclass_from_dict(cls, d)


@dataclasses.dataclass
class Clustering:
    """Per particle (input order): 0-based label, distance to its centroid, margin to the
    second-nearest, K-means label before refinement, the pose where refinement ran, and the
    ML2D posterior probability of its class where the ML2D stage ran. Per class: `stability` (k,)
    and the mean `seed_ari` of the seed-stability runs, where they ran (`with_stability`)."""

    labels: np.ndarray
    kmeans_labels: np.ndarray
    distance: np.ndarray
    margin: np.ndarray
    centroids: np.ndarray
    angle_deg: np.ndarray | None = None
    shift_px: np.ndarray | None = None
    score: np.ndarray | None = None
    probability: np.ndarray | None = None
    objective: float | None = None
    timings: dict = dataclasses.field(default_factory=dict)
    stability: np.ndarray | None = None
    seed_ari: float | None = None

    def arrays(self) -> dict:
        """The per-particle arrays and the centroids (not the per-class stability)."""
        out = {k: v for k, v in dataclasses.asdict(self).items() if isinstance(v, np.ndarray) and k != "stability"}
        return out


def merge_embeddings(paths, dtype=np.float16) -> np.ndarray:
    """Per-shard features (n_i, d) .npy files → one (n, d) array in a compact dtype (float16:
    1e7 particles x 128 features = 2.6 GB), one shard in memory at a time."""
    shapes = [np.load(p, mmap_mode="r").shape for p in paths]
    dims = {s[1:] for s in shapes}
    if len(dims) > 1:
        raise ValueError(f"embeddings have different feature sizes {sorted(dims)}: {[str(p) for p in paths]}")
    out = np.empty((sum(s[0] for s in shapes), *(dims.pop() if dims else (0,))), dtype)
    start = 0
    for p, shape in zip(paths, shapes):
        out[start:start + shape[0]] = np.load(p, mmap_mode="r")
        start += shape[0]
    return out


def kmeans(features: np.ndarray, k: int, n_init: int, seed: int, minibatch_above: int, chunk: int = 65536) -> np.ndarray:
    """K-means++ centroids (k, d) float32 of features (n, d) (any float dtype). Up to
    `minibatch_above` particles: scikit-learn's K-means on all of them. Above: mini-batch K-means
    (k-means++ seeding, n_init tries) on a random sample of `minibatch_above` particles, then one
    streamed mini-batch pass over all particles in shuffled chunks (memory: one chunk)."""
    n = len(features)
    if n < k:
        raise ValueError(f"{k} classes asked for but only {n} particles")
    if n <= minibatch_above:
        km = KMeans(k, init="k-means++", n_init=n_init, random_state=seed)
        km.fit(np.asarray(features, dtype=np.float32))
        return km.cluster_centers_.astype(np.float32)
    rng = np.random.default_rng([seed, KMEANS_SAMPLE])
    sample = np.sort(rng.choice(n, minibatch_above, replace=False))
    km = MiniBatchKMeans(k, init="k-means++", n_init=n_init, random_state=seed, batch_size=4096)
    km.fit(np.asarray(features[sample], dtype=np.float32))
    order = rng.permutation(n)
    for s in range(0, n, chunk):
        km.partial_fit(np.asarray(features[np.sort(order[s:s + chunk])], dtype=np.float32))
    log.info("mini-batch K-means: fitted on %d sampled particles, then one streamed pass over %d", minibatch_above, n)
    return km.cluster_centers_.astype(np.float32)


def centroid_distances(features, centroids) -> np.ndarray:
    """Euclidean distances (n, k) float32 of features (n, d) to centroids (k, d)."""
    f = np.asarray(features, dtype=np.float32)
    c2 = (centroids ** 2).sum(1)
    return np.sqrt(np.maximum((f ** 2).sum(1)[:, None] + c2[None] - 2 * f @ centroids.T, 0))


def nearest_centroids(dist: np.ndarray, m: int) -> np.ndarray:
    """The m nearest centroids of each particle (n, m), nearest first."""
    m = min(m, dist.shape[1])
    part = np.argpartition(dist, m - 1, axis=1)[:, :m]
    order = np.take_along_axis(dist, part, 1).argsort(1)
    return np.take_along_axis(part, order, 1)


def assign(features, centroids, m: int, labels=None, chunk: int = 65536):
    """Streamed assignment to centroids (k, d): per particle the nearest centroid (or the given
    `labels`), its distance, the margin to the next-nearest other centroid and the m nearest
    centroids (n, m). Memory: one chunk of (chunk, k) distances."""
    n, k = len(features), len(centroids)
    out_labels = np.empty(n, np.int64)
    own, margin = np.empty(n, np.float32), np.empty(n, np.float32)
    near = np.empty((n, min(m, k)), np.int64)
    for s in range(0, n, chunk):
        d = centroid_distances(features[s:s + chunk], centroids)
        rows = np.arange(len(d))
        lab = d.argmin(1) if labels is None else np.asarray(labels[s:s + chunk])
        out_labels[s:s + chunk], own[s:s + chunk] = lab, d[rows, lab]
        near[s:s + chunk] = nearest_centroids(d, m)
        d[rows, lab] = np.inf
        margin[s:s + chunk] = d.min(1) - own[s:s + chunk] if k > 1 else 0.0
    return out_labels, own, margin, near


def class_means(features, labels: np.ndarray, k: int, fallback: np.ndarray, chunk: int = 65536) -> np.ndarray:
    """Mean feature (k, d) float32 of each class's members (streamed); `fallback` rows for empty classes."""
    sums = np.zeros((k, features.shape[1]), np.float64)
    for s in range(0, len(features), chunk):
        np.add.at(sums, labels[s:s + chunk], np.asarray(features[s:s + chunk], dtype=np.float64))
    counts = np.bincount(labels, minlength=k)
    out = np.where(counts[:, None] > 0, sums / np.maximum(counts, 1)[:, None], fallback)
    return out.astype(np.float32)


def ml_iterations(k: int, cfg: ClusterConfig, compared: int | None = None) -> int:
    """The ML2D stage's iteration cap: `cfg.refine_ml_iterations`, and at most
    `cfg.refine_ml_budget` / (classes compared per particle: K, or `compared`), at least 1, so
    that the stage costs at most N x budget class comparisons whatever K (budget <= 0: no cap)."""
    if cfg.refine_ml_budget <= 0:
        return cfg.refine_ml_iterations
    return min(cfg.refine_ml_iterations, max(1, cfg.refine_ml_budget // max(1, compared or k)))


def likelihood_polish(images, a: Alignment, k: int, cfg: ClusterConfig, seed: int = 0, device="cpu",
                      candidates: np.ndarray | None = None) -> ML2DResult:
    """`ml2d.polish` from a refinement's classes and poses, as `cfg` sets it (`ml_iterations`);
    candidates (n, c): the classes each particle is compared with (None: all K). Where
    `oversplit_classes` allows, from the over-split start instead (`oversplit_start`)."""
    ml_args = dict(n_rotations=cfg.refine_angles, max_shift=cfg.refine_ml_max_shift_px, seed=seed, device=device,
                   cache_bytes=cfg.cache_mb * 1e6, balance=cfg.refine_balance,
                   sparse=SparseSchedule(cfg.refine_ml_sparse_classes, cfg.refine_ml_full_every))
    k2 = oversplit_classes(len(a.labels), k, cfg) if candidates is None else k
    if k2 > k:
        images = np.asarray(images[:], dtype=np.float32)  # read once (a RowView or memory map) for both fits
        refs = oversplit_start(images, a, k, k2, cfg, seed, ml_args)
        return ml2d(images, k, init_references=refs,
                    max_iter=max(1, ml_iterations(k, cfg) // 2), **ml_args)
    max_iter = ml_iterations(k, cfg, None if candidates is None else candidates.shape[1])
    return polish(images, a.labels, a.angle_deg, a.shift_px, k, max_iter=max_iter, candidates=candidates, **ml_args)


def oversplit_classes(n: int, k: int, cfg: ClusterConfig) -> int:
    """Classes of the over-split ML2D stage: `cfg.refine_oversplit` x K where the guards do not
    apply (K > `cfg.refine_guards_max_k`: many classes, where a continuum of views is cut into
    pieces) and every one of them would still hold OVERSPLIT_MIN_CLASS_SIZE particles of the n
    refined; else K (no over-split). At few classes the guards' restarts and split-and-merge
    moves run instead, and merging by reference similarity joined two distinct views there."""
    k2 = cfg.refine_oversplit * k
    return k2 if cfg.refine_oversplit > 1 and not guards_apply(k, cfg) and n >= OVERSPLIT_MIN_CLASS_SIZE * k2 else k


def oversplit_start(images, a: Alignment, k: int, k2: int, cfg: ClusterConfig, seed: int, ml_args: dict) -> np.ndarray:
    """Start references (k, D, D) for the ML2D stage from k2 > k classes: each refined class split
    at random into k2 / k parts, ML2D over the k2 classes (`ml_iterations` at k2), its references
    grouped into k by their aligned similarity and averaged within each group (`em.merge`)."""
    part = np.random.default_rng([seed, OVERSPLIT]).integers(0, k2 // k, len(a.labels))
    t = time.time()
    fine = polish(images, a.labels * (k2 // k) + part, a.angle_deg, a.shift_px, k2,
                  max_iter=ml_iterations(k2, cfg), **ml_args)
    similarity, angle = aligned_similarity(fine.references, cfg.refine_angles)
    groups = group_references(similarity, k)
    sizes = fine.class_probability.sum(0)
    log.info("ML2D over %d classes: %d iterations, %.1f s; merged into %d by their aligned references",
             k2, fine.n_iter, time.time() - t, k)
    return merged_references(fine.references, sizes, groups, angle)


def guards_apply(k: int, cfg: ClusterConfig) -> bool:
    """Whether restarts and split-and-merge moves (the guards against local optima) run at K
    classes: up to `cfg.refine_guards_max_k` (always when that is <= 0). Above it their cost
    grows with K, while at K=50 they moved single refinements by -1.0 to +1.2 points (within the
    run-to-run spread) for 2.5x the time."""
    return cfg.refine_guards_max_k <= 0 or k <= cfg.refine_guards_max_k


def refine_restarts(k: int, cfg: ClusterConfig) -> int:
    """Refinements run at K classes: `cfg.refine_restarts` where the guards apply, else one."""
    return cfg.refine_restarts if guards_apply(k, cfg) else 1


def annealed_passes(k: int, cfg: ClusterConfig) -> int:
    """Most annealed EM passes at K classes: `cfg.refine_iterations`, at most
    `cfg.refine_lean_iterations` where the guards do not apply: the EM then only seeds the ML2D
    stage, and at K=50 15 passes seeded it as well as 25."""
    return cfg.refine_iterations if guards_apply(k, cfg) else min(cfg.refine_iterations, cfg.refine_lean_iterations)


def refine_chain(cache: PolarCache, images, labels0: np.ndarray, candidates: np.ndarray, k: int, cfg: ClusterConfig,
                 seed: int = 0, restart: int = 0, device="cpu", every_pass_wide: bool = False, refs0=None):
    """One refinement from a starting partition labels0 (n,) with embedding candidates (n, m)
    (None: every pass over all K classes): annealed alignment EM (or hard EM; every pass a wide
    one with every_pass_wide; at most `refine_lean_iterations` passes where the guards do not
    apply), split-and-merge moves (where `guards_apply`), then the ML2D stage from its classes
    and poses, as `cfg` sets them. refs0 (K, R, A) polar references on `cache`'s grid: the
    annealed EM's start instead of labels0's unaligned class means. Returns (RefineResult,
    ML2DResult or None)."""
    iterations = annealed_passes(k, cfg)
    if cfg.refine_method == "soft":
        res = soft_em(cache, labels0, k, candidates, iterations, cfg.refine_anneal_iterations,
                      seed=seed + restart, log=log.info, full_every=1 if every_pass_wide else cfg.refine_full_every,
                      top_m=cfg.candidates, wide=cfg.refine_wide, refs0=refs0)
    else:
        res = hard_em(cache, labels0, k, candidates, iterations, seed=seed + restart, log=log.info)
    res = dataclasses.replace(res, restart=restart)
    log.info("restart %d: mean NCC %.4f after %d iterations", restart + 1, res.objective, len(res.history))
    if cfg.refine_split_merge > 0 and guards_apply(k, cfg):
        res = split_merge(cache, res, k, candidates, trials=cfg.refine_split_merge, rounds=cfg.refine_split_merge_rounds,
                          seed=seed, log=log.info)
    if cfg.refine_ml_iterations <= 0:
        return res, None
    t = time.time()
    a = res.alignment
    # all K classes (the exact E-step), or, with refine_ml_wide, each particle against its embedding
    # candidates and the classes most similar to its own (truncated: flat in K, less accurate)
    w = cfg.refine_ml_wide
    ml_cand = (np.concatenate([similar_classes(res.refs, w)[a.labels], candidates], axis=1)
               if 0 < w < k and candidates is not None else None)
    ml = likelihood_polish(images, a, k, cfg, seed, device, candidates=ml_cand)
    log.info("ML2D from the refined classes: log-likelihood %.1f after %d iterations, %.1f%% labels changed, %.1f s",
             ml.log_likelihood, ml.n_iter, 100 * float((ml.labels != a.labels).mean()), time.time() - t)
    return res, ml


def chain_objective(res, ml) -> float:
    """What ranks `refine_chain` results: the final ML2D log-likelihood where that stage ran (the
    mean NCC is flat at low SNR), else the mean best NCC."""
    return ml.log_likelihood if ml is not None else res.objective


def _refine_restarts(cache: PolarCache, images, labels0: np.ndarray, near: np.ndarray, k: int, cfg: ClusterConfig,
                     seed: int, device):
    """The best of `refine_restarts` refinement chains: restart 1 from the embedding's K-means
    classes labels0 (n,), the others from random partitions (unbiased where the embedding's
    clusters follow nuisances), every pass over the wide set of classes. Returns (RefineResult,
    ML2DResult or None)."""
    if not guards_apply(k, cfg):
        log.info("K=%d > cluster.refine_guards_max_k=%d: one refinement from the K-means classes, no split-and-merge, "
                 "at most %d annealed EM passes", k, cfg.refine_guards_max_k, annealed_passes(k, cfg))

    def run(r):
        lab0 = labels0 if r == 0 else random_partition(seed, r, k, len(labels0))
        return refine_chain(cache, images, lab0, near, k, cfg, seed, r, device, every_pass_wide=r > 0)

    def report(r, key, chain):
        log.info("refinement restart %d: %s %.4f", r + 1, "ML2D log-likelihood" if chain[1] is not None else "mean NCC", key)

    best = best_restart(run, refine_restarts(k, cfg), lambda chain: chain_objective(*chain), report)
    log.info("refinement: restart %d kept", best[0].restart + 1)
    return best


def _assign_all(images, features: np.ndarray, sub_feats: np.ndarray, a: Alignment, refs, ml,
                cents: np.ndarray, k: int, cfg: ClusterConfig, pg: PolarGrid, device):
    """Every particle aligned, in one streamed pass, to the refined references refs (K, R, A):
    labelled by the fitted ML2D model over all K classes, or compared with its
    `cfg.assign_candidates` nearest classes in embedding space (all K when 0). Returns
    (Alignment, posterior probability (n,) of the label or None)."""
    all_cache = PolarCache(images, pg, device, batch_size=cfg.batch_size, max_bytes=0)  # streamed
    if ml is not None and cfg.assign_candidates <= 0:
        # the fitted likelihood model labels every particle; one more pass gives poses and scores
        # over all K: restricted to the embedding's nearest classes and their similar ones it
        # lost 12 points at K=50, where the embedding is weak
        ml_labels, prob = classify(images, ml, device)[:2]
        cand = ml_labels[:, None]
    else:
        prob = None
        sub_cents = class_means(sub_feats, a.labels, k, cents)
        cand = None if cfg.assign_candidates <= 0 else assign(features, sub_cents, cfg.assign_candidates)[3]
    return align_all(all_cache, refs, cand, accumulate=False)[0], prob


def refinement_rows(images, n: int, cfg: ClusterConfig, seed: int, particle_radius_px: float | None) -> np.ndarray:
    """Rows (sorted) the refinement fits: a seeded random subset of at most `cfg.refine_subset`
    particles, less its noise-like picks (`image.pickscore`, estimated loss of the other picks
    at most `cfg.refine_noise_screen`; 0: none dropped). particle_radius_px: the pick contrast's
    disc (None: 0.375 x box, RELION's background radius)."""
    rows = random_rows(n, cfg.refine_subset, [seed, REFINE_SUBSET])
    if cfg.refine_noise_screen <= 0:
        return rows
    view = images if len(rows) == n else RowView(images, rows)
    picks = pick_contrast(view, particle_radius_px, cfg.refine_noise_screen, seed, batch=4 * cfg.batch_size)
    if picks.noise_like.any():
        log.info("refinement without %d noise-like picks of %d (pick contrast below %.3f; estimated noise-like "
                 "fraction %.2f); they are assigned with the rest", int(picks.noise_like.sum()), len(rows),
                 picks.threshold, picks.noise_fraction)
    return rows[~picks.noise_like]


def _refine(result: Clustering, features: np.ndarray, images, near: np.ndarray, k: int, cfg: ClusterConfig,
            seed: int, device, timings: dict, particle_radius_px: float | None = None) -> Alignment:
    """The alignment-based refinement of `cluster` (on `refinement_rows`: a subset above
    `cfg.refine_subset` particles, less the noise-like picks; then every particle assigned); sets
    result.probability and the timings, returns the final Alignment of every particle."""
    t1 = time.time()
    pg = PolarGrid(images.shape[-1], n_angles=cfg.refine_angles, max_shift=cfg.refine_max_shift_px)
    tdev = select_device(device)
    rows = refinement_rows(images, len(features), cfg, seed, particle_radius_px)
    whole = len(rows) == len(features)
    sub_images = images if whole else RowView(images, rows)
    sub_feats = features if whole else np.asarray(features[rows])
    if not whole:
        log.info("refinement on %d of %d particles", len(rows), len(features))
    cache = PolarCache(sub_images, pg, tdev, batch_size=cfg.batch_size, max_bytes=cfg.cache_mb * 1e6)
    res, ml = _refine_restarts(cache, sub_images, result.kmeans_labels[rows], near[rows], k, cfg, seed, tdev)
    a, refs, prob = res.alignment, res.refs, None
    if ml is not None:
        # labels from the likelihood; poses, scores and references in the refinement's polar frame
        a, refs, _ = align_all(cache, polar_references(ml.references, pg, tdev), ml.labels[:, None])
        prob = ml.class_probability[np.arange(len(ml.labels)), ml.labels]
    del cache
    timings["refine_s"] = time.time() - t1
    log.info("refinement: mean NCC %.4f, %.1f s", float(a.score.mean()), timings["refine_s"])
    if not whole:
        t2 = time.time()
        a, prob = _assign_all(images, features, sub_feats, a, refs, ml, result.centroids, k, cfg, pg, tdev)
        timings["assign_s"] = time.time() - t2
        log.info("assigned all %d particles to the refined classes: %.1f s", len(features), timings["assign_s"])
    result.probability = prob
    return a


def cluster(features: np.ndarray, k: int, cfg: ClusterConfig, seed: int = 0, images=None,
            device: str = "auto", particle_radius_px: float | None = None) -> Clustering:
    """K-means++ on L2-normalised features (n, d), then (if cfg.refine and `images` (n, box, box)
    array-like are given) alignment-based refinement (`refine_chain`: annealed EM, split-and-merge
    moves each kept only if the mean NCC rises, ML2D iterations) from the K-means classes and,
    with cfg.refine_restarts > 1, from random partitions (every pass over the particle's
    embedding neighbours and the `refine_wide` classes most similar to its own: all K when
    K <= refine_wide); the restart with the highest final ML2D log-likelihood (or mean NCC
    without that stage) is kept (no labels are used). Restarts and split-and-merge moves run
    only up to `cfg.refine_guards_max_k` classes (`guards_apply`).

    Above `cfg.refine_subset` particles the refinement runs on a seeded random subset of that
    size, noise-like picks (`refinement_rows`; particle_radius_px: the pick contrast's disc) are
    left out of it, and every particle is then assigned, in one streamed alignment pass, to the refined
    class references (all K of them, or its `cfg.assign_candidates` nearest classes in embedding
    space): cost and memory of refinement fixed, of assignment linear in n. With
    `cfg.refine_ml_iterations` > 0 the refinement ends with ML2D iterations from its classes
    (`ml2d.polish`), and that fitted model labels every particle (`ml2d.classify`, all K classes;
    with `cfg.assign_candidates` > 0 the NCC pass over the nearest classes does instead)."""
    t0 = time.time()
    cents = kmeans(features, k, cfg.n_init, seed, cfg.minibatch_above)
    labels, own, margin, near = assign(features, cents, cfg.candidates)
    timings = {"kmeans_s": time.time() - t0}
    log.info("K-means++ (%d initialisations) on %d x %d features: %.1f s", cfg.n_init, *features.shape, timings["kmeans_s"])
    result = Clustering(labels.copy(), labels, own, margin, cents, timings=timings)
    if not cfg.refine or images is None or k == 1:
        return with_stability(result, features, k, cfg, seed, images, device, particle_radius_px)
    a = _refine(result, features, images, near, k, cfg, seed, device, timings, particle_radius_px)
    final = class_means(features, a.labels, k, cents)
    _, own, margin, _ = assign(features, final, 1, labels=a.labels)
    result.labels, result.distance, result.margin, result.centroids = a.labels, own, margin, final
    result.angle_deg, result.shift_px, result.score = a.angle_deg, a.shift_px, a.score
    result.objective = float(a.score.mean())
    return with_stability(result, features, k, cfg, seed, images, device, particle_radius_px)


def with_stability(result: Clustering, features, k: int, cfg: ClusterConfig, seed: int, images=None,
                   device="auto", particle_radius_px: float | None = None) -> Clustering:
    """Seed stability of a finished clustering (labels 0..k-1 of every particle), filled into
    `result.stability` (k,) and `result.seed_ari`: `cfg.stability_runs` further runs of `cluster`
    (the same K-means start and refinement as the main run, stability runs off) on a random subset
    of at most `cfg.stability_subset` particles (stream [seed, STABILITY]), run r with its own
    seed stream_seed([seed, STABILITY, r]), so that the main run's streams are not touched; each
    is compared with the main run's labels of the same particles (`metrics.seed_stability`:
    per class the fraction of its particles that stay together, averaged over the runs; the mean
    adjusted Rand index). Classes with no particle in the subset get NaN. 0 runs: unchanged."""
    if cfg.stability_runs <= 0 or k < 2:
        return result
    t = time.time()
    rows = random_rows(len(features), cfg.stability_subset, [seed, STABILITY])
    if len(rows) < k:
        log.warning("seed stability skipped: a subset of %d particles for %d classes", len(rows), k)
        return result
    whole = len(rows) == len(features)
    sub_feats = features if whole else np.asarray(features[rows])
    sub_images = None if images is None else images if whole else RowView(images, rows)
    run_cfg = dataclasses.replace(cfg, stability_runs=0)
    runs = []
    for r in range(1, cfg.stability_runs + 1):
        log.info("seed stability: run %d of %d on %d particles", r, cfg.stability_runs, len(rows))
        runs.append(cluster(sub_feats, k, run_cfg, seed=stream_seed([seed, STABILITY, r]), images=sub_images,
                            device=device, particle_radius_px=particle_radius_px).labels)
    result.stability, result.seed_ari = seed_stability(result.labels[rows], runs, k)
    result.timings["stability_s"] = time.time() - t
    log.info("seed stability over %d run(s) on %d particles: ARI %.3f with the main run; class stability median %.2f, "
             "min %.2f; %.1f s", cfg.stability_runs, len(rows), result.seed_ari, float(np.nanmedian(result.stability)),
             float(np.nanmin(result.stability)), result.timings["stability_s"])
    return result


# --- command line: `clcluster cluster` -----------------------------------------------------------
def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--embeddings", nargs="+", required=True, help="per-shard embeddings, shard order")
    p.add_argument("--shard-stars", nargs="+", required=True, help="shard STAR files, same order")
    p.add_argument("--preprocessed", nargs="+", required=True, help="preprocessed shards, same order")
    p.add_argument("--classes", type=int, help="number of classes K (default: config classes)")
    p.add_argument("--out-dir", required=True)
    add_device(p)
    add_config(p)


def shard_rows(shard_stars) -> np.ndarray:
    """The input row of every particle of the shards, shard order (n,); checks that the shards
    hold every input row exactly once."""
    from clcluster.core.integrity import check_complete
    from clcluster.io.particles import ROW_COLUMN
    from clcluster.io.star import read_star

    rows = np.concatenate([read_star(s).particles[ROW_COLUMN].to_numpy() for s in shard_stars])
    check_complete(int(rows.max()) + 1 if len(rows) else 0, rows, "shards")
    return rows


def write_assignments(res, rows: np.ndarray, out_dir) -> dict:
    """labels.npy (n,) int32 and assignments.npz (per-particle arrays in input order, centroids,
    objective, seed stability: `stability_arrays`), written atomically. Returns the arrays."""
    from clcluster.io.atomic import atomic_path, save_npy

    order = np.argsort(rows)
    arrays = {key: v[order] for key, v in res.arrays().items() if v.shape[0] == len(rows)}
    arrays["centroids"] = res.centroids
    out = Path(out_dir)
    save_npy(out / "labels.npy", arrays["labels"].astype(np.int32))
    with atomic_path(out / "assignments.npz") as tmp:
        np.savez(tmp, **arrays, objective=np.float64(res.objective if res.objective is not None else np.nan),
                 **stability_arrays(res))
    return arrays


def stability_arrays(res: Clustering) -> dict:
    """assignments.npz's seed-stability entries where the runs ran: `stability` (k,) float64 (NaN:
    class empty on the subset) and `seed_ari` (0-d float64)."""
    if res.stability is None:
        return {}
    return {"stability": np.asarray(res.stability, dtype=np.float64), "seed_ari": np.float64(res.seed_ari)}


def main(args: argparse.Namespace) -> int:
    from clcluster.learn.data import ShardSet

    cfg = run_config(args)
    k = args.classes or cfg["classes"]
    if not (len(args.embeddings) == len(args.shard_stars) == len(args.preprocessed)):
        raise ValueError("give one embedding, one shard STAR and one preprocessed stack per shard, in the same order")
    rows = shard_rows(args.shard_stars)
    feats = merge_embeddings(args.embeddings)
    if len(feats) != len(rows):
        raise ValueError(f"{len(feats)} embeddings for {len(rows)} particles in the shards")
    meta = json.loads(Path(args.preprocessed[0]).with_suffix(".json").read_text())
    res = cluster(feats, k, ClusterConfig.from_dict(cfg["cluster"]), seed=cfg["seed"], images=ShardSet(args.preprocessed),
                  device=args.device or cfg["device"], particle_radius_px=meta.get("particle_radius_px"))
    labels = write_assignments(res, rows, args.out_dir)["labels"]
    if res.stability is not None:
        log.info("seed stability: ARI %.3f; per class %s", res.seed_ari, np.round(res.stability, 2).tolist())
    log.info("clustered %d particles into %d classes (sizes %s)", len(rows), k, np.bincount(labels, minlength=k).tolist())
    return 0

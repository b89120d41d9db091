"""Clustering: merge the shards' embeddings, K-means++ (scikit-learn; mini-batch above a size),
then the optional alignment-based refinement in which each particle is compared, over in-plane
rotations and shifts, only with the class averages of its m nearest centroids in embedding space.
"""
from __future__ import annotations

import dataclasses
import logging
import time

import numpy as np
import torch
from sklearn.cluster import KMeans, MiniBatchKMeans

from .align import PolarCache, PolarGrid, hard_em, soft_em
from .backend import torch_device
from .config import dataclass_from_dict

log = logging.getLogger(__name__)


@dataclasses.dataclass
class ClusterConfig:
    """See config.schema.yaml `cluster:`."""

    n_init: int = 10
    minibatch_above: int = 200_000
    candidates: int = 3
    refine: bool = True
    refine_method: str = "soft"
    refine_iterations: int = 25
    refine_anneal_iterations: int = 8
    refine_full_every: int = 4
    refine_restarts: int = 4
    refine_max_shift_px: int = 2
    refine_angles: int = 64

    @classmethod
    def from_dict(cls, d):
        return dataclass_from_dict(cls, d)


@dataclasses.dataclass
class Clustering:
    """Per particle (input order): 0-based label, distance to its centroid, margin to the
    second-nearest, K-means label before refinement, and the pose where refinement ran."""

    labels: np.ndarray
    kmeans_labels: np.ndarray
    distance: np.ndarray
    margin: np.ndarray
    centroids: np.ndarray
    angle_deg: np.ndarray | None = None
    shift_px: np.ndarray | None = None
    score: np.ndarray | None = None
    objective: float | None = None
    timings: dict = dataclasses.field(default_factory=dict)

    def arrays(self) -> dict:
        out = {k: v for k, v in dataclasses.asdict(self).items() if isinstance(v, np.ndarray)}
        return out


def kmeans(features: np.ndarray, k: int, n_init: int, seed: int, minibatch_above: int):
    """K-means++ on features (n, d); returns (labels, centroids (k, d))."""
    if len(features) < k:
        raise ValueError(f"{k} classes asked for but only {len(features)} particles")
    if len(features) > minibatch_above:
        km = MiniBatchKMeans(k, init="k-means++", n_init=n_init, random_state=seed, batch_size=4096)
    else:
        km = KMeans(k, init="k-means++", n_init=n_init, random_state=seed)
    labels = km.fit_predict(features)
    return labels.astype(np.int64), km.cluster_centers_.astype(np.float32)


def centroid_distances(features, centroids, batch: int = 65536) -> np.ndarray:
    """Euclidean distances (n, k), computed in batches."""
    out = np.empty((len(features), len(centroids)), np.float32)
    c2 = (centroids ** 2).sum(1)
    for s in range(0, len(features), batch):
        f = features[s:s + batch].astype(np.float32)
        out[s:s + batch] = np.sqrt(np.maximum((f ** 2).sum(1)[:, None] + c2[None] - 2 * f @ centroids.T, 0))
    return out


def nearest_centroids(dist: np.ndarray, m: int) -> np.ndarray:
    """The m nearest centroids of each particle (n, m), nearest first."""
    m = min(m, dist.shape[1])
    part = np.argpartition(dist, m - 1, axis=1)[:, :m]
    order = np.take_along_axis(dist, part, 1).argsort(1)
    return np.take_along_axis(part, order, 1)


def cluster(features: np.ndarray, k: int, cfg: ClusterConfig, seed: int = 0, images=None,
            device: str = "auto") -> Clustering:
    """K-means++ on L2-normalised features (n, d), then (if cfg.refine and `images` (n, box, box)
    array-like are given) alignment-based refinement with restarts from K-means runs of
    different seeds; the restart with the best mean NCC is kept (no labels are used)."""
    t0 = time.time()
    labels, cents = kmeans(features, k, cfg.n_init, seed, cfg.minibatch_above)
    dist = centroid_distances(features, cents)
    timings = {"kmeans_s": time.time() - t0}
    log.info("K-means++ (%d initialisations) on %d x %d features: %.1f s", cfg.n_init, *features.shape, timings["kmeans_s"])
    d_sorted = np.sort(dist, axis=1)
    result = Clustering(labels.copy(), labels, d_sorted[:, 0], d_sorted[:, 1] - d_sorted[:, 0] if k > 1 else np.zeros(len(labels), np.float32), cents, timings=timings)
    if not cfg.refine or images is None or k == 1:
        return result
    t1 = time.time()
    box = images.shape[-1] if hasattr(images, "shape") else images.box
    pg = PolarGrid(box, n_angles=cfg.refine_angles, max_shift=cfg.refine_max_shift_px)
    tdev = torch_device(device)
    cache = PolarCache(images, pg, tdev)
    best = None
    for r in range(cfg.refine_restarts):
        if r == 0:
            lab0, dist_r = labels, dist
        else:
            lab0, c_r = kmeans(features, k, 1, seed + 1000 * r, cfg.minibatch_above)
            dist_r = centroid_distances(features, c_r)
        cand = nearest_centroids(dist_r, cfg.candidates)
        if cfg.refine_method == "soft":
            res = soft_em(cache, lab0, k, cand, cfg.refine_iterations, cfg.refine_anneal_iterations, seed=seed + r,
                          log=log.info, full_every=cfg.refine_full_every, top_m=cfg.candidates)
        else:
            res = hard_em(cache, lab0, k, cand, cfg.refine_iterations, seed=seed + r, log=log.info)
        log.info("refinement restart %d: mean NCC %.4f after %d iterations", r + 1, res.objective, len(res.history))
        if best is None or res.objective > best.objective:
            best = dataclasses.replace(res, restart=r)
    a = best.alignment
    result.labels = a.labels
    # distances to the centroids of the final classes (mean feature of their members)
    final = np.stack([features[a.labels == j].mean(0) if np.any(a.labels == j) else cents[j] for j in range(k)])
    d = centroid_distances(features, final.astype(np.float32))
    own = d[np.arange(len(d)), a.labels]
    d[np.arange(len(d)), a.labels] = np.inf
    result.distance, result.margin, result.centroids = own, d.min(1) - own, final.astype(np.float32)
    result.angle_deg, result.shift_px, result.score = a.angle_deg, a.shift_px, a.score
    result.objective = best.objective
    timings["refine_s"] = time.time() - t1
    log.info("refinement: best restart %d (mean NCC %.4f), %.1f s", best.restart + 1, best.objective, timings["refine_s"])
    return result

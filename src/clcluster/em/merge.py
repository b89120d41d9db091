"""More classes than wanted, then merged: the references of an over-split classification (k2
classes) grouped into k by the similarity of their in-plane-aligned references, and one start
reference per group.

On a continuum of views a class of 2K narrower classes averages fewer, more alike particles, so
its reference is sharper; grouping those references by how well they match at their best
relative rotation and averaging each group gives K starts that carry the views better than K
classes fitted directly (docs/realistic.md, "Balanced priors and more classes, then merged").

Conventions as in `imageops.rotate`: angles in degrees, counter-clockwise; references (k, D, D)
in image units, centred on the box centre (D//2, D//2).
"""
from __future__ import annotations

import numpy as np
import torch
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.spatial.distance import squareform

from clcluster.em.align import PolarGrid, polar_transform, rotational_correlation, unit
from clcluster.image.imageops import rotate

__all__ = ["aligned_similarity", "group_references", "merged_references"]


def aligned_similarity(references: np.ndarray, n_angles: int = 64, max_shift: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Normalised correlation (k, k) of every pair of references (k, D, D) at their best relative
    in-plane rotation and integer shift (polar resampling about centres up to max_shift px from
    the box centre, n_angles rotation steps), and that rotation (k, k) in degrees:
    `rotate(references[j], angle[i, j])` matches references[i] best (up to the shift)."""
    box = references.shape[-1]
    pg = PolarGrid(box, n_angles=n_angles, max_shift=max_shift)
    polar = unit(polar_transform(torch.as_tensor(np.asarray(references, dtype=np.float32)), pg))  # (k, S, R, A)
    centre = int(np.argmin(np.abs(pg.offsets).sum(1)))
    f = torch.fft.rfft(polar, dim=-1)
    corr = rotational_correlation(f, f[:, centre], n_angles, per_particle=False).transpose(1, 2)  # (k, k, S, A)
    corr = corr.flatten(2)
    best, where = corr.max(dim=-1)
    steps = where.numpy() % n_angles
    best = torch.maximum(best, best.T)  # the same pair seen from either side
    return best.numpy(), (-steps * (360.0 / n_angles)) % 360.0


def group_references(similarity: np.ndarray, k: int) -> np.ndarray:
    """Groups (k2,) in [0, k) of k2 references from their similarity (k2, k2): average-linkage
    agglomeration on 1 - similarity, cut at k groups."""
    k2 = similarity.shape[0]
    if k2 <= k:
        return np.arange(k2)
    sym = (similarity + similarity.T) / 2
    dist = np.clip(1.0 - sym, 0.0, None)
    np.fill_diagonal(dist, 0.0)
    groups = fcluster(linkage(squareform(dist, checks=False), "average"), k, "maxclust") - 1
    return _renumber(groups)


def _renumber(groups: np.ndarray) -> np.ndarray:
    """Groups numbered 0.. in order of first appearance (no gaps)."""
    _, first, inverse = np.unique(groups, return_index=True, return_inverse=True)
    order = np.argsort(np.argsort(first))
    return order[inverse]


def merged_references(references: np.ndarray, sizes: np.ndarray, groups: np.ndarray,
                      angle_deg: np.ndarray) -> np.ndarray:
    """One reference (k, D, D) per group: the group's largest member reference (the lead) and
    the others rotated onto it (`aligned_similarity`'s angles, (k2, k2) degrees), weighted by
    their sizes (k2,) (expected class sizes, e.g. ML2D's posterior sums)."""
    k = int(groups.max()) + 1
    out = np.zeros((k,) + references.shape[1:], np.float32)
    for g in range(k):
        members = np.flatnonzero(groups == g)
        lead = members[np.argmax(sizes[members])]
        turned = rotate(np.asarray(references[members], np.float32), angle_deg[lead, members])
        w = np.maximum(np.asarray(sizes[members], np.float64), 1e-12)
        out[g] = np.tensordot(w / w.sum(), turned, axes=1)
    return out

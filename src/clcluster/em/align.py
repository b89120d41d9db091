"""In-plane alignment by polar cross-correlation, and alignment-based hard-EM classification.

Images (n, D, D) are resampled to polar coordinates (radii x angles) around a small grid of
integer centre offsets; the correlation with a reference over all in-plane rotations is one
FFT along the angle axis. Scores are normalised cross-correlations (NCC, in [-1, 1]) with the
area element r as weight. Torch on any device; batched so memory is bounded by the batch.

Pose convention: image ≈ shift_by(s) ∘ rotate_by(a) (reference), with `imageops.rotate`'s
angle a (degrees) and shift s = (dx, dy) px; `to_reference_frame` undoes it.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch
import torch.nn.functional as F

from clcluster.core.rng import SPLIT_MERGE_OFFSET
from clcluster.em import estep
from clcluster.image.polar import grid_sample_coordinates, linear_radii, polar_coordinates

# An EM pass that changes fewer than this fraction of the labels has converged (0.2 %: the
# labels of a few particles in a thousand flip back and forth between passes).
CONVERGED_FRACTION = 0.002
# Floor of a class's prior weight in the annealed EM, so that an emptied class can be refilled
# (log(0) would exclude it for good).
MIN_CLASS_WEIGHT = 1e-4
# A split class's two references are its reference -/+ this many of its standard deviations of
# white noise: enough to break the tie, small against the reference.
SPLIT_PERTURBATION = 0.1
# An empty class in hard EM is re-seeded with the mean of this many of the worst-fitting particles.
DONORS_PER_EMPTY_CLASS = 5
# Score elements (rotations x shifts x classes x images) of one batch when no batch size is
# given: about 16 MB of float32, which keeps the scan in cache-friendly pieces on CPU and GPU.
SCORE_BATCH_ELEMENTS = 4e6


@dataclasses.dataclass
class PolarGrid:
    """Polar sampling: n_radii from r_min to r_max px, n_angles over 360 degrees, centre offsets
    on the integer grid within a disc of radius max_shift px."""

    box: int
    n_radii: int = 16
    n_angles: int = 64
    max_shift: int = 2
    r_min: float = 1.0
    r_max: float | None = None

    def __post_init__(self):
        if self.r_max is None:
            self.r_max = self.box // 2 - 1 - self.max_shift
        g = range(-self.max_shift, self.max_shift + 1)
        self.offsets = np.array([(dx, dy) for dy in g for dx in g if dx * dx + dy * dy <= self.max_shift ** 2 + 1e-9], dtype=np.float32)

    @property
    def n_shifts(self) -> int:
        return len(self.offsets)

    def grid(self, device) -> torch.Tensor:
        """grid_sample grid (1, S*R, A, 2)."""
        r = linear_radii(self.r_min, self.r_max, self.n_radii, torch)
        x, y = polar_coordinates(self.box, r, self.n_angles, torch.from_numpy(self.offsets), xp=torch)
        g = grid_sample_coordinates(x, y, self.box, torch)
        return g.reshape(1, self.n_shifts * self.n_radii, self.n_angles, 2).to(device)

    def radial_weight(self, device) -> torch.Tensor:
        r = torch.linspace(self.r_min, self.r_max, self.n_radii, device=device)
        return r.sqrt()[:, None]


def polar_transform(images: torch.Tensor, pg: PolarGrid, grid=None) -> torch.Tensor:
    """Polar samples (n, S, R, A) of images (n, D, D) around each centre offset, weighted by
    sqrt(r), mean-removed and scaled to unit norm per (image, offset)."""
    n = images.shape[0]
    grid = pg.grid(images.device) if grid is None else grid
    p = F.grid_sample(images[:, None].float(), grid.expand(n, -1, -1, -1), mode="bilinear", align_corners=True)
    p = p.reshape(n, pg.n_shifts, pg.n_radii, pg.n_angles) * pg.radial_weight(images.device)
    return unit(p)


def unit(p: torch.Tensor) -> torch.Tensor:
    """Remove the mean and scale to unit norm over the last two axes (radii, angles)."""
    p = p - p.mean(dim=(-2, -1), keepdim=True)
    return p / p.flatten(-2).norm(dim=-1).clamp_min(1e-12)[..., None, None]


def rotational_correlation(pf: torch.Tensor, qf: torch.Tensor, n_angles: int, per_particle: bool) -> torch.Tensor:
    """NCC over all rotations. pf: rFFT along angle of image polars (n, S, R, F); qf: of the
    references, (K, R, F) or (n, m, R, F) with per_particle. Returns (n, S, K|m, A)."""
    if per_particle:
        prod = torch.einsum("nsrf,nkrf->nskf", pf, qf.conj())
    else:
        prod = torch.einsum("nsrf,krf->nskf", pf, qf.conj())
    return torch.fft.irfft(prod, n=n_angles, dim=-1)


@dataclasses.dataclass
class Alignment:
    """Best class, score and pose of each particle."""

    labels: np.ndarray  # (n,) 0-based class
    score: np.ndarray  # (n,) best NCC
    angle_deg: np.ndarray  # (n,) in-plane rotation a of the pose
    shift_px: np.ndarray  # (n, 2) (dx, dy) of the pose
    second_score: np.ndarray  # (n,) best NCC with any other candidate class


def align_batch(pf: torch.Tensor, ref_f: torch.Tensor, pg: PolarGrid, candidates: torch.Tensor | None):
    """Best (class, score, rotation index, offset index, second score) for a batch of image
    polars in Fourier form pf (n, S, R, F) against references ref_f (K, R, F). `candidates`
    (n, m) restricts each particle to m classes (cost flat in K)."""
    if candidates is not None:
        corr = rotational_correlation(pf, ref_f[candidates], pg.n_angles, per_particle=True)
    else:
        corr = rotational_correlation(pf, ref_f, pg.n_angles, per_particle=False)
    cls, score, rot, off, second, _ = best_pose(corr, candidates)
    return cls, score, rot, off, second


def best_pose(corr: torch.Tensor, candidates: torch.Tensor | None):
    """From correlations (n, S, K', A): best class (an index into `candidates` (K',) or (n, K')
    mapped back to a class when given), its score, rotation index, offset index, the second-best class's score,
    and the best score per class over poses (n, K')."""
    n, s, k, a = corr.shape
    best_over_pose, arg_pose = corr.permute(0, 2, 1, 3).reshape(n, k, s * a).max(dim=-1)  # (n, k)
    top = best_over_pose.topk(min(2, k), dim=1)
    cls = top.indices[:, 0]
    pose = arg_pose.gather(1, cls[:, None])[:, 0]
    second = top.values[:, 1] if k > 1 else torch.full_like(top.values[:, 0], -1.0)
    if candidates is not None:
        cls = estep.candidate_classes(candidates, cls[:, None])[:, 0]
    return cls, top.values[:, 0], pose % a, pose // a, second, best_over_pose


class PolarCache:
    """Image polars (rFFT along angle) for a fixed image set, computed batch by batch; kept in
    memory only while they fit in `max_bytes`, else recomputed from `images` each pass.
    Iterating gives (first row, angular spectra (M, b*S, R)) per batch, the layout of the
    E-step engine (`estep`); `estep.image_major` views them as (b, S, R, M)."""

    def __init__(self, images, pg: PolarGrid, device="cpu", batch_size: int = 512, max_bytes: float = 2e9):
        """images: (n, D, D) array-like whose slices give float images (NumPy array, memory map,
        `data.ShardSet`, `data.RowView`)."""
        self.images, self.pg, self.device, self.bs = images, pg, torch.device(device), batch_size
        self.grid = pg.grid(self.device)
        n = len(images)
        need = n * pg.n_shifts * pg.n_radii * (pg.n_angles // 2 + 1) * 8
        self.cache = [] if need <= max_bytes else None
        if self.cache is not None:
            for s, pf in self._compute():
                self.cache.append((s, pf))

    def _compute(self):
        for s in range(0, len(self.images), self.bs):
            x = torch.as_tensor(np.asarray(self.images[s:s + self.bs], dtype=np.float32), device=self.device)
            yield s, estep.angular_spectrum(polar_transform(x, self.pg, self.grid))

    def __iter__(self):
        return iter(self.cache) if self.cache is not None else self._compute()

    def __len__(self):
        return len(self.images)


def align_all(cache: PolarCache, refs_polar: torch.Tensor, candidates: np.ndarray | None = None,
              accumulate: bool = True):
    """Align every particle to its best candidate reference; returns (Alignment, new reference
    polars (K, R, A) as aligned member means or None, per-class counts)."""
    pg = cache.pg
    k = refs_polar.shape[0]
    ref_f = torch.fft.rfft(unit(refs_polar), dim=-1)
    n = len(cache)
    out = {key: np.empty(n, dtype) for key, dtype in (("labels", np.int64), ("score", np.float32), ("rot", np.int64),
                                                       ("off", np.int64), ("second", np.float32))}
    sums = torch.zeros((k, pg.n_radii, pg.n_angles), device=cache.device) if accumulate else None
    counts = torch.zeros(k, device=cache.device)
    cand_t = torch.as_tensor(candidates, device=cache.device) if candidates is not None else None
    for s, spec in cache:
        pf = estep.image_major(spec, pg.n_shifts)
        b = pf.shape[0]
        cand = cand_t[s:s + b] if cand_t is not None else None
        cls, score, rot, off, second = align_batch(pf, ref_f, pg, cand)
        for key, v in (("labels", cls), ("score", score), ("rot", rot), ("off", off), ("second", second)):
            out[key][s:s + b] = v.cpu().numpy()
        if accumulate:
            # aligned polar of each particle: its samples at the best offset, rolled by -rot
            p = torch.fft.irfft(pf[torch.arange(b), off], n=pg.n_angles, dim=-1)  # (b, R, A)
            idx = (torch.arange(pg.n_angles, device=p.device)[None, :] + rot[:, None]) % pg.n_angles
            aligned = p.gather(2, idx[:, None, :].expand(-1, pg.n_radii, -1))
            sums.index_add_(0, cls, aligned)
        counts += torch.bincount(cls, minlength=k).float()
    rot_deg = (-out["rot"] % pg.n_angles) * (360.0 / pg.n_angles)
    res = Alignment(out["labels"], out["score"], rot_deg.astype(np.float32), pg.offsets[out["off"]], out["second"])
    new_refs = sums / counts.clamp_min(1)[:, None, None] if accumulate else None
    return res, new_refs, counts.cpu().numpy()


def soft_align_all(cache: PolarCache, refs_polar: torch.Tensor, candidates: np.ndarray | None, beta: float,
                   log_prior: torch.Tensor, top_m: int = 0):
    """One soft-EM pass: responsibilities over candidate classes x shifts x rotations,
    w ∝ prior_k exp(beta * NCC), and the new references as responsibility-weighted sums of the
    particles brought into each class's frame (the E-step engine `estep`, with candidates None
    as the list of all classes). Returns (hard Alignment of the best-scoring pose, new
    references (K, R, A), class weights (K,), and with top_m > 0 the top_m best-scoring classes
    of each particle (n, top_m) or None). Repeated candidates of a particle count once."""
    pg = cache.pg
    k = refs_polar.shape[0]
    wq = torch.fft.rfft(unit(refs_polar), dim=-1).permute(2, 0, 1).conj()  # (M, K, R): scores are NCC
    bias = log_prior[None, :].expand(pg.n_shifts, -1)
    n = len(cache)
    sums = torch.zeros((pg.n_angles // 2 + 1, k, pg.n_radii), dtype=torch.complex64, device=cache.device)
    weights = torch.zeros(k, device=cache.device)
    hard = {key: np.empty(n, dt) for key, dt in (("labels", np.int64), ("score", np.float32), ("rot", np.int64),
                                                  ("off", np.int64), ("second", np.float32))}
    cand_t = torch.as_tensor(candidates, device=cache.device) if candidates is not None else None
    every = estep.all_classes(k, cache.device)
    top_classes = np.empty((n, top_m), np.int64) if top_m else None
    for s, spec in cache:
        b = spec.shape[1] // pg.n_shifts
        cand = cand_t[s:s + b] if cand_t is not None else every
        corr = estep.scores(spec, wq, cand, pg.n_shifts, pg.n_angles)  # (b, S, c, A) NCC
        # most probable pose, for the hard labels and the objective
        cls, score, rot, off, second, best_over_pose = best_pose(corr, cand)
        if top_m:
            top_classes[s:s + b] = _top_classes(best_over_pose, cand, top_m)
        for key, v in (("labels", cls), ("score", score), ("rot", rot), ("off", off), ("second", second)):
            hard[key][s:s + b] = v.cpu().numpy()
        post = estep.posterior(corr, bias, cand, scale=beta)
        estep.back_project(post, spec, sums)
        weights += post.class_probability(k).sum(0)
    rot_deg = (-hard["rot"] % pg.n_angles) * (360.0 / pg.n_angles)
    res = Alignment(hard["labels"], hard["score"], rot_deg.astype(np.float32), pg.offsets[hard["off"]], hard["second"])
    refs = torch.fft.irfft(sums, n=pg.n_angles, dim=0).permute(1, 2, 0) / weights.clamp_min(1e-6)[:, None, None]
    return res, refs, weights, top_classes


def _top_classes(best_over_pose: torch.Tensor, cand: torch.Tensor, top_m: int) -> np.ndarray:
    """The top_m best-scoring classes (n, top_m) of each particle from its best score per
    candidate (n, c) (the last repeated when c < top_m)."""
    t = best_over_pose.topk(min(top_m, best_over_pose.shape[1]), dim=1).indices
    t = estep.candidate_classes(cand, t).cpu().numpy()
    return t if t.shape[1] == top_m else np.pad(t, ((0, 0), (0, top_m - t.shape[1])), mode="edge")


def effective_samples(pg: PolarGrid) -> float:
    """Independent pixels in the annulus the polar grid covers (pi (r_max^2 - r_min^2))."""
    return float(np.pi * (pg.r_max ** 2 - pg.r_min ** 2))


def soft_em(cache: PolarCache, labels0: np.ndarray, k: int, candidates: np.ndarray | None = None,
            max_iter: int = 20, anneal_iterations: int = 8, seed: int = 0, log=None,
            full_every: int = 0, top_m: int = 3, refs0: torch.Tensor | None = None, c0: float = 0.3,
            wide: int = 0) -> RefineResult:
    """Alignment-based EM with deterministic annealing, from a starting partition.

    Each particle's responsibility over its candidate classes, shifts and rotations is
    ∝ alpha_k exp(beta_t NCC); beta_t rises linearly over `anneal_iterations` to the value a
    white-noise model implies, beta = c N / (1 - c^2) (c: mean best NCC, N: independent pixels
    in the annulus), so early passes average over poses and classes and escape the local optima
    of hard assignment; class priors alpha are re-estimated. Stops when the most probable labels
    change for < 0.2 % of the particles after annealing.

    candidates (n, m): the classes each particle is compared with (e.g. its m nearest centroids
    in embedding space); None compares with all K. With full_every = T > 0 every T-th pass
    compares with all K and each particle's `top_m` best-scoring classes from that pass join
    its candidates until the next full pass (the cost of the other passes stays flat in K).
    With 0 < wide < K those "full" passes compare each particle with its candidates and the
    `wide` references most similar to its current class's (`similar_classes`), so that every
    pass costs N x (m + wide), flat in K; wide = 0 or >= K compares with all K.
    refs0 (K, R, A): start from these references instead of labels0's class means."""
    if refs0 is None:
        g = torch.Generator().manual_seed(seed)
        refs = class_polar_means(cache, labels0, k)
        refs = refs + 0.05 * refs.std() * torch.randn(refs.shape, generator=g).to(refs.device)
    else:
        refs = refs0
    n_eff = effective_samples(cache.pg)
    log_prior = torch.full((k,), -np.log(k), device=cache.device)
    labels, history, res, c = labels0.copy(), [], None, c0
    recent_top = None
    for it in range(max_iter):
        beta_full = c * n_eff / max(1 - c * c, 1e-3)
        beta = beta_full * min(1.0, (it + 1) / max(anneal_iterations, 1))
        full = candidates is None or (full_every > 0 and it % full_every == 0)
        if full:
            cand_it = None if candidates is None or not 0 < wide < k else \
                np.concatenate([candidates, similar_classes(refs, wide)[labels]], axis=1)
        elif recent_top is not None:
            cand_it = np.concatenate([candidates, recent_top], axis=1)
        else:
            cand_it = candidates
        res, refs, weights, top = soft_align_all(cache, refs, cand_it, beta, log_prior, top_m if full and candidates is not None else 0)
        if top is not None:
            recent_top = top
        log_prior = torch.log((weights / weights.sum()).clamp_min(MIN_CLASS_WEIGHT))
        c = float(res.score.mean())
        history.append(c)
        changed = float((res.labels != labels).mean())
        labels = res.labels
        if log:
            log(f"  iteration {it + 1}{' (all classes)' if full else ''}: beta {beta:.0f}, mean NCC {c:.4f}, {changed:.1%} labels changed")
        if it + 1 >= anneal_iterations and changed < CONVERGED_FRACTION:
            break
    return RefineResult(res, history[-1], history, 0, refs)


def reference_similarity(refs: torch.Tensor) -> torch.Tensor:
    """NCC (K, K) between polar references (K, R, A) at their best relative rotation."""
    f = torch.fft.rfft(unit(refs), dim=-1)
    return rotational_correlation(f[:, None], f, refs.shape[-1], per_particle=False)[:, 0].max(dim=-1).values


def similar_classes(refs: torch.Tensor, wide: int) -> np.ndarray:
    """For each class, the `wide` classes (itself first) whose polar references (K, R, A) match
    its own best over rotation: (K, wide) indices."""
    sim = reference_similarity(refs)
    sim.fill_diagonal_(float("inf"))
    return sim.topk(min(wide, sim.shape[0]), dim=1).indices.cpu().numpy()


def rotate_polar_to(ref: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """`ref` (R, A) rolled along the angle to its best match with `target` (R, A)."""
    corr = torch.fft.irfft((torch.fft.rfft(unit(target), dim=-1) * torch.fft.rfft(unit(ref), dim=-1).conj()).sum(0),
                           n=ref.shape[-1], dim=-1)
    return torch.roll(ref, int(corr.argmax()), dims=-1)


def split_merge_moves(refs: torch.Tensor, labels: np.ndarray, score: np.ndarray, k: int, trials: int):
    """Candidate moves (j, i, l): free class j (merging it into class i, or with i = -1 just
    dropping it so that its members go where they fit) and use it to split class l. Classes to
    free, alternately: the smaller of the next most similar pair of references, the next
    smallest class; classes to split, alternately: the next largest, the next worst-fitting
    (lowest mean NCC of its members). Moves are listed best candidates first."""
    counts = np.bincount(labels, minlength=k)
    fit = np.bincount(labels, weights=score, minlength=k) / np.maximum(counts, 1)
    sim = reference_similarity(refs).cpu().numpy()
    np.fill_diagonal(sim, -2.0)
    pairs = []
    for flat in np.argsort(-sim, axis=None):
        a, b = divmod(int(flat), k)
        if a < b:
            pairs.append((a, b) if counts[a] <= counts[b] else (b, a))
    smallest = [(int(j), -1) for j in np.argsort(counts, kind="stable")]
    free = _interleave(pairs, smallest)
    split = _interleave([int(c) for c in np.argsort(-counts, kind="stable")], [int(c) for c in np.argsort(fit, kind="stable")])
    moves, seen = [], set()
    for rank in range(len(free)):
        for j, i in free[: rank + 1]:
            for l in split[: rank + 1]:
                key = (j, i, l)
                if l != j and counts[l] >= 4 and key not in seen:
                    seen.add(key)
                    moves.append(key)
        if len(moves) >= trials:
            break
    return moves[:trials]


def _interleave(a: list, b: list) -> list:
    """a0, b0, a1, b1, ... without repeats."""
    out = []
    for pair in zip(a, b):
        for x in pair:
            if x not in out:
                out.append(x)
    return out


def split_merge(cache: PolarCache, best: RefineResult, k: int, candidates: np.ndarray | None,
                trials: int = 6, iterations: int = 6, rounds: int = 4, seed: int = 0, log=None) -> RefineResult:
    """Split-and-merge moves (after Ueda et al., Neural Comput. 12 (2000), for EM) against the
    local optima that EM from any start tends to reach: one view held by two classes (or a
    class of scraps) while two other views share one class. A move frees one class (merged into
    its most similar class, or dropped) and splits another into two (its reference plus and
    minus a small random perturbation), then runs `iterations` EM passes at the full inverse
    temperature from those references; it is kept only if the mean best NCC (the refinement's
    objective) rises. Up to `trials` moves a round (`split_merge_moves`), `rounds` rounds."""
    g = torch.Generator().manual_seed(seed + SPLIT_MERGE_OFFSET)
    for rnd in range(rounds):
        a, refs = best.alignment, best.refs
        counts = np.bincount(a.labels, minlength=k)
        improved = False
        for j, i, l in split_merge_moves(refs, a.labels, a.score, k, trials):
            new = refs.clone()
            if i >= 0:
                wi, wj = float(counts[i]), float(counts[j])
                new[i] = (wi * refs[i] + wj * rotate_polar_to(refs[j], refs[i])) / max(wi + wj, 1.0)
            delta = SPLIT_PERTURBATION * refs[l].std() * torch.randn(refs[l].shape, generator=g).to(refs.device)
            new[l], new[j] = refs[l] + delta, refs[l] - delta
            if candidates is None:
                cand = None
            else:
                extra = np.array([j, l] + ([i] if i >= 0 else []))
                cand = np.concatenate([a.labels[:, None], candidates, np.broadcast_to(extra, (len(a.labels), len(extra)))], axis=1)
            trial = soft_em(cache, a.labels, k, cand, iterations, anneal_iterations=1, seed=seed, refs0=new,
                            full_every=0, c0=best.objective)
            kept = trial.objective > best.objective
            if log:
                what = f"merge {j + 1} into {i + 1}" if i >= 0 else f"drop {j + 1}"
                log(f"  split/merge round {rnd + 1}: {what}, split {l + 1}: mean NCC {best.objective:.4f} -> "
                    f"{trial.objective:.4f}{' (kept)' if kept else ''}")
            if kept:
                best = dataclasses.replace(trial, restart=best.restart, history=best.history + trial.history)
                improved = True
                break
        if not improved:
            break
    return best


def class_polar_means(cache: PolarCache, labels: np.ndarray, k: int) -> torch.Tensor:
    """Unaligned polar means (K, R, A) of each class at the centre offset (rotational blurs;
    the starting references of the hard EM)."""
    pg = cache.pg
    centre = int(np.argmin(np.abs(pg.offsets).sum(1)))
    sums = torch.zeros((k, pg.n_radii, pg.n_angles), device=cache.device)
    lab = torch.as_tensor(np.array(labels, dtype=np.int64), device=cache.device)  # a copy: labels may be read-only
    for s, spec in cache:
        p = torch.fft.irfft(estep.image_major(spec, pg.n_shifts)[:, centre], n=pg.n_angles, dim=-1)
        sums.index_add_(0, lab[s:s + p.shape[0]], p)
    counts = torch.bincount(lab, minlength=k).float().clamp_min(1)
    return sums / counts[:, None, None]


@dataclasses.dataclass
class RefineResult:
    alignment: Alignment
    objective: float  # mean best NCC
    history: list  # objective per iteration
    restart: int
    refs: torch.Tensor | None = None  # final class references, polar (K, R, A)


def hard_em(cache: PolarCache, labels0: np.ndarray, k: int, candidates: np.ndarray | None = None,
            max_iter: int = 15, seed: int = 0, log=None) -> RefineResult:
    """Alignment-based hard EM from a starting partition: assign each particle to the candidate
    class whose average it matches best over rotations and shifts, rebuild averages from aligned
    members, repeat until labels stop changing. Empty classes are re-seeded with the particles
    that fit their class worst."""
    g = torch.Generator().manual_seed(seed)
    refs = class_polar_means(cache, labels0, k)
    refs = refs + 0.05 * refs.std() * torch.randn(refs.shape, generator=g).to(refs.device)  # break rotational symmetry
    labels = labels0.copy()
    history = []
    res = None
    for it in range(max_iter):
        res, new_refs, counts = align_all(cache, refs, candidates)
        history.append(float(res.score.mean()))
        changed = float((res.labels != labels).mean())
        labels = res.labels
        empty = np.flatnonzero(counts == 0)
        if empty.size:
            worst = np.argsort(res.score)[: empty.size * DONORS_PER_EMPTY_CLASS]
            for j, e in enumerate(empty):
                donors = worst[j * DONORS_PER_EMPTY_CLASS:(j + 1) * DONORS_PER_EMPTY_CLASS]
                new_refs[e] = class_polar_means_subset(cache, donors)
        refs = new_refs
        if log:
            log(f"  iteration {it + 1}: mean NCC {history[-1]:.4f}, {changed:.1%} labels changed")
        if changed < CONVERGED_FRACTION and it > 0:
            break
    return RefineResult(res, history[-1], history, 0, refs)


def polar_references(refs, pg: PolarGrid, device="cpu") -> torch.Tensor:
    """Polar references (K, R, A) of Cartesian images (K, D, D) about the box centre."""
    refs = np.asarray(refs, dtype=np.float32)
    return class_polar_means(PolarCache(refs, pg, device), np.arange(len(refs)), len(refs))


def class_polar_means_subset(cache: PolarCache, rows: np.ndarray) -> torch.Tensor:
    """Polar mean (R, A) of a few particles at the centre offset."""
    lab = np.full(len(cache), 1, dtype=np.int64)
    lab[rows] = 0
    return class_polar_means(cache, lab, 2)[0]


def to_reference_frame(images, angle_deg, shift_px):
    """Undo each particle's pose: shift by -s, then rotate by -a. images (n, D, D) NumPy/CuPy."""
    from clcluster.image.imageops import fourier_shift, rotate

    return rotate(fourier_shift(images, -np.asarray(shift_px)), -np.asarray(angle_deg))


# ---------------------------------------------------------------------------------------------
# rotation / shift scan with exact area weights: the E-step of ml2d and the oracle baseline
class PolarScanner:
    """Polar resampling of images about S integer-shifted centres, and correlation with
    references over all n_rotations in-plane rotations at once.

    box: image side D (px). n_rotations: angle samples = rotation steps (360/n_rotations deg).
    max_shift: shifts (dx, dy) are the integer points with |t| <= max_shift px (a disc).
    r_max: disc radius (px) used around each centre; default D//2 - 1 - ceil(max_shift), so
    that shifted discs stay inside the box. n_radii: radial samples (midpoint rule, default
    spacing <= 0.75 px).

    Layouts: an image batch's polar spectrum is (M, b*S, n_radii) complex (M = n_rotations//2+1
    angular frequencies, row b*S + s for image b at shift s); references are (M, K, n_radii);
    correlations are (n_rotations, b*S, K) with
    C[r, b*S+s, k] = sum_rho w_rho sum_theta P_bs(rho, theta) Q_k(rho, theta - r),
    i.e. <x_b, T_{t_s} Rot_{phi_r} Q_k> with phi_r = -360 r / n_rotations degrees.
    """

    def __init__(self, box: int, n_rotations: int = 64, max_shift: float = 3, r_max: float | None = None,
                 n_radii: int | None = None, device="cpu"):
        self.box, self.n_rot = int(box), int(n_rotations)
        self.device = torch.device(device)
        self.max_shift = float(max_shift)
        r_max = box // 2 - 1 - math.ceil(max_shift) if r_max is None else float(r_max)
        if r_max <= 1 or r_max + max_shift > box // 2:
            raise ValueError(f"r_max {r_max} px with max_shift {max_shift} px does not fit a {box} px box")
        self.r_max = float(r_max)
        self.n_radii = int(n_radii or math.ceil(self.r_max / 0.75))
        dr = self.r_max / self.n_radii
        self.radii = (torch.arange(self.n_radii, dtype=torch.float64) + 0.5) * dr
        self.weights = (self.radii * dr * (2 * math.pi / self.n_rot)).to(torch.float32).to(self.device)  # (Nr,)
        m = int(math.floor(self.max_shift))
        sh = [(dx, dy) for dy in range(-m, m + 1) for dx in range(-m, m + 1) if dx * dx + dy * dy <= self.max_shift ** 2 + 1e-6]
        self.shifts = np.asarray(sh, dtype=np.float32).reshape(-1, 2)  # (S, 2) = (dx, dy) px
        self.n_shifts = len(self.shifts)
        self.shift_d2 = (self.shifts.astype(np.float64) ** 2).sum(1)  # (S,) squared shift lengths, px^2
        xs, ys = polar_coordinates(box, self.radii, self.n_rot, torch.from_numpy(self.shifts).double(), xp=torch)
        grid = grid_sample_coordinates(xs, ys, box, torch, scale_first=True)  # (S, Nr, Na, 2), align_corners=True
        self.grid = grid.reshape(1, self.n_shifts * self.n_radii, self.n_rot, 2).to(torch.float32).to(self.device)
        self.n_freq = self.n_rot // 2 + 1

    # -- images ---------------------------------------------------------------------------
    def polar(self, images: torch.Tensor, centred_only: bool = False) -> torch.Tensor:
        """Polar samples (b, S, Nr, Na) of images (b, D, D) (bilinear), or (b, 1, Nr, Na) about the centre only."""
        b = images.shape[0]
        s = 1 if centred_only else self.n_shifts
        grid = self.grid
        if centred_only:
            s0 = int(np.flatnonzero((self.shifts == 0).all(1))[0])
            grid = grid[:, s0 * self.n_radii:(s0 + 1) * self.n_radii]
        out = F.grid_sample(images[None].float(), grid, mode="bilinear", padding_mode="zeros", align_corners=True)
        return out.reshape(b, s, self.n_radii, self.n_rot)

    def spectrum(self, polar: torch.Tensor) -> torch.Tensor:
        """Angular spectrum (M, b*S, Nr) complex of polar samples (b, S, Nr, Na)."""
        return estep.angular_spectrum(polar)

    def transform(self, images) -> torch.Tensor:
        """(M, b*S, Nr) angular spectra of images (b, D, D) at every shift."""
        return self.spectrum(self.polar(torch.as_tensor(images, device=self.device)))

    # -- references -----------------------------------------------------------------------
    def reference_spectrum(self, references) -> torch.Tensor:
        """(M, K, Nr) angular spectra of Cartesian references (K, D, D), about the centre."""
        p = self.polar(torch.as_tensor(references, device=self.device), centred_only=True)
        return self.spectrum(p)

    def weighted_conj(self, ref_spec: torch.Tensor) -> torch.Tensor:
        """Real matrix (M, 2*Nr, 2*K) of reference spectra (M, K, Nr) weighted by the area
        elements of the radii (`estep.real_matrix`), for `correlate`."""
        return estep.real_matrix(estep.conj_weighted(ref_spec, self.weights))

    def correlate(self, img_spec: torch.Tensor, ref_w: torch.Tensor) -> torch.Tensor:
        """Correlations (Na, b*S, K) of image spectra (M, b*S, Nr) with references given as
        `weighted_conj(...)`, over all rotations (`estep.correlate`)."""
        return estep.correlate(img_spec, ref_w, self.n_rot)

    def polar_from_spectrum(self, spec: torch.Tensor) -> torch.Tensor:
        """Real polar samples (K, Nr, Na) from spectra (M, K, Nr)."""
        return torch.fft.irfft(spec, n=self.n_rot, dim=0).permute(1, 2, 0)

    def weighted_norm2(self, spec: torch.Tensor) -> torch.Tensor:
        """sum_rho w_rho sum_theta Q(rho, theta)^2 for spectra (M, K, Nr) -> (K,)."""
        p = self.polar_from_spectrum(spec)
        return (p.pow(2).sum(-1) * self.weights).sum(-1)

    def to_cartesian(self, spec: torch.Tensor) -> np.ndarray:
        """Cartesian images (K, D, D) interpolated from polar references (M, K, Nr); 0 outside r_max."""
        p = self.polar_from_spectrum(spec).float()  # (K, Nr, Na)
        p = torch.cat([p, p[..., :1]], dim=-1)[:, None]  # wrap in angle: (K, 1, Nr, Na+1)
        c = self.box // 2
        g = torch.arange(self.box, dtype=torch.float64, device=self.device) - c
        y, x = torch.meshgrid(g, g, indexing="ij")
        rho = torch.sqrt(x * x + y * y)
        theta = torch.remainder(torch.atan2(y, x), 2 * math.pi)
        dr = self.r_max / self.n_radii
        ri = (rho / dr - 0.5).clamp(0, self.n_radii - 1)
        ti = theta / (2 * math.pi / self.n_rot)
        grid = torch.stack([ti * (2.0 / self.n_rot) - 1, ri * (2.0 / max(self.n_radii - 1, 1)) - 1], dim=-1)
        grid = grid[None].expand(p.shape[0], -1, -1, -1).float()
        out = F.grid_sample(p, grid, mode="bilinear", padding_mode="border", align_corners=True)[:, 0]
        out = out * (rho <= self.r_max + 0.5 * dr).float()
        return out.cpu().numpy().astype(np.float32)

    # -- poses ----------------------------------------------------------------------------
    def rotation_deg(self, r_index) -> np.ndarray:
        """Rotation (degrees, imageops convention) of reference->image for rotation indices."""
        return np.mod(-360.0 * np.asarray(r_index, dtype=np.float64) / self.n_rot, 360.0)

    def shift_px(self, s_index) -> np.ndarray:
        """(dx, dy) px of shift indices, (n, 2)."""
        return self.shifts[np.asarray(s_index)]

    def batches(self, n: int, k: int, batch_size: int | None, budget: float = SCORE_BATCH_ELEMENTS):
        """Slices over n images, sized so that one batch's score array (Na*b*S*K) stays near `budget`."""
        if batch_size is None:
            batch_size = max(1, int(budget // (self.n_rot * self.n_shifts * max(k, 1))))
        return [slice(s, min(n, s + batch_size)) for s in range(0, n, batch_size)]

"""Maximum-likelihood multi-reference 2D classification (ML2D) after Scheres et al.,
J. Mol. Biol. 348 (2005) 139-149, in PyTorch (CPU or GPU), batched.

Model: image x_i (D x D pixels) = T_t Rot_phi Q_k + white Gaussian noise of one variance
sigma^2, where Q_k is one of K references supported on a disc of radius `r_max` px (zero
outside), Rot_phi an in-plane rotation (uniform prior over `n_rotations` steps of
360/n_rotations degrees), T_t an integer translation t = (dx, dy) px with |t| <= max_shift
(Gaussian prior with a fitted width, Xmipp's sigma_offset, or uniform) and k drawn with
probability alpha_k. Class, rotation and shift are marginalised in the E-step (log-sum-exp
over K x rotations x shifts); the M-step updates the references (posterior-weighted averages
of the images brought back to the reference frame), alpha, sigma and the shift prior.

Computation (what makes it fast on a CPU): every image is resampled, once, to polar coordinates
about each of the S candidate centres (n_radii x n_rotations samples inside the disc); a rotation
is then a circular roll along the angle axis, so one FFT along the angle gives the
cross-correlation with a reference at all rotations at once, and the sum over radii is a small
complex matrix product. The references live in that polar representation (area weights
rho * d_rho * d_theta make the inner products approximate the Cartesian ones over the disc);
||x_i||^2 over the whole box is exact. EM is exact for this discretised model, so the
log-likelihood never decreases. Cartesian references are interpolated from the polar ones at
the end. That machinery is `align.PolarScanner` (the oracle baseline uses it too).

Conventions as in `imageops`: angles in degrees counter-clockwise, shifts (dx, dy) in pixels;
for particle i with class k, `imageops.rotate(references[k][None], rotation_deg[i], shift[i])`
approximates the image.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import numpy as np
import torch
from scipy.optimize import minimize_scalar

from clcluster.em import estep
from clcluster.em.align import CONVERGED_FRACTION, PolarScanner, to_reference_frame
from clcluster.core.rng import POLISH

__all__ = ["ML2D", "ML2DResult", "SparseSchedule", "balanced_prior", "classify", "log_evidence", "ml2d", "polish"]

# Balanced class priors: how far (a factor either way) a class's prior may move from 1/K.
BALANCE_MAX_RATIO = 4.0


# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class ML2DResult:
    """labels (n,) int; references (K, D, D) float32 (Cartesian, interpolated from the polar
    model, 0 outside r_max); log_likelihood_history (per EM iteration of the kept start);
    log_likelihood (final, nats, whole data set); alpha (K,) class priors; sigma (noise std,
    image units); rotation_deg (n,) and shift (n, 2) = (dx, dy) px: most probable pose within
    the assigned class; class_probability (n, K) posteriors; offset_sigma: fitted std (px) of
    the Gaussian shift prior (None if uniform); start_log_likelihoods: final LL of every start;
    model: what `classify` needs to assign more images with the fitted model."""

    labels: np.ndarray
    references: np.ndarray
    log_likelihood_history: list
    log_likelihood: float
    alpha: np.ndarray
    sigma: float
    rotation_deg: np.ndarray
    shift: np.ndarray
    class_probability: np.ndarray
    offset_sigma: float | None
    start_log_likelihoods: list
    n_iter: int
    model: dict | None = None  # the fitted model (scanner, polar reference spectra, alpha, sigma^2, shift prior) for `classify`


def _fit_offset_sigma(counts: np.ndarray, d2: np.ndarray, lo: float, hi: float, old: float) -> float:
    """Width tau (px) of a discrete Gaussian prior over shifts maximising sum_s counts_s log pi_s(tau)."""
    def negll(log_tau):
        a = -d2 / (2 * math.exp(2 * log_tau))
        lse = a.max() + math.log(np.exp(a - a.max()).sum())
        return -float((counts * (a - lse)).sum())
    res = minimize_scalar(negll, bounds=(math.log(lo), math.log(hi)), method="bounded", options={"xatol": 1e-4})
    return float(math.exp(res.x)) if res.fun <= negll(math.log(old)) else old


def _log_shift_prior(d2: np.ndarray, tau: float, shift_prior: str) -> np.ndarray:
    """Normalised log prior (S,) over the shift grid (squared lengths d2, px^2)."""
    logpi = (-d2 / (2 * tau * tau)) if shift_prior == "gaussian" else np.zeros(len(d2))
    return logpi - (logpi.max() + math.log(np.exp(logpi - logpi.max()).sum()))


def _score_terms(scan: PolarScanner, q: torch.Tensor, alpha: np.ndarray, sigma2: float, logpi: np.ndarray):
    """(weighted conjugate references / sigma^2, bias (S, K) = log shift prior + log alpha - ||Q_k||^2 / 2 sigma^2)."""
    dev = q.device
    wq = estep.conj_weighted(q, scan.weights) * (1.0 / sigma2)
    bias = (torch.as_tensor(logpi, dtype=torch.float32, device=dev)[:, None]
            + torch.as_tensor(np.log(np.maximum(alpha, 1e-300)), dtype=torch.float32, device=dev)[None, :]
            - (scan.weighted_norm2(q) / (2 * sigma2)).float()[None, :])
    return wq, bias


def _fitted_terms(scan: PolarScanner, q: torch.Tensor, m: dict):
    """`_score_terms` of a fitted model's state m (alpha, sigma2, tau, shift_prior) with references q on scan."""
    return _score_terms(scan, q, m["alpha"], m["sigma2"], _log_shift_prior(scan.shift_d2, m["tau"], m["shift_prior"]))


def _posterior(scan: PolarScanner, spec: torch.Tensor, wq: torch.Tensor, bias: torch.Tensor,
               cand: torch.Tensor) -> estep.Posterior:
    """E-step of one batch (spectra (M, b*S, Nr)) over the candidate classes cand ((c,) shared,
    e.g. all classes, or (b, c) per image: a truncated E-step, the other classes get posterior
    0): the posterior over shift, class and rotation, and the log-evidence minus the ||x||^2
    and normalising terms."""
    return estep.posterior(estep.scores(spec, wq, cand, scan.n_shifts, scan.n_rot), bias, cand)


@dataclasses.dataclass
class ImageData:
    """What EM iterates over: the images' polar spectra, batch by batch (`spec(j)` for batch
    slices[j]), ||x_i||^2 over the whole box (n,) float64, pixels per image, and the candidate
    classes (n, c) of a truncated E-step (None: all K)."""

    slices: list
    spec: Callable[[int], torch.Tensor]
    xx: torch.Tensor
    npix: int
    candidates: torch.Tensor | None

    @property
    def n(self) -> int:
        return self.xx.shape[0]


@dataclasses.dataclass
class EStep:
    """One E-step over all images: the M-step's sums (num (M, K, Nr) posterior-weighted image
    spectra in the reference frames, nk (K,) class weights, gs (S,) shift weights), the
    log-likelihood (nats), and per image the most probable class (n,), rotation and shift
    indices within it (n,), and the class posteriors (n, K)."""

    num: torch.Tensor
    nk: torch.Tensor
    gs: torch.Tensor
    log_likelihood: float
    labels: np.ndarray
    rot_i: np.ndarray
    sh_i: np.ndarray
    class_probability: np.ndarray


def balanced_prior(alpha: np.ndarray, nk: np.ndarray, n: float) -> np.ndarray:
    """Class priors (K,) that counteract class growth, one step of dual ascent towards equal
    class sizes (the Sinkhorn equipartition of a balanced assignment, as ISAC's equal-size
    groups): each prior is divided by the class's expected size nk (K,) over its equal share
    n / K, and stays within BALANCE_MAX_RATIO of 1/K either way, so a view that truly holds few
    particles keeps its class wherever the likelihood tells it apart by more than a few nats."""
    k = len(alpha)
    log_ratio = np.log(np.maximum(alpha * k, 1e-300)) - np.log(np.maximum(nk * k / n, 1e-6))
    bound = math.log(BALANCE_MAX_RATIO)
    a = np.exp(np.clip(log_ratio, -bound, bound))
    return a / a.sum()


@dataclasses.dataclass(frozen=True)
class SparseSchedule:
    """A truncated E-step schedule for many classes (Neal & Hinton 1998, as cryoSPARC skips
    classes of negligible posterior): every `full_every`-th E-step compares each image with all K
    classes; the E-steps between compare it only with the `classes` most probable for it in the
    last full one (cost N x classes instead of N x K). EM with fixed candidate sets never
    decreases its bound; the full E-steps let a particle move to any class. Used only where
    classes <= K / 2 (at fewer classes it saves little)."""

    classes: int = 8
    full_every: int = 8

    def applies(self, k: int) -> bool:
        return self.classes > 0 and self.full_every > 1 and 2 * self.classes <= k

    def candidates(self, class_probability: np.ndarray, device) -> torch.Tensor:
        """Each image's `classes` most probable classes (n, classes) of class posteriors (n, K)."""
        top = np.argpartition(-class_probability, self.classes - 1, axis=1)[:, :self.classes]
        return torch.as_tensor(top.astype(np.int64), device=device)


class ML2D:
    """The ML2D model (see the module docstring) on a polar scanner: references q (M, K, Nr)
    as angular spectra, class priors alpha (K,), noise variance sigma2 (image units^2) and the
    shift prior's width tau (px). `fit` alternates `e_step` and `m_step`. balance: the class
    priors come from `balanced_prior` instead of the class fractions (Scheres' ML2D), so that a
    growing class does not attract ever more particles."""

    def __init__(self, scan: PolarScanner, k: int, shift_prior: str = "gaussian", max_shift: float = 3,
                 balance: bool = False, sparse: SparseSchedule | None = None):
        self.scan, self.k, self.shift_prior, self.max_shift, self.balance = scan, k, shift_prior, max_shift, balance
        self.sparse = sparse if sparse is not None and sparse.applies(k) else None
        self.q = self.alpha = self.sigma2 = self.tau = None

    def start(self, references: np.ndarray, sigma2: float) -> ML2D:
        """Initial state: Cartesian references (K, D, D), equal class priors, noise variance
        sigma2, shift prior as wide as the search."""
        self.q = self.scan.reference_spectrum(references)  # (M, K, Nr)
        self.alpha = np.full(self.k, 1.0 / self.k)
        self.sigma2 = sigma2
        self.tau = max(float(self.max_shift), 0.5)
        return self

    def e_step(self, data: ImageData) -> EStep:
        """Posteriors over shift x class x rotation of every image, batch by batch, and the sums the M-step needs."""
        scan, k, dev = self.scan, self.k, self.q.device
        wq, bias = _score_terms(scan, self.q, self.alpha, self.sigma2,
                                _log_shift_prior(scan.shift_d2, self.tau, self.shift_prior))
        n = data.n
        st = EStep(num=torch.zeros_like(self.q), nk=torch.zeros(k, dtype=torch.float64, device=dev),
                   gs=torch.zeros(scan.n_shifts, dtype=torch.float64, device=dev), log_likelihood=0.0,
                   labels=np.empty(n, np.int64), rot_i=np.empty(n, np.int64), sh_i=np.empty(n, np.int64),
                   class_probability=np.empty((n, k), np.float32))
        ll = 0.0
        every = estep.all_classes(k, dev)
        for j, sl in enumerate(data.slices):
            spec = data.spec(j)
            post = _posterior(scan, spec, wq, bias, every if data.candidates is None else data.candidates[sl])
            estep.back_project(post, spec, st.num)
            cls_post = post.class_probability(k)  # (b, K)
            local = post.g0.sum(1).argmax(1)
            st.sh_i[sl], st.rot_i[sl] = post.map_pose(local)
            ll += float(post.log_evidence.double().sum())
            st.nk += cls_post.double().sum(0)
            st.gs += post.g0.sum(dim=(0, 2)).double()
            st.class_probability[sl] = cls_post.cpu().numpy()
            st.labels[sl] = post.classes(local).cpu().numpy()
        st.log_likelihood = ll + float(-(data.xx.sum()) / (2 * self.sigma2)
                                       - n * (data.npix / 2) * math.log(2 * math.pi * self.sigma2)
                                       - n * math.log(scan.n_rot))
        return st

    def m_step(self, st: EStep, data: ImageData) -> None:
        """New references (posterior-weighted averages; an empty class is set to 0), class
        priors, noise variance and (Gaussian prior) shift prior width from an E-step's sums."""
        n, nk = data.n, st.nk
        sizes = nk.cpu().numpy()
        self.alpha = balanced_prior(self.alpha, sizes, n) if self.balance else np.maximum(sizes / n, 0.0)
        safe = torch.clamp(nk, min=1e-12).to(st.num.real.dtype)
        q = st.num / safe[None, :, None]
        q[:, nk <= 1e-12] = 0
        self.q = q
        qq_new = self.scan.weighted_norm2(q).double()
        self.sigma2 = max(float((data.xx.sum() - (nk * qq_new).sum()) / (n * data.npix)), 1e-12)
        if self.shift_prior == "gaussian":
            self.tau = _fit_offset_sigma(st.gs.cpu().numpy(), self.scan.shift_d2, 0.2, 10 * max(self.max_shift, 1),
                                         self.tau)

    def fit(self, data: ImageData, max_iter: int, tol: float, verbose: bool = False, start: int = 0):
        """EM until max_iter M-steps or convergence: a relative log-likelihood change <= tol, or
        with balanced priors fewer than CONVERGED_FRACTION of the labels changed (the classes
        keep reorganising long after the log-likelihood moves by less than 1e-5). With a
        `SparseSchedule`, the E-steps between full ones compare each image only with its most
        probable classes of the last full E-step, and the last E-step is always a full one.
        Returns (log-likelihood per E-step, M-steps done, the last E-step)."""
        history, it, labels, near = [], 0, None, None
        while True:
            full = near is None or self.sparse is None or it % self.sparse.full_every == 0
            st = self.e_step(data if full else dataclasses.replace(data, candidates=near))
            if full and self.sparse is not None and data.candidates is None:
                near = self.sparse.candidates(st.class_probability, self.q.device)
            history.append(st.log_likelihood)
            if verbose:
                print(f"ml2d start {start} it {it} LL {history[-1]:.6e} sigma {math.sqrt(self.sigma2):.4f} "
                      f"tau {self.tau:.3f}{'' if full else ' (sparse)'}")
            if self.balance:
                converged = labels is not None and float((st.labels != labels).mean()) < CONVERGED_FRACTION
            else:
                converged = len(history) > 1 and abs(history[-1] - history[-2]) <= tol * abs(history[-1])
            if it >= max_iter or converged:
                if not full:  # the same model's full E-step: exact posteriors and log-likelihood
                    st = self.e_step(data)
                    history[-1] = st.log_likelihood
                return history, it, st
            labels = st.labels
            self.m_step(st, data)
            it += 1

    def result(self, st: EStep, history: list, n_iter: int) -> dict:
        """The fields of an ML2DResult (but start_log_likelihoods) for the current state and its last E-step."""
        scan, gaussian = self.scan, self.shift_prior == "gaussian"
        return dict(labels=st.labels, references=scan.to_cartesian(self.q), log_likelihood_history=history,
                    log_likelihood=history[-1], alpha=self.alpha, sigma=math.sqrt(self.sigma2),
                    rotation_deg=scan.rotation_deg(st.rot_i), shift=scan.shift_px(st.sh_i),
                    class_probability=st.class_probability, offset_sigma=self.tau if gaussian else None,
                    n_iter=n_iter, model=dict(scan=scan, q=self.q, alpha=self.alpha, sigma2=self.sigma2, tau=self.tau,
                                              shift_prior=self.shift_prior))


def image_data(x: torch.Tensor, scan: PolarScanner, k: int, candidates, batch_size: int | None,
                cache_bytes: float) -> ImageData:
    """The EM's view of images x (n, D, D) on the device: batches, polar spectra (kept in
    memory when they fit in cache_bytes, else recomputed each E-step), ||x||^2, candidates."""
    n, box = x.shape[0], x.shape[-1]
    cand_all = None if candidates is None else torch.as_tensor(np.asarray(candidates, dtype=np.int64), device=x.device)
    if cand_all is not None and (cand_all.shape[0] != n or cand_all.min() < 0 or cand_all.max() >= k):
        raise ValueError(f"candidates must be (n={n}, c) class indices in [0, {k})")
    slices = scan.batches(n, k if cand_all is None else cand_all.shape[1], batch_size)
    xx = x.double().pow(2).sum((1, 2))  # (n,) ||x_i||^2 over the whole box
    spec_bytes = n * scan.n_shifts * scan.n_radii * scan.n_freq * 8
    cache = [scan.transform(x[sl]) for sl in slices] if spec_bytes <= cache_bytes else None
    spec = (lambda j: cache[j]) if cache is not None else (lambda j: scan.transform(x[slices[j]]))
    return ImageData(slices, spec, xx, box * box, cand_all)


def ml2d(images, k: int, *, n_rotations: int = 64, max_shift: float = 3, n_starts: int = 3, max_iter: int = 25,
         tol: float = 1e-5, seed: int = 0, device="cpu", batch_size: int | None = None,
         shift_prior: str = "gaussian", r_max: float | None = None, n_radii: int | None = None,
         init_references=None, cache_bytes: float = 1.5e9, candidates=None, verbose: bool = False,
         balance: bool = False, sparse: SparseSchedule | None = None) -> ML2DResult:
    """ML2D classification of images (n, D, D) into k classes (the `ML2D` model, fitted from
    one or more starts).

    n_rotations: in-plane rotation steps over 360 degrees; max_shift: translation search radius
    (px, integer grid); shift_prior: "gaussian" (width fitted in the M-step, as Xmipp) or
    "uniform"; r_max: reference disc radius (px, default D//2 - 1 - ceil(max_shift)).
    n_starts random starts (references = averages of K random disjoint subsets of the unaligned
    images, as Scheres et al.), each run for at most max_iter EM iterations or until the relative
    change of the log-likelihood falls below tol; the start with the highest final
    log-likelihood is returned. init_references (k, D, D) replaces the random starts (one run).
    batch_size: images per batch (default: sized for ~16 MB of scores); cache_bytes: keep the
    images' polar spectra in memory when they fit (else recompute each iteration).
    candidates (n, c): compare each image only with these classes (a truncated E-step, Neal &
    Hinton 1998: cost N x c instead of N x K; the log-likelihood reported is then the bound
    over the candidates, which EM with fixed candidate sets never decreases). balance: balanced
    class priors (`balanced_prior`; the log-likelihood may then fall between iterations, and a
    start stops when fewer than 0.2 % of the labels change instead of by tol). sparse: a
    `SparseSchedule` of truncated E-steps between full ones (ignored with candidates)."""
    if shift_prior not in ("gaussian", "uniform"):
        raise ValueError(f"shift_prior must be 'gaussian' or 'uniform', not {shift_prior!r}")
    dev = torch.device(device)
    images = np.ascontiguousarray(images, dtype=np.float32)
    x = torch.as_tensor(images).to(dev)
    n, box = x.shape[0], x.shape[-1]
    if k < 1 or k > n:
        raise ValueError(f"k={k} must be between 1 and the number of images ({n})")
    scan = PolarScanner(box, n_rotations, max_shift, r_max, n_radii, dev)
    data = image_data(x, scan, k, candidates, batch_size, cache_bytes)
    rng = np.random.default_rng(seed)
    starts = [None] if init_references is not None else list(range(max(1, n_starts)))
    best = None
    all_ll = []
    for st in starts:
        if init_references is not None:
            ref0 = np.asarray(init_references, dtype=np.float32)
        else:
            perm = rng.permutation(n)
            ref0 = np.stack([images[perm[j::k]].mean(0) for j in range(k)]).astype(np.float32)
        model = ML2D(scan, k, shift_prior, max_shift, balance, sparse).start(ref0, float(data.xx.mean() / data.npix))
        history, it, last = model.fit(data, max_iter, tol, verbose, st)
        all_ll.append(history[-1])
        if best is None or history[-1] > best[0]:
            best = (history[-1], model.result(last, history, it))
    return ML2DResult(start_log_likelihoods=all_ll, **best[1])


def polish(images, labels: np.ndarray, angle_deg: np.ndarray, shift_px: np.ndarray, k: int, *, max_iter: int = 20,
           n_rotations: int = 64, max_shift: float = 3, seed: int = 0, device="cpu", batch: int = 512,
           cache_bytes: float = 1.5e9, candidates=None, balance: bool = False,
           sparse: SparseSchedule | None = None) -> ML2DResult:
    """ML2D started from a classification instead of random references: each class's starting
    reference is the average of its members (n, D, D) brought into the class frame by their
    poses (angle_deg (n,) degrees, shift_px (n, 2) px, `align` convention); an empty class starts
    from the average of a random 1/k of the images. Then at most max_iter EM iterations of the
    Gaussian-likelihood model (class, rotation and shift marginalised, noise sigma fitted);
    cache_bytes, candidates (n, c), balance and sparse as for `ml2d`."""
    images = np.asarray(images[:], dtype=np.float32)  # also reads a memory-mapped ShardSet / RowView
    n, box = len(labels), images.shape[-1]
    sums = np.zeros((k, box, box))
    for s in range(0, n, batch):
        sl = slice(s, min(n, s + batch))
        np.add.at(sums, labels[sl], to_reference_frame(images[sl], angle_deg[sl], shift_px[sl]))
    counts = np.bincount(labels, minlength=k)
    rng = np.random.default_rng([seed, POLISH])
    for j in np.flatnonzero(counts == 0):
        sums[j] = images[np.sort(rng.choice(n, max(1, n // k), replace=False))].mean(0)
        counts[j] = 1
    refs = (sums / counts[:, None, None]).astype(np.float32)
    return ml2d(images, k, init_references=refs, max_iter=max_iter, n_rotations=n_rotations, max_shift=max_shift,
                seed=seed, device=device, cache_bytes=cache_bytes, candidates=candidates, balance=balance, sparse=sparse)


def classify(images, result: ML2DResult, device="cpu", batch_size: int | None = None, candidates=None):
    """Assign images (n, D, D) array-like (NumPy, memory map, `data.ShardSet`; read batch by
    batch) with a fitted ML2D model (its references, class priors, noise sigma and shift prior
    held fixed: one E-step). candidates (n, c) array-like: compare each image only with these
    classes (cost N x c instead of N x K). Returns labels (n,), their posterior probability (n,)
    float32 (over the candidates), rotation_deg (n,) and shift (n, 2) px of the most probable
    pose within the class."""
    m = result.model
    dev = torch.device(device)
    fit = m["scan"]
    scan = fit if fit.device == dev else PolarScanner(fit.box, fit.n_rot, fit.max_shift, fit.r_max, fit.n_radii, dev)
    q = m["q"].to(dev)
    k = q.shape[1]
    wq, bias = _fitted_terms(scan, q, m)
    n = len(images)
    lab, prob = np.empty(n, np.int64), np.empty(n, np.float32)
    rot_i, sh_i = np.empty(n, np.int64), np.empty(n, np.int64)
    every = estep.all_classes(k, dev)
    for sl in scan.batches(n, k if candidates is None else candidates.shape[1], batch_size):
        x = torch.as_tensor(np.asarray(images[sl], dtype=np.float32), device=dev)
        cand = every if candidates is None else torch.as_tensor(np.asarray(candidates[sl], dtype=np.int64), device=dev)
        post = _posterior(scan, scan.transform(x), wq, bias, cand)
        p, li = post.g0.sum(1).max(1)
        sh_i[sl], rot_i[sl] = post.map_pose(li)
        lab[sl], prob[sl] = post.classes(li).cpu().numpy(), p.cpu().numpy()
    return lab, prob, scan.rotation_deg(rot_i), scan.shift_px(sh_i)


def log_evidence(images: np.ndarray, result: ML2DResult, classes: np.ndarray | None = None, batch: int = 256) -> np.ndarray:
    """Per image of images (n, D, D): the log-likelihood ratio (nats) of the fitted model, over
    the listed classes (all K when None; rotations and shifts marginalised, class priors as
    fitted), against noise alone (a zero image): log p(x | model) - log p(x | noise)."""
    m = result.model
    scan = m["scan"]
    wq, bias = _fitted_terms(scan, m["q"], m)
    cand = estep.all_classes(m["q"].shape[1], scan.device) if classes is None else torch.as_tensor(
        np.asarray(classes, dtype=np.int64), device=scan.device)
    out = []
    for s in range(0, len(images), batch):
        x = torch.as_tensor(np.asarray(images[s:s + batch], dtype=np.float32), device=scan.device)
        out.append(_posterior(scan, scan.transform(x), wq, bias, cand).log_evidence.cpu().numpy())
    return np.concatenate(out)

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
the end. The same machinery (`PolarScanner`) does the rotation/shift scan of the oracle
baseline (see `baselines.oracle_labels`).

Conventions as in `imageops`: angles in degrees counter-clockwise, shifts (dx, dy) in pixels;
for particle i with class k, `imageops.rotate(references[k][None], rotation_deg[i], shift[i])`
approximates the image.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import minimize_scalar

__all__ = ["ML2DResult", "PolarScanner", "ml2d"]


# ---------------------------------------------------------------------------------------------
# rotation / shift scan in polar coordinates (shared with baselines.oracle_labels)
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
        theta = torch.arange(self.n_rot, dtype=torch.float64) * (2 * math.pi / self.n_rot)
        c = box // 2
        xs = c + torch.from_numpy(self.shifts[:, 0]).double()[:, None, None] + self.radii[None, :, None] * torch.cos(theta)
        ys = c + torch.from_numpy(self.shifts[:, 1]).double()[:, None, None] + self.radii[None, :, None] * torch.sin(theta)
        grid = torch.stack([xs, ys], dim=-1) * (2.0 / (box - 1)) - 1.0  # (S, Nr, Na, 2), align_corners=True
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
        b, s, nr, na = polar.shape
        f = torch.fft.rfft(polar, dim=-1)  # (b, S, Nr, M)
        return f.permute(3, 0, 1, 2).reshape(self.n_freq, b * s, nr).contiguous()

    def transform(self, images) -> torch.Tensor:
        """(M, b*S, Nr) angular spectra of images (b, D, D) at every shift."""
        return self.spectrum(self.polar(torch.as_tensor(images, device=self.device)))

    # -- references -----------------------------------------------------------------------
    def reference_spectrum(self, references) -> torch.Tensor:
        """(M, K, Nr) angular spectra of Cartesian references (K, D, D), about the centre."""
        p = self.polar(torch.as_tensor(references, device=self.device), centred_only=True)
        return self.spectrum(p)

    def weighted_conj(self, ref_spec: torch.Tensor) -> torch.Tensor:
        """Real matrix (M, 2*Nr, 2*K) that maps an image spectrum row (real/imag interleaved) to
        sum_rho w_rho P_hat(rho, m) conj(Q_hat_k(rho, m)) (interleaved); input to `correlate`."""
        wq = ref_spec.conj() * self.weights[None, None, :]  # (M, K, Nr)
        m, k, nr = wq.shape
        wr, wi = wq.real.transpose(1, 2), wq.imag.transpose(1, 2)  # (M, Nr, K)
        w = torch.empty(m, nr, 2, k, 2, dtype=wr.dtype, device=wr.device)
        w[:, :, 0, :, 0], w[:, :, 1, :, 0] = wr, -wi
        w[:, :, 0, :, 1], w[:, :, 1, :, 1] = wi, wr
        return w.reshape(m, 2 * nr, 2 * k)

    def correlate(self, img_spec: torch.Tensor, ref_w: torch.Tensor) -> torch.Tensor:
        """Correlations (Na, b*S, K) of image spectra (M, b*S, Nr) with references given as
        `weighted_conj(...)`, over all rotations (complex products as real matrix products)."""
        m, rows, nr = img_spec.shape
        z = torch.bmm(torch.view_as_real(img_spec).reshape(m, rows, 2 * nr), ref_w)
        z = torch.view_as_complex(z.view(m, rows, -1, 2))
        return torch.fft.irfft(z, n=self.n_rot, dim=0)

    def back_project(self, weights: torch.Tensor, img_spec: torch.Tensor) -> torch.Tensor:
        """sum over rows of the images brought back to the reference frame, weighted per rotation:
        weights (Na, b*S, K) real, image spectra (M, b*S, Nr) -> (M, K, Nr) spectra of
        sum_{rows, r} weights[r, row, k] P_row(rho, theta + r)."""
        m, rows, nr = img_spec.shape
        gh = torch.view_as_real(torch.fft.rfft(weights, dim=0)).reshape(m, rows, -1)  # (M, rows, 2K)
        r = torch.bmm(gh.transpose(1, 2), torch.view_as_real(img_spec).reshape(m, rows, 2 * nr))
        r = r.view(m, -1, 2, nr, 2)  # [m, k, re/im of gamma_hat, rho, re/im of P_hat]
        return torch.complex(r[:, :, 0, :, 0] + r[:, :, 1, :, 1], r[:, :, 0, :, 1] - r[:, :, 1, :, 0])

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

    def batches(self, n: int, k: int, batch_size: int | None, budget: float = 4e6):
        """Slices over n images, sized so that one batch's score array (Na*b*S*K) stays near `budget`."""
        if batch_size is None:
            batch_size = max(1, int(budget // (self.n_rot * self.n_shifts * max(k, 1))))
        return [slice(s, min(n, s + batch_size)) for s in range(0, n, batch_size)]


# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class ML2DResult:
    """labels (n,) int; references (K, D, D) float32 (Cartesian, interpolated from the polar
    model, 0 outside r_max); log_likelihood_history (per EM iteration of the kept start);
    log_likelihood (final, nats, whole data set); alpha (K,) class priors; sigma (noise std,
    image units); rotation_deg (n,) and shift (n, 2) = (dx, dy) px: most probable pose within
    the assigned class; class_probability (n, K) posteriors; offset_sigma: fitted std (px) of
    the Gaussian shift prior (None if uniform); start_log_likelihoods: final LL of every start."""

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


def _fit_offset_sigma(counts: np.ndarray, d2: np.ndarray, lo: float, hi: float, old: float) -> float:
    """Width tau (px) of a discrete Gaussian prior over shifts maximising sum_s counts_s log pi_s(tau)."""
    def negll(log_tau):
        a = -d2 / (2 * math.exp(2 * log_tau))
        lse = a.max() + math.log(np.exp(a - a.max()).sum())
        return -float((counts * (a - lse)).sum())
    res = minimize_scalar(negll, bounds=(math.log(lo), math.log(hi)), method="bounded", options={"xatol": 1e-4})
    return float(math.exp(res.x)) if res.fun <= negll(math.log(old)) else old


def ml2d(images, k: int, *, n_rotations: int = 64, max_shift: float = 3, n_starts: int = 3, max_iter: int = 25,
         tol: float = 1e-5, seed: int = 0, device="cpu", batch_size: int | None = None,
         shift_prior: str = "gaussian", r_max: float | None = None, n_radii: int | None = None,
         init_references=None, cache_bytes: float = 1.5e9, verbose: bool = False) -> ML2DResult:
    """ML2D classification of images (n, D, D) into k classes.

    n_rotations: in-plane rotation steps over 360 degrees; max_shift: translation search radius
    (px, integer grid); shift_prior: "gaussian" (width fitted in the M-step, as Xmipp) or
    "uniform"; r_max: reference disc radius (px, default D//2 - 1 - ceil(max_shift)).
    n_starts random starts (references = averages of K random disjoint subsets of the unaligned
    images, as Scheres et al.), each run for at most max_iter EM iterations or until the relative
    change of the log-likelihood falls below tol; the start with the highest final
    log-likelihood is returned. init_references (k, D, D) replaces the random starts (one run).
    batch_size: images per batch (default: sized for ~16 MB of scores); cache_bytes: keep the
    images' polar spectra in memory when they fit (else recompute each iteration)."""
    if shift_prior not in ("gaussian", "uniform"):
        raise ValueError(f"shift_prior must be 'gaussian' or 'uniform', not {shift_prior!r}")
    dev = torch.device(device)
    images = np.ascontiguousarray(images, dtype=np.float32)
    x = torch.as_tensor(images).to(dev)
    n, box = x.shape[0], x.shape[-1]
    if k < 1 or k > n:
        raise ValueError(f"k={k} must be between 1 and the number of images ({n})")
    scan = PolarScanner(box, n_rotations, max_shift, r_max, n_radii, dev)
    na, S = scan.n_rot, scan.n_shifts
    slices = scan.batches(n, k, batch_size)
    xx = x.double().pow(2).sum((1, 2))  # (n,) ||x_i||^2 over the whole box
    npix = box * box
    d2 = (scan.shifts.astype(np.float64) ** 2).sum(1)
    spec_bytes = n * S * scan.n_radii * scan.n_freq * 8
    cache = [scan.transform(x[sl]) for sl in slices] if spec_bytes <= cache_bytes else None
    get_spec = (lambda j: cache[j]) if cache is not None else (lambda j: scan.transform(x[slices[j]]))

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
        q = scan.reference_spectrum(ref0)  # (M, K, Nr)
        alpha = np.full(k, 1.0 / k)
        sigma2 = float(xx.mean() / npix)
        tau = max(float(max_shift), 0.5)
        history = []
        it = 0
        while True:
            logpi = (-d2 / (2 * tau * tau)) if shift_prior == "gaussian" else np.zeros(S)
            logpi = logpi - (logpi.max() + math.log(np.exp(logpi - logpi.max()).sum()))
            qq = scan.weighted_norm2(q)  # (K,)
            wq = scan.weighted_conj(q) * (1.0 / sigma2)
            bias = (torch.as_tensor(logpi, dtype=torch.float32, device=dev)[:, None]
                    + torch.as_tensor(np.log(np.maximum(alpha, 1e-300)), dtype=torch.float32, device=dev)[None, :]
                    - (qq / (2 * sigma2)).float()[None, :])  # (S, K)
            num = torch.zeros_like(q)  # (M, K, Nr) sums of images brought to the reference frame
            nk = torch.zeros(k, dtype=torch.float64, device=dev)
            gs = torch.zeros(S, dtype=torch.float64, device=dev)
            ll = 0.0
            lab, rot_i, sh_i, post = (np.empty(n, np.int64), np.empty(n, np.int64), np.empty(n, np.int64),
                                      np.empty((n, k), np.float32))
            for j, sl in enumerate(slices):
                spec = get_spec(j)
                b = sl.stop - sl.start
                L = scan.correlate(spec, wq)  # (Na, b*S, K): C / sigma^2
                # irfft along dim 0 returns the rotation axis innermost in memory; work on that layout
                Lp = L.permute(1, 2, 0).reshape(b, S, k, na)  # a view on CPU
                Lp += bias[None, :, :, None]
                mx = Lp.reshape(b, -1).amax(1).view(b, 1, 1, 1)
                # exp is slow below float32's normal range; posteriors under e^-87 are dropped to ~1e-38
                Lp.sub_(mx).clamp_(min=-87.0).exp_()
                g0 = Lp.sum(dim=-1)  # (b, S, K)
                z = g0.reshape(b, -1).sum(1)
                Lp.div_(z.view(b, 1, 1, 1))  # posterior gamma of (shift, class, rotation) per image
                g0.div_(z.view(b, 1, 1))
                ll += float((mx.view(b) + z.log()).double().sum())
                cls_post = g0.sum(1)  # (b, K)
                nk += cls_post.double().sum(0)
                gs += g0.sum(dim=(0, 2)).double()
                lb = cls_post.argmax(1)
                post[sl] = cls_post.cpu().numpy()
                lab[sl] = lb.cpu().numpy()
                g_lab = Lp[torch.arange(b, device=dev), :, lb, :]  # (b, S, Na)
                flat = g_lab.reshape(b, S * na).argmax(1).cpu().numpy()
                sh_i[sl], rot_i[sl] = flat // na, flat % na
                num += scan.back_project(Lp.view(b * S, k, na).permute(2, 0, 1), spec)
            ll += float(-(xx.sum()) / (2 * sigma2) - n * (npix / 2) * math.log(2 * math.pi * sigma2)
                        - n * math.log(na))
            history.append(ll)
            if verbose:
                print(f"ml2d start {st} it {it} LL {ll:.6e} sigma {math.sqrt(sigma2):.4f} tau {tau:.3f}")
            done = it >= max_iter or (len(history) > 1 and abs(history[-1] - history[-2]) <= tol * abs(history[-1]))
            if done:
                break
            # M-step
            nk_np = nk.cpu().numpy()
            alpha = np.maximum(nk_np / n, 0.0)
            safe = torch.clamp(nk, min=1e-12).to(num.real.dtype)
            q = num / safe[None, :, None]
            q[:, nk <= 1e-12] = 0
            qq_new = scan.weighted_norm2(q).double()
            sigma2 = max(float((xx.sum() - (nk * qq_new).sum()) / (n * npix)), 1e-12)
            if shift_prior == "gaussian":
                tau = _fit_offset_sigma(gs.cpu().numpy(), d2, 0.2, 10 * max(max_shift, 1), tau)
            it += 1
        all_ll.append(history[-1])
        if best is None or history[-1] > best[0]:
            best = (history[-1], dict(labels=lab, references=scan.to_cartesian(q), log_likelihood_history=history,
                                      log_likelihood=history[-1], alpha=alpha, sigma=math.sqrt(sigma2),
                                      rotation_deg=scan.rotation_deg(rot_i), shift=scan.shift_px(sh_i),
                                      class_probability=post, offset_sigma=tau if shift_prior == "gaussian" else None,
                                      n_iter=it))
    return ML2DResult(start_log_likelihoods=all_ll, **best[1])

"""The E-step engine shared by the annealed NCC EM (`align.soft_align_all`) and ML2D (`ml2d`).

One batch of b images, each resampled to polar coordinates about S candidate centres, is
compared with the references of a candidate list over every in-plane rotation at once:
`scores` gives the scores, `posterior` turns them into the posterior over (shift, candidate
class, rotation) of each image, and `back_project` adds each image, brought into the frame of
each candidate class and weighted by that posterior, to the class's accumulator. The two EMs
differ only in how they score: the annealed EM correlates unit-norm polars with unit-norm
references and scales by its inverse temperature (`scale`), with log class priors as bias;
ML2D weights the radii by the area element over sigma^2, with log priors of class and shift
minus ||Q_k||^2 / 2 sigma^2 as bias.

Candidates: a 1-D list (c,) shared by every image of the batch, e.g. all classes `arange(K)`,
takes one real matrix product per angular frequency over all images; a (b, c) list of each
image's own classes takes one small product per image and frequency (cost flat in K). A class
listed twice for an image counts once (its later copies get posterior 0).

Layouts (PolarScanner's): image spectra (M, b*S, Nr) complex, M = Na//2 + 1 angular
frequencies of Na angle samples, row b*S + s for image b at centre s; reference spectra
(M, K, Nr); scores and posteriors (b, S, c, Na).
"""

from __future__ import annotations

import dataclasses

import torch

# exp is slow below float32's normal range; posteriors under e^-87 are raised to ~1e-38
LOG_FLOOR = -87.0


def angular_spectrum(polar: torch.Tensor) -> torch.Tensor:
    """Angular spectrum (M, b*S, Nr) complex of polar samples (b, S, Nr, Na)."""
    b, s, nr, na = polar.shape
    f = torch.fft.rfft(polar, dim=-1)  # (b, S, Nr, M)
    return f.permute(3, 0, 1, 2).reshape(na // 2 + 1, b * s, nr).contiguous()


def image_major(spec: torch.Tensor, n_shifts: int) -> torch.Tensor:
    """View (b, S, Nr, M) of image spectra (M, b*S, Nr)."""
    m, rows, nr = spec.shape
    return spec.view(m, rows // n_shifts, n_shifts, nr).permute(1, 2, 3, 0)


def conj_weighted(ref_spec: torch.Tensor, weights) -> torch.Tensor:
    """The references as the engine scores with them: conj(Q_hat_k(rho, m)) w_rho (M, K, Nr)
    for reference spectra ref_spec (M, K, Nr) and radial weights (Nr,) (or a scalar)."""
    return ref_spec.conj() * weights


def real_matrix(wq: torch.Tensor) -> torch.Tensor:
    """Real matrix (M, 2*Nr, 2*K) that maps an image spectrum row (real/imag interleaved) to
    sum_rho P_hat(rho, m) wq[m, k, rho] (interleaved), for wq (M, K, Nr) from `conj_weighted`."""
    m, k, nr = wq.shape
    wr, wi = wq.real.transpose(1, 2), wq.imag.transpose(1, 2)  # (M, Nr, K)
    w = torch.empty(m, nr, 2, k, 2, dtype=wr.dtype, device=wr.device)
    w[:, :, 0, :, 0], w[:, :, 1, :, 0] = wr, -wi
    w[:, :, 0, :, 1], w[:, :, 1, :, 1] = wi, wr
    return w.reshape(m, 2 * nr, 2 * k)


def correlate(spec: torch.Tensor, ref_w: torch.Tensor, n_rot: int) -> torch.Tensor:
    """Scores (Na, b*S, K) of image spectra (M, b*S, Nr) against references given as
    `real_matrix(...)` (M, 2Nr, 2K), over all rotations: one real matrix product per frequency.
    C[r, row, k] = sum_rho w_rho sum_theta P_row(rho, theta) Q_k(rho, theta - r)."""
    m, rows, nr = spec.shape
    z = torch.bmm(torch.view_as_real(spec).reshape(m, rows, 2 * nr), ref_w)
    z = torch.view_as_complex(z.view(m, rows, -1, 2))
    return torch.fft.irfft(z, n=n_rot, dim=0)


def scores(spec: torch.Tensor, wq: torch.Tensor, cand: torch.Tensor, n_shifts: int, n_rot: int) -> torch.Tensor:
    """Scores (b, S, c, Na) of a batch's image spectra (M, b*S, Nr) against the references wq
    (M, K, Nr) (`conj_weighted`) of the candidate classes cand: (c,) for every image or (b, c)."""
    m, rows, nr = spec.shape
    b = rows // n_shifts
    if cand.dim() == 1:
        # irfft along dim 0 returns the rotation axis innermost in memory: on CPU this is a view
        c = cand.shape[0]
        return correlate(spec, real_matrix(wq[:, cand]), n_rot).permute(1, 2, 0).reshape(b, n_shifts, c, n_rot)
    # one small complex product per image and frequency: (S, Nr) x (Nr, c)
    z = torch.matmul(spec.view(m, b, n_shifts, nr).transpose(0, 1), wq[:, cand].permute(1, 0, 3, 2))  # (b, M, S, c)
    return torch.fft.irfft(z.permute(0, 2, 3, 1), n=n_rot, dim=-1).contiguous()


def candidate_classes(cand: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
    """Class indices (b, t) of indices local (b, t) into the candidate lists cand ((c,) shared
    by every image, or (b, c) per image)."""
    return cand[local] if cand.dim() == 1 else cand.gather(1, local)


def repeated_candidates(cand: torch.Tensor) -> torch.Tensor:
    """(n, c) bool: True where a particle's candidate class cand (n, c) already appears earlier
    in its list (such entries get posterior 0 in the E-steps, so a class counts once)."""
    return (cand[:, :, None] == cand[:, None, :]).tril(-1).any(-1)


@dataclasses.dataclass
class Posterior:
    """A batch's posterior p (b, S, c, Na) over shift x candidate class x rotation, its sum
    over rotations g0 (b, S, c), the log-evidence (b,) (log of the sum of exp(score + bias) over
    the candidates) and the candidates cand ((c,) or (b, c))."""

    p: torch.Tensor
    g0: torch.Tensor
    log_evidence: torch.Tensor
    cand: torch.Tensor

    def classes(self, local: torch.Tensor) -> torch.Tensor:
        """Class indices (b,) of indices local (b,) into the candidate lists."""
        return candidate_classes(self.cand, local[:, None])[:, 0]

    def class_probability(self, k: int) -> torch.Tensor:
        """Posterior (b, K) of each class (0 for classes not among an image's candidates)."""
        local = self.g0.sum(1)  # (b, c)
        out = torch.zeros(local.shape[0], k, dtype=local.dtype, device=local.device)
        if self.cand.dim() == 1:
            return out.index_add_(1, self.cand, local)
        return out.scatter_add_(1, self.cand, local)

    def map_pose(self, local: torch.Tensor):
        """Most probable (shift index, rotation index) of each image within its candidate `local` (b,)."""
        b, s, _, na = self.p.shape
        g = self.p[torch.arange(b, device=self.p.device), :, local, :]  # (b, S, Na)
        flat = g.reshape(b, s * na).argmax(1).cpu().numpy()
        return flat // na, flat % na


def posterior(score: torch.Tensor, bias: torch.Tensor, cand: torch.Tensor, scale: float = 1.0) -> Posterior:
    """The posterior over (shift, candidate class, rotation) ∝ exp(scale * score + bias), in
    place of the scores (b, S, c, Na); bias (S, K) per shift and class. Classes listed twice for
    an image count once."""
    b = score.shape[0]
    if cand.dim() == 1:
        drop = repeated_candidates(cand[None])  # (1, c)
        cb = bias[:, cand][None]  # (1, S, c)
    else:
        drop = repeated_candidates(cand)  # (b, c)
        cb = bias[:, cand].permute(1, 0, 2)  # (b, S, c)
    has_drop = bool(drop.any())
    if has_drop:
        cb = cb.masked_fill(drop[:, None, :], -torch.inf)
    if scale != 1.0:
        score.mul_(scale)
    score += cb[..., None]
    mx = score.reshape(b, -1).amax(1).view(b, 1, 1, 1)
    score.sub_(mx).clamp_(min=LOG_FLOOR).exp_()
    if has_drop:
        score.masked_fill_(drop[:, None, :, None], 0.0)
    g0 = score.sum(dim=-1)  # (b, S, c)
    z = g0.reshape(b, -1).sum(1)
    score.div_(z.view(b, 1, 1, 1))
    g0.div_(z.view(b, 1, 1))
    return Posterior(score, g0, mx.view(b) + z.log(), cand)


def back_project(post: Posterior, spec: torch.Tensor, num: torch.Tensor) -> None:
    """Add to num (M, K, Nr) every image's spectrum (spec (M, b*S, Nr)) brought back to the frame
    of each candidate class, weighted by the posterior of each shift and rotation:
    num[:, k] += sum_{b, s, r} p[b, s, k, r] P_bs(rho, theta + r) (in Fourier space: the
    rFFT of the weights along the rotation, conjugated, times the image spectrum)."""
    b, s, c, na = post.p.shape
    m, rows, nr = spec.shape
    if post.cand.dim() == 1:
        # every image against the same list: one product per frequency over all images and shifts
        gh = torch.view_as_real(torch.fft.rfft(post.p.view(rows, c, na).permute(2, 0, 1), dim=0)).reshape(m, rows, -1)
        r = torch.bmm(gh.transpose(1, 2), torch.view_as_real(spec).reshape(m, rows, 2 * nr))
        r = r.view(m, c, 2, nr, 2)  # [m, k, re/im of gamma_hat, rho, re/im of P_hat]
        contrib = torch.complex(r[:, :, 0, :, 0] + r[:, :, 1, :, 1], r[:, :, 0, :, 1] - r[:, :, 1, :, 0])
        num.index_add_(1, post.cand, contrib)
        return
    g = torch.fft.rfft(post.p, dim=-1).permute(3, 0, 2, 1).conj()  # (M, b, c, S)
    contrib = torch.matmul(g, spec.view(m, b, s, nr))  # (M, b, c, Nr)
    num.index_add_(1, post.cand.reshape(-1), contrib.reshape(m, b * c, nr))


def all_classes(k: int, device) -> torch.Tensor:
    """The candidate list of the full E-step: every class, shared by every image."""
    return torch.arange(k, device=device)

"""The E-step engine: all classes is the candidate list arange(K), a class listed twice counts once."""

import numpy as np
import pytest
import torch

from clcluster.em import estep
from clcluster.em.align import PolarCache, PolarGrid, PolarScanner, soft_align_all
from conftest import binned_easy_set

K = 4


@pytest.fixture(scope="module")
def easy():
    return binned_easy_set(K, 0.5, 7, images_per_view=30)


def _e_step(scan, spec, wq, bias, cand, k):
    """Back-projection (M, K, Nr), class weights (K,) and log-evidence (b,) of one batch."""
    post = estep.posterior(estep.scores(spec, wq, cand, scan.n_shifts, scan.n_rot), bias, cand)
    num = torch.zeros(spec.shape[0], k, spec.shape[2], dtype=spec.dtype)
    estep.back_project(post, spec, num)
    return num, post.class_probability(k).sum(0), post.log_evidence


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


def test_every_class_as_per_particle_candidates_is_the_full_e_step(easy):
    """Candidates arange(K) listed for every particle (the per-particle route) give the
    references, class weights and log-evidence of the shared list arange(K) (one product per
    frequency) to float32 rounding."""
    img, _, refs = easy
    scan = PolarScanner(32, 32, 2)
    spec = scan.transform(torch.as_tensor(img, dtype=torch.float32))
    wq = estep.conj_weighted(scan.reference_spectrum(refs.astype(np.float32)), scan.weights) * (1.0 / 4.0)
    bias = (
        torch.log(torch.tensor([0.1, 0.2, 0.3, 0.4]))[None].expand(scan.n_shifts, -1)
        - 0.1 * torch.arange(scan.n_shifts, dtype=torch.float32)[:, None]
    )
    dense = _e_step(scan, spec, wq, bias, estep.all_classes(K, "cpu"), K)
    every = torch.arange(K).repeat(len(img), 1)
    per_particle = _e_step(scan, spec, wq, bias, every, K)
    for a, b in zip(per_particle, dense):
        assert _rel(a, b) < 1e-5


def test_a_class_listed_twice_counts_once(easy):
    """A candidate list with a class repeated gives the posterior, back-projection and evidence
    of the list without the repeat, per particle and shared."""
    img, _, refs = easy
    scan = PolarScanner(32, 32, 2)
    spec = scan.transform(torch.as_tensor(img, dtype=torch.float32))
    wq = estep.conj_weighted(scan.reference_spectrum(refs.astype(np.float32)), scan.weights) * (1.0 / 4.0)
    bias = torch.zeros(scan.n_shifts, K)
    n = len(img)
    for once, twice in (
        (torch.tensor([2, 0]), torch.tensor([2, 0, 2])),
        (torch.tensor([[2, 0]]).repeat(n, 1), torch.tensor([[2, 2, 0, 2]]).repeat(n, 1)),
    ):
        for a, b in zip(_e_step(scan, spec, wq, bias, twice, K), _e_step(scan, spec, wq, bias, once, K)):
            assert _rel(a, b) < 1e-5


def test_annealed_pass_with_every_class_listed_is_the_full_pass(easy):
    """`soft_align_all` with every class as each particle's candidates (twice over) gives the
    labels, scores, references and class weights of the pass over all classes."""
    img, truth, _ = easy
    cache = PolarCache(img, PolarGrid(32, max_shift=2))
    refs = torch.randn(K, cache.pg.n_radii, cache.pg.n_angles, generator=torch.Generator().manual_seed(0))
    log_prior = torch.log(torch.tensor([0.1, 0.2, 0.3, 0.4]))
    full = soft_align_all(cache, refs, None, 50.0, log_prior)
    cand = np.tile(np.r_[np.arange(K), np.arange(K)[::-1]], (len(img), 1))
    listed = soft_align_all(cache, refs, cand, 50.0, log_prior)
    assert np.array_equal(full[0].labels, listed[0].labels)
    assert np.allclose(full[0].score, listed[0].score, atol=1e-6)
    assert _rel(listed[1], full[1]) < 1e-5 and _rel(listed[2], full[2]) < 1e-5


def test_repeated_candidates_mark_every_later_copy_of_a_class():
    cand = torch.tensor([[2, 0, 2, 2], [1, 3, 0, 2]])
    assert estep.repeated_candidates(cand).tolist() == [[False, False, True, True], [False, False, False, False]]

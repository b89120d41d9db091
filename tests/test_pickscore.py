"""Pick contrast (`image.pickscore`): noise-like picks flagged, particles kept, the noise-only
null and the cut's estimate of the noise-like fraction. Synthetic stacks with a fixed seed."""
from __future__ import annotations

import dataclasses

import numpy as np

from clcluster.image.imageops import gaussian_lowpass, radius_grid
from clcluster.image.pickscore import (band_weights, contrast_scores, noise_cut, null_scores, particle_score_model,
                                       pick_contrast, shell_powers)

BOX = 32


def particle_stack(n_particles: int, n_empty: int, snr: float, seed: int = 0):
    """Particles: random smooth blobs inside radius 10 px of a 32-px box, white noise of unit
    variance at `snr` (signal variance over the disc / noise variance); empty picks: the noise alone.
    Returns images (n, 32, 32) float32 and the particle mask (n,) bool."""
    rng = np.random.default_rng(seed)
    disc = radius_grid(BOX) < 10
    signal = gaussian_lowpass(rng.standard_normal((n_particles, BOX, BOX)).astype(np.float32), 1.5) * disc
    signal *= np.sqrt(snr / signal[:, disc].var(axis=1))[:, None, None]
    clean = np.concatenate([signal, np.zeros((n_empty, BOX, BOX), np.float32)])
    images = (clean + rng.standard_normal(clean.shape)).astype(np.float32)
    return images, np.r_[np.ones(n_particles, bool), np.zeros(n_empty, bool)]


def test_noise_like_picks_are_flagged_and_particles_kept():
    images, is_particle = particle_stack(2100, 900, snr=0.3)
    pc = pick_contrast(images, 0.375 * BOX, max_good_loss=0.05)
    kept = (~pc.noise_like[is_particle]).mean()
    removed = pc.noise_like[~is_particle].mean()
    print(f"kept {kept:.3f} removed {removed:.3f} pi0 {pc.noise_fraction:.3f} threshold {pc.threshold:.3f}")
    assert kept >= 0.88 and removed >= 0.7
    assert 0.2 <= pc.noise_fraction <= 0.45  # 30 % noise-only picks
    assert np.median(pc.scores[is_particle]) > np.median(pc.scores[~is_particle]) + 0.1
    _, outer = shell_powers(images, 0.375 * BOX)
    null = null_scores(np.median(outer, axis=0), pc.weights, BOX, 0.375 * BOX, 3000, seed=5)
    for q in (0.25, 0.5, 0.75):  # the simulated null scores like the stack's empty picks
        assert abs(np.quantile(null, q) - np.quantile(pc.scores[~is_particle], q)) < 0.05


def test_a_stack_of_particles_only_loses_none():
    images, _ = particle_stack(600, 0, snr=0.3, seed=1)
    pc = pick_contrast(images, 0.375 * BOX, max_good_loss=0.05)
    assert not pc.noise_like.any() and pc.noise_fraction < 0.05


def test_structure_around_the_particle_scores_below_noise():
    images, _ = particle_stack(200, 0, snr=0.3, seed=2)
    edge = images.copy()
    edge[:, :, :6] += 3.0  # a bright band at the box edge, outside the particle radius
    base_in, base_out = shell_powers(images, 0.375 * BOX)
    weights = band_weights(base_in, base_out)
    assert np.median(contrast_scores(base_in, base_out, weights)) > 0.5
    assert (contrast_scores(*shell_powers(edge, 0.375 * BOX), weights) < 0).mean() > 0.9


def test_the_cut_estimates_the_noise_fraction_from_the_left_tail():
    rng = np.random.default_rng(3)
    null = rng.normal(0.0, 0.1, 5000)
    scores = np.r_[rng.normal(0.0, 0.1, 300), rng.normal(0.6, 0.15, 700)]
    threshold, pi0, _ = noise_cut(scores, null, max_good_loss=0.05)
    assert 0.25 <= pi0 <= 0.35
    good_lost = (scores[300:] < threshold).mean()
    assert good_lost <= 0.08 and (scores[:300] < threshold).mean() >= 0.9
    off, _, _ = noise_cut(scores, null, max_good_loss=0.0)
    assert off < threshold
    # no noise-like picks: the loss budget is not spent on particles that merely score low
    particles = rng.normal(0.6, 0.15, 1000)
    cut, pi0, _ = noise_cut(particles, null, max_good_loss=0.05)
    assert pi0 < 0.02 and not (particles < cut).any()


def test_screen_off_or_too_few_picks_flags_nothing():
    images, _ = particle_stack(30, 10, snr=0.3)
    assert not pick_contrast(images, 12.0, 0.05).noise_like.any()
    images, _ = particle_stack(300, 100, snr=0.3)
    assert not pick_contrast(images, 12.0, 0.0).noise_like.any()


def test_the_cluster_step_fits_without_noise_like_picks_and_labels_them_all(caplog):
    """`refinement_rows` drops the noise-like picks from the refinement's fit; `cluster` still
    labels every pick (the dropped ones by the fitted model)."""
    import logging

    from clcluster.steps.cluster import ClusterConfig, cluster, refinement_rows

    images, is_particle = particle_stack(420, 180, snr=0.3, seed=4)
    cfg = ClusterConfig(n_init=2, refine_restarts=1, refine_ml_iterations=3, stability_runs=0, cache_mb=0, batch_size=64)
    rows = refinement_rows(images, len(images), cfg, 0, None)
    assert np.isin(rows, np.flatnonzero(~is_particle)).sum() <= 0.3 * (~is_particle).sum()
    assert np.isin(rows, np.flatnonzero(is_particle)).sum() >= 0.85 * is_particle.sum()  # 600 picks: pi0 is rough
    off = refinement_rows(images, len(images), dataclasses.replace(cfg, refine_noise_screen=0.0), 0, None)
    assert np.array_equal(off, np.arange(len(images)))
    features = np.random.default_rng(0).standard_normal((len(images), 8)).astype(np.float32)
    with caplog.at_level(logging.INFO, logger="clcluster.steps.cluster"):
        res = cluster(features, 3, cfg, seed=0, images=images, device="cpu")
    assert "noise-like picks" in caplog.text
    assert len(res.labels) == len(images) and set(res.labels) <= {0, 1, 2}


def test_the_particle_model_keeps_the_loss_where_particles_score_like_noise():
    """Particles whose scores spread into the null (very low SNR): Storey's estimate counts the
    low ones as noise-like and loses three times the setting; the fitted model of the particles'
    scores bounds the loss."""
    rng = np.random.default_rng(0)
    null = rng.normal(0.0, 0.1, 5000)
    scores = np.r_[rng.normal(0.0, 0.1, 2000), rng.normal(0.2, 0.16, 6000)]
    storey, _, _ = noise_cut(scores, null, max_good_loss=0.05)
    assert (scores[2000:] < storey).mean() > 0.1
    cut, _, estimated = noise_cut(scores, null, max_good_loss=0.05, particle_model=True)
    assert estimated <= 0.05 and (scores[2000:] < cut).mean() <= 0.06
    assert (scores[:2000] < cut).mean() >= 0.15  # noise-like picks still go
    pi0, mu, sd = particle_score_model(scores, null, 0.5)
    assert abs(pi0 - 0.25) < 0.08 and abs(mu - 0.2) < 0.03 and abs(sd - 0.16) < 0.02  # overlap: pi0 is loose

"""Surround power (`em.surround`): a second particle beside the first is flagged, lone particles
(off-centre ones included, with their pose) are not. Synthetic stacks with a fixed seed."""
from __future__ import annotations

import numpy as np

from clcluster.em.surround import surround_power, surround_z
from clcluster.image.imageops import fourier_shift, rotate
from clcluster.image.pickscore import band_weights, shell_powers

BOX = 32
RADIUS = 12.0


def view(box: int = BOX) -> np.ndarray:
    """A lopsided two-lobe particle (box, box) of unit variance, about 16 px across."""
    yy, xx = np.mgrid[:box, :box] - box // 2
    v = np.exp(-((xx - 3) ** 2 + yy ** 2) / 10.0) - 0.7 * np.exp(-((xx + 3) ** 2 + (yy - 2) ** 2) / 8.0)
    return (v / v.std()).astype(np.float32)


def stack(n_single: int, n_pair: int, seed: int = 0):
    """Lone particles at random in-plane angles and shifts up to 2 px, and pairs (a second copy
    11-14 px from the first, outside the particle radius in part), white noise of std 1.5.
    Returns images (n, D, D), angles (n,) degrees, shifts (n, 2) px, pair flags (n,)."""
    rng = np.random.default_rng(seed)
    n = n_single + n_pair
    angle = rng.uniform(0, 360, n).astype(np.float32)
    shift = rng.uniform(-2, 2, (n, 2)).astype(np.float32)
    clean = np.repeat(view()[None], n, axis=0)
    sep = rng.uniform(11, 14, n_pair)
    direction = rng.uniform(0, 2 * np.pi, n_pair)
    second = fourier_shift(rotate(clean[n_single:], rng.uniform(0, 360, n_pair).astype(np.float32)),
                           np.stack([sep * np.cos(direction), sep * np.sin(direction)], axis=1).astype(np.float32))
    clean[n_single:] += second
    clean = fourier_shift(rotate(clean, angle), shift)
    images = (clean + 1.5 * rng.standard_normal(clean.shape)).astype(np.float32)
    return images, angle, shift, np.r_[np.zeros(n_single, bool), np.ones(n_pair, bool)]


def test_pairs_score_above_lone_particles_and_few_lone_ones_pass_the_cut():
    images, angle, shift, pair = stack(400, 40)
    weights = band_weights(*shell_powers(images, RADIUS))
    labels = np.zeros(len(images), int)
    z = surround_z(surround_power(images, labels, 1, angle, shift, RADIUS, weights, batch=128))
    print(f"median z lone {np.median(z[~pair]):.2f} pair {np.median(z[pair]):.2f}; "
          f"flagged lone {(z[~pair] > 2.5).mean():.3f} pair {(z[pair] > 2.5).mean():.3f}")
    assert abs(np.median(z)) < 0.2
    assert (z[pair] > 2.5).mean() >= 0.7
    assert (z[~pair] > 2.5).mean() <= 0.03


def test_the_class_average_explains_the_particle_beyond_the_radius():
    """A particle wider than the disc: without its class average subtracted its own edge would
    count as power around it; with it, lone particles score alike whatever their pose."""
    images, angle, shift, _ = stack(300, 0, seed=1)
    weights = band_weights(*shell_powers(images, RADIUS))
    labels = np.zeros(len(images), int)
    small = 5.0  # the particle reaches well beyond this radius
    power = surround_power(images, labels, 1, angle, shift, small, weights, batch=100)
    scrambled = np.random.default_rng(2).uniform(0, 360, len(angle)).astype(np.float32)
    wrong = surround_power(images, labels, 1, scrambled, shift, small, weights, batch=100)
    assert np.median(wrong) > 1.2 * np.median(power)  # wrong poses blur the average: the particle is left over
    assert (surround_z(power) > 2.5).mean() <= 0.03


def test_a_disc_that_fills_the_box_gives_no_score():
    images, angle, shift, _ = stack(20, 0, seed=3)
    weights = band_weights(*shell_powers(images, RADIUS))
    power = surround_power(images, np.zeros(20, int), 1, angle, shift, BOX, weights)  # radius = box: no corners
    assert np.isnan(power).all() and np.isnan(surround_z(power)).all()

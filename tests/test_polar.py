"""The polar sampling grid: where samples lie, and every polar sampler of the package using it."""
import math

import numpy as np
import torch

from clcluster.em.align import PolarGrid, PolarScanner
from clcluster.image.imageops import polar_grid
from clcluster.image.polar import grid_sample_coordinates, linear_radii, polar_coordinates
from clcluster.learn.models import polar_sampling_grid


def test_samples_lie_counter_clockwise_about_the_centre_pixel():
    x, y = polar_coordinates(32, np.array([2.0, 5.0]), 4)
    assert x.shape == y.shape == (2, 4)
    assert np.allclose(x[0], [18, 16, 14, 16]) and np.allclose(y[0], [16, 18, 16, 14])
    x, y = polar_coordinates(32, np.array([3.0]), 8, offsets=np.array([[1.0, -2.0], [0.0, 0.0]]))
    assert x.shape == (2, 1, 8)
    assert np.allclose(x[0, 0, 0], 16 + 1 + 3) and np.allclose(y[0, 0, 2], 16 - 2 + 3)


def test_grid_sample_coordinates_map_pixel_centres_to_minus_one_and_one():
    x = torch.tensor([0.0, 15.5, 31.0], dtype=torch.float64)
    for scale_first in (False, True):
        g = grid_sample_coordinates(x, x, 32, torch, scale_first=scale_first)
        assert torch.allclose(g[:, 0], torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64))


def _pixels(grid: torch.Tensor, box: int) -> torch.Tensor:
    return (grid.double() + 1) * (box - 1) / 2


def test_every_polar_sampler_is_the_same_geometry():
    """imageops, the encoder, PolarGrid and PolarScanner: same centre, angle origin and direction."""
    box, na = 40, 16
    ys, xs = polar_grid(box, 8, na, r_min=1.0, r_max=12.0)
    enc = _pixels(polar_sampling_grid(box, 8, na, r_min=1.0, r_max=12.0)[0], box)
    assert np.allclose(enc[..., 0].numpy(), xs, atol=1e-4) and np.allclose(enc[..., 1].numpy(), ys, atol=1e-4)
    pg = PolarGrid(box, n_radii=8, n_angles=na, max_shift=2, r_min=1.0, r_max=12.0)
    centre = int(np.flatnonzero((pg.offsets == 0).all(1))[0])
    g = _pixels(pg.grid("cpu")[0].reshape(pg.n_shifts, 8, na, 2)[centre], box)
    assert np.allclose(g[..., 0].numpy(), xs, atol=1e-4) and np.allclose(g[..., 1].numpy(), ys, atol=1e-4)
    sc = PolarScanner(box, na, 2)
    s0 = int(np.flatnonzero((sc.shifts == 0).all(1))[0])
    g = _pixels(sc.grid[0].reshape(sc.n_shifts, sc.n_radii, na, 2)[s0], box)
    r = sc.radii.numpy()[:, None]
    t = 2 * math.pi * np.arange(na)[None, :] / na
    assert np.allclose(g[..., 0].numpy(), box // 2 + r * np.cos(t), atol=1e-4)
    assert np.allclose(g[..., 1].numpy(), box // 2 + r * np.sin(t), atol=1e-4)


def test_linear_radii_are_float32_in_each_module():
    assert linear_radii(0.5, 7.0, 4, np).dtype == np.float32
    assert linear_radii(0.5, 7.0, 4, torch).dtype == torch.float32

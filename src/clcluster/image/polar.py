"""Polar sampling grids: the one place that says where polar samples of an image lie.

A polar sample (radius r px, angle index i) about a centre (cx, cy) lies at pixel
x = cx + r cos(2 pi i / A), y = cy + r sin(2 pi i / A) (angles counter-clockwise from +x, A
angles over 360 degrees), with the centre at pixel (box//2, box//2) moved by an integer offset
(dx, dy) px. `imageops.polar_resample` (NumPy/CuPy), the polar encoder (`learn.models`) and the
alignment engines (`em.align`: `PolarGrid`, `PolarScanner`) all sample through
`polar_coordinates`, in the array module and precision each of them computes in.
"""
from __future__ import annotations

import math


def linear_radii(r_min: float, r_max: float, n_radii: int, xp):
    """n_radii radii (px) evenly from r_min to r_max inclusive, float32, in array module xp
    (numpy, cupy or torch)."""
    return xp.linspace(r_min, r_max, n_radii, dtype=xp.float32)


def polar_coordinates(box: int, radii, n_angles: int, offsets=None, xp=None):
    """Pixel coordinates (x, y) of polar samples about the centre pixel (box//2, box//2).

    radii (R,) px, in the array module and dtype the coordinates are computed in; angle index i
    at 2 pi i / n_angles radians (360 i / n_angles degrees), counter-clockwise. offsets (S, 2)
    = (dx, dy) px, same module and dtype: the samples about each moved centre, x and y
    (S, R, A); without offsets (R, A). xp: the array module of radii (numpy, cupy or torch;
    default numpy)."""
    if xp is None:
        import numpy as xp
    c = box // 2
    t = xp.arange(n_angles, dtype=radii.dtype)[None, :] * (2 * math.pi / n_angles)
    r = radii[:, None]
    x, y = r * xp.cos(t), r * xp.sin(t)
    if offsets is None:
        return c + x, c + y
    return c + offsets[:, 0, None, None] + x, c + offsets[:, 1, None, None] + y


def grid_sample_coordinates(x, y, box: int, xp, scale_first: bool = False):
    """Pixel coordinates x, y (...) as the normalised (..., 2) grid of torch's grid_sample with
    align_corners=True (-1 and 1 are the centres of pixels 0 and box-1): 2 x / (box - 1) - 1.
    scale_first: x (2 / (box - 1)) - 1 instead, the order `em.align.PolarScanner` computes in
    (float64; the two differ in the last bit for some boxes, and the scanner's results were made
    with this one)."""
    if scale_first:
        return xp.stack([x, y], -1) * (2.0 / (box - 1)) - 1.0
    return xp.stack([2 * x / (box - 1) - 1, 2 * y / (box - 1) - 1], -1)

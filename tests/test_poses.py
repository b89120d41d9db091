"""Local pose refinement: exported poses finer than the working box's pixel and angle grid.

Simulated particles with known in-plane poses (image = shift_s(rotate_a(projection)), the
package's pose convention); precision is measured against that truth."""
from __future__ import annotations

import numpy as np
import pytest
import starfile

from clcluster.image.ctf import CTFParams
from clcluster.steps.export import ExportConfig, export
from clcluster.image.imageops import fourier_shift, rotate
from clcluster.io.star import read_star
from clcluster.em.poses import refine_batch, rotation_matrices
from clcluster.steps.preprocess import PreprocessConfig, preprocess_batch
from clcluster.steps.simulate import SimulationConfig, simulate, write_simulation

STEP = 360.0 / 128  # the export's default working angle step


def _errors(angle, shift, truth):
    da = (np.asarray(angle) - truth.psi_deg.to_numpy() + 180.0) % 360.0 - 180.0
    ds = np.linalg.norm(np.asarray(shift) - truth[["shift_x_px", "shift_y_px"]].to_numpy(), axis=1)
    return float(np.sqrt(np.mean(da ** 2))), float(np.sqrt(np.mean(ds ** 2)))


@pytest.fixture(scope="module")
def sim():
    cfg = SimulationConfig(views=4, images_per_view=40, snr=0.2, seed=5)
    return cfg, simulate(cfg)


def test_refinement_recovers_exact_poses_from_the_quantised_grid(sim):
    """Noise-free images against the true projections: from poses rounded to the working grid
    (2.8 deg, 2 input px) back to the truth within 0.2 deg and 0.15 px."""
    _cfg, s = sim
    t = s.truth
    labels = t["class"].to_numpy()
    truth_shift = t[["shift_x_px", "shift_y_px"]].to_numpy()
    x = fourier_shift(rotate(s.projections[labels].astype(np.float32), t.psi_deg.to_numpy()), truth_shift)
    a0 = np.round(t.psi_deg.to_numpy() / STEP) * STEP
    s0 = np.round(truth_shift / 2.0) * 2.0
    before = _errors(a0, s0, t)
    r = refine_batch(x.astype(np.float32), labels, s.projections.astype(np.float32), a0, s0, STEP, 3.0)
    after = _errors(r.angle_deg, r.shift_px, t)
    print(f"quantised start: {before[0]:.2f} deg, {before[1]:.2f} px; refined: {after[0]:.3f} deg, {after[1]:.3f} px")
    assert after[0] < 0.2 < before[0] and after[1] < 0.15 < before[1]


def test_rotation_matrix_matches_imageops_rotate():
    """rotate(shift_s(z), -a) = shift_{R(a) s}(rotate(z, -a)): the identity the refinement uses."""
    y, x = np.mgrid[:48, :48] - 24.0
    z = (np.exp(-((x - 5) ** 2 + y ** 2) / 6.0) + np.exp(-(x ** 2 + (y - 8) ** 2) / 3.0))[None].astype(np.float32)
    s, a = np.array([[3.0, -1.5]]), 37.0
    lhs = rotate(fourier_shift(z, s), [-a])
    rhs = fourier_shift(rotate(z, [-a]), np.einsum("nij,nj->ni", rotation_matrices([a]), s))
    wrong = fourier_shift(rotate(z, [-a]), np.einsum("nij,nj->ni", rotation_matrices([-a]), s))
    assert np.abs(lhs - rhs).max() < 0.01 < np.abs(lhs - wrong).max()


def _scatter(psi, origin_A, truth, apix, labels):
    """RMS angle (deg) and shift (input px) error of exported poses against the truth, after
    removing each class's constant frame offset (a class average's frame is arbitrary):
    a = psi, s = -origin / apix; s_true - s = R(-a) c_j for a class constant c_j."""
    a_e, s_e = np.asarray(psi), -np.asarray(origin_A) / apix
    a_t, s_t = truth.psi_deg.to_numpy(), truth[["shift_x_px", "shift_y_px"]].to_numpy()
    da_all, ds_all = [], []
    for j in np.unique(labels):
        r = labels == j
        d = np.deg2rad(a_e[r] - a_t[r])
        da_all.append(np.rad2deg((d - np.angle(np.mean(np.exp(1j * d))) + np.pi) % (2 * np.pi) - np.pi))
        m = rotation_matrices(-a_e[r])
        c = np.einsum("nji,nj->ni", m, s_t[r] - s_e[r]).mean(0)
        ds_all.append(np.linalg.norm(s_t[r] - s_e[r] - np.einsum("nij,j->ni", m, c), axis=1))
    da, ds = np.concatenate(da_all), np.concatenate(ds_all)
    return float(np.sqrt(np.mean(da ** 2))), float(np.sqrt(np.mean(ds ** 2)))


@pytest.mark.slow
def test_exported_poses_beat_the_working_grid(tmp_path):
    """End to end through `export` (box 64 -> working 32, SNR 0.2): the refined poses' shift
    scatter against the truth is well under the working grid's (one working px = 2 input px)."""
    cfg = SimulationConfig(views=4, images_per_view=60, snr=0.2, seed=3, stack_size=120)
    s = simulate(cfg)
    table = read_star(write_simulation(s, cfg, tmp_path / "data"))
    labels = s.truth["class"].to_numpy().astype(np.int64)
    work = preprocess_batch(s.images, CTFParams.from_table(table), cfg.apix, PreprocessConfig(box=32))
    got = {}
    for refine in (False, True):
        out = tmp_path / f"export_{refine}"
        summary = export(table, {"labels": labels}, work, {"apix_A": cfg.apix * 2}, 4, out,
                         ExportConfig(refine_poses=refine, cryosparc=False))
        p = starfile.read(out / "particles_classified.star", always_dict=True)["particles"]
        got[refine] = _scatter(p["rlnAnglePsi"].to_numpy(), p[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy(),
                               s.truth, cfg.apix, labels)
    print(f"pose scatter vs truth: working grid {got[False][0]:.2f} deg, {got[False][1]:.2f} px; "
          f"refined {got[True][0]:.2f} deg, {got[True][1]:.2f} px")
    assert got[True][1] < 0.6 and got[True][1] < 0.75 * got[False][1]
    assert got[True][0] < got[False][0] + 0.1
    assert summary["pose_refinement"]["mean_ncc_after"] >= summary["pose_refinement"]["mean_ncc_before"]

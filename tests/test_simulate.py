import numpy as np
import pandas as pd

from clcluster.io import read_particles
from clcluster.io.mrc import read_images
from clcluster.steps.simulate import (SimulationConfig, min_pairwise_separation, simulate, truth_path, view_directions,
                                write_simulation)


def test_views_are_separated_including_antipodes():
    d = view_directions(10, 30.0, seed=1)
    assert min_pairwise_separation(d) >= 30.0
    assert np.all(np.abs(d @ d.T - np.eye(10)) <= np.cos(np.deg2rad(30.0)) + 1e-9)


def test_impossible_separation_is_refused():
    import pytest

    with pytest.raises(ValueError, match="cannot place"):
        view_directions(50, 40.0, seed=0)


def test_truth_consistent_with_star_and_snr(tmp_path):
    cfg = SimulationConfig(views=3, images_per_view=30, snr=0.1, stack_size=40, seed=5)
    sim = simulate(cfg)
    star = write_simulation(sim, cfg, tmp_path)
    table = read_particles(star)
    truth = pd.read_csv(truth_path(star))
    assert len(table) == len(truth) == 90
    assert (truth["rlnImageName"] == table.particles["rlnImageName"]).all()
    assert set(truth["class"]) == {0, 1, 2}
    assert truth["psi_deg"].between(0, 360).all() and truth["shift_x_px"].abs().max() <= cfg.max_shift_px
    # each class has one (rot, tilt)
    assert (truth.groupby("class")[["rot_deg", "tilt_deg"]].nunique() == 1).all().all()
    assert np.allclose(table.column("rlnDefocusU"), truth["defocus_u_A"], rtol=1e-5)
    assert np.allclose(table.pixel_size(), 2.5)
    # measured SNR of the written stack within 10 % of the asked one
    paths, idx = table.image_refs()
    noisy = read_images(paths, idx)
    snr = sim.clean.var(axis=(1, 2)).sum() / (noisy - sim.clean).var(axis=(1, 2)).sum()
    assert abs(snr / cfg.snr - 1) < 0.10


def test_simulation_is_deterministic():
    cfg = SimulationConfig(views=2, images_per_view=5, seed=9)
    a, b = simulate(cfg), simulate(cfg)
    assert np.array_equal(a.images, b.images)
    c = simulate(SimulationConfig(views=2, images_per_view=5, seed=10))
    assert not np.allclose(a.images, c.images)


def test_builtin_volumes_differ():
    from clcluster.steps.simulate import procedural_volume

    v0, v1 = procedural_volume(0, 48), procedural_volume(1, 48)
    assert np.corrcoef(v0.ravel(), v1.ravel())[0, 1] < 0.5

"""Shared fixtures: small simulated data sets (fixed seeds) made in the tests."""
from __future__ import annotations

import numpy as np
import pytest

from clcluster.simulate import SimulationConfig, simulate


@pytest.fixture(scope="session")
def easy_sim():
    """4 views x 50 images, box 64 at 2.5 Å/px, SNR 0.5 (easy)."""
    cfg = SimulationConfig(views=4, images_per_view=50, snr=0.5, seed=3)
    return cfg, simulate(cfg)


@pytest.fixture(scope="session")
def preprocessed_easy(easy_sim):
    """The easy set phase-flipped, cropped to 32 px (5 Å/px), background-normalised."""
    from clcluster.preprocess import PreprocessConfig, preprocess_batch

    cfg, sim = easy_sim
    return preprocess_batch(sim.images, sim.ctf, cfg.apix, PreprocessConfig(box=32)).astype(np.float32)

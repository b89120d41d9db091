"""The realistic simulation mode, its scores and the benchmark's realistic mode (fixed seeds)."""
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import starfile

from clcluster.sim.realistic import (FourierProjector, RealisticConfig, coloured_noise, crop_centre, noise_spectrum,
                                 radial_profile, rotation_matrices, sample_directions, vmf_directions)
from clcluster.bench.realistic_scores import (best_correlations, coherence_references, median_view_angle, selection_scores,
                                        view_score)
from clcluster.steps.simulate import SimulationConfig, add_noise, procedural_volume, project, simulate, simulate_clean

SMALL = dict(volumes=("builtin:0",), box=32, apix=5.0, mode="realistic", seed=3)


def small_realistic(**rc):
    cfg = SimulationConfig(**SMALL, realistic={"particles": 400, **rc})
    return cfg, simulate(cfg)


def test_grid_mode_is_the_default_and_unchanged():
    cfg = SimulationConfig(views=3, images_per_view=5, box=32, seed=1)
    assert cfg.mode == "grid"
    a = simulate(cfg)
    b = add_noise(simulate_clean(cfg), cfg.snr, cfg.seed)
    np.testing.assert_array_equal(a.images, b.images)
    with pytest.raises(ValueError, match="simulate.mode"):
        simulate(SimulationConfig(views=3, images_per_view=5, box=32, mode="discrete"))


def test_junk_fraction_kinds_and_shift_range():
    cfg, sim = small_realistic(junk_fraction=0.3, max_offset_fraction=0.1)
    t = sim.truth
    kinds = t["kind"].value_counts()
    assert kinds["particle"] == 280
    assert set(kinds.index) == {"particle", "empty", "ice_blob", "carbon_edge", "aggregate"}
    assert all(29 <= kinds[k] <= 31 for k in ("empty", "ice_blob", "carbon_edge", "aggregate"))
    r = np.hypot(t["shift_x_px"], t["shift_y_px"])
    assert r.max() <= 0.1 * 32 + 1e-6 and r.max() > 0.9 * 0.1 * 32
    assert np.all(np.abs(np.linalg.norm(t[["dir_x", "dir_y", "dir_z"]].to_numpy(), axis=1) - 1) < 1e-9)
    assert np.all(sim.clean[t["kind"].to_numpy() == "empty"] == 0)


def test_snr_is_measured_on_good_particles_and_noise_is_one_level():
    cfg, sim = small_realistic()
    good = sim.truth["kind"].to_numpy() == "particle"
    assert np.ptp(sim.noise_sigma) == 0
    assert sim.clean[good].var(axis=(1, 2)).mean() / sim.noise_sigma[0] ** 2 == pytest.approx(cfg.snr, rel=1e-4)


def test_noise_spectrum_measured_back_from_pure_noise():
    rc = RealisticConfig()
    spec = noise_spectrum(64, rc)
    noise = coloured_noise(400, spec, np.random.default_rng(0))
    assert noise.var() == pytest.approx(1.0, rel=0.03)
    measured = radial_profile((np.abs(np.fft.fft2(noise)) ** 2).mean(0) / 64 ** 2)
    want = radial_profile(spec)
    np.testing.assert_allclose(measured[1:], want[1:], rtol=0.1)
    assert measured[1] > 4 * measured[32]  # low-frequency rise over the roll-off
    assert want[0] == pytest.approx(8.3, abs=0.5) and want[32] == pytest.approx(0.63, abs=0.1)


def test_von_mises_fisher_concentration():
    rng = np.random.default_rng(0)
    mu = np.array([0.0, 0.6, 0.8])
    d = vmf_directions(mu, 30.0, 20000, rng)
    w = d @ mu
    assert w.mean() == pytest.approx(1 / np.tanh(30.0) - 1 / 30.0, abs=0.003)
    pref = sample_directions(5000, RealisticConfig(orientations="preferred", preferred_uniform_fraction=0.2), rng)
    uni = sample_directions(5000, RealisticConfig(), rng)
    # preferred views are clustered: K-means on them is much tighter than on uniform views
    assert coherence_references(pref, 3)["kmeans_truth_deg"] < 0.6 * coherence_references(uni, 3)["kmeans_truth_deg"]


def test_fourier_projector_matches_real_space_projection():
    vol = procedural_volume(0, 32, 5.0)
    fp = FourierProjector(vol)
    for rot, tilt in ((20.0, 50.0), (200.0, 130.0)):
        a = project(vol, rot, tilt)
        b = crop_centre(fp.project(rotation_matrices([rot], [tilt], [0.0])), 32)[0]
        assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.99


def test_envelope_is_not_written_and_truth_is_beside(tmp_path):
    r = subprocess.run([sys.executable, "-m", "clcluster.cli", "simulate", "--out-dir", str(tmp_path), "--mode", "realistic",
                        "--particles", "60", "--junk-fraction", "0.2", "--box", "32", "--apix", "5", "--seed", "2"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    star = starfile.read(tmp_path / "particles.star")["particles"]
    truth = pd.read_csv(tmp_path / "particles_truth.csv")
    assert len(star) == len(truth) == 60
    assert (star["rlnCtfBfactor"] == 0).all() and (truth["envelope_bfactor"] == 150).all()
    assert (truth["kind"] != "particle").sum() == 12
    assert list(truth["rlnImageName"]) == list(star["rlnImageName"])


def test_view_coherence_scores():
    rng = np.random.default_rng(1)
    dirs = sample_directions(3000, RealisticConfig(), rng)
    refs = coherence_references(dirs, 10, seed=0)
    assert refs["random_deg"] > 70 and refs["kmeans_truth_deg"] < 35
    from sklearn.cluster import KMeans

    perfect = KMeans(10, n_init=4, random_state=0).fit_predict(dirs)
    assert view_score(median_view_angle(dirs, perfect), refs) == pytest.approx(1.0, abs=0.01)
    assert abs(view_score(median_view_angle(dirs, rng.integers(0, 10, 3000)), refs)) < 0.05


def test_selection_scores_per_kind():
    kinds = np.array(["particle"] * 6 + ["empty", "empty", "ice_blob", "aggregate"])
    kept = np.array([1, 1, 1, 1, 1, 0, 0, 1, 0, 1], bool)
    s = selection_scores(kinds, kept)
    assert s["good_kept"] == pytest.approx(5 / 6) and s["junk_removed"] == pytest.approx(0.5)
    assert s["removed_empty"] == 0.5 and s["removed_ice_blob"] == 1.0 and s["removed_aggregate"] == 0.0
    assert s["purity_in"] == pytest.approx(0.6) and s["purity_kept"] == pytest.approx(5 / 7)


def test_fidelity_finds_a_rotated_shifted_reference_and_not_noise():
    from clcluster.image.imageops import rotate

    vol = procedural_volume(1, 32, 5.0)
    fp = FourierProjector(vol)
    refs = crop_centre(fp.project(rotation_matrices([0, 60, 120], [30, 90, 150], [0, 0, 0])), 32)
    avg = np.roll(rotate(refs[1:2], np.array([40.0])), (1, -1), axis=(1, 2))
    noise = np.random.default_rng(0).normal(size=(1, 32, 32)).astype(np.float32)
    c = best_correlations(np.concatenate([avg, noise]), refs, apix=5.0, resolution_A=20.0)
    assert c[0] > 0.95 and c[1] < 0.5


def test_realistic_benchmark_scores_every_method(tmp_path):
    from clcluster.core.config import load_config
    from clcluster.bench.realistic_benchmark import RealisticBenchmarkConfig, run_realistic_benchmark

    cfg = load_config(None)
    sc = SimulationConfig(**SMALL, realistic={"particles": 160, "junk_fraction": 0.25})
    bc = RealisticBenchmarkConfig(classes=4, methods=("random", "truth_kmeans", "truth_poses", "template"), fidelity_directions=60,
                                  template_directions=40, template_max_shift_px=2)
    df = run_realistic_benchmark(bc, cfg, tmp_path, sc)
    assert list(df["method"]) == ["random", "truth_kmeans", "truth_poses", "template"]
    assert (tmp_path / "results.csv").exists() and "truth_kmeans" in (tmp_path / "results.md").read_text()
    by = df.set_index("method")
    assert by.loc["truth_kmeans", "view_score"] == pytest.approx(1.0)
    assert by.loc["random", "view_score"] < 0.5
    for col in ("junk_removed", "good_kept", "removed_empty", "removed_aggregate", "fidelity", "fidelity_with_rotavg"):
        assert df[col].between(-1, 1).all(), col
    assert (df["purity_in"] == 0.75).all()
    # averages started from the true poses are at least as close to the map as reference-free ones
    assert by.loc["truth_poses", "fidelity_with_rotavg"] >= by.loc["truth_kmeans", "fidelity_with_rotavg"] - 0.02


def test_benchmark_prepare_whitens_as_the_pipeline_does():
    from clcluster.bench.benchmark import prepare
    from clcluster.image.ctf import CTFParams
    from clcluster.steps.preprocess import PreprocessConfig, radial_noise_spectrum

    noise = coloured_noise(300, noise_spectrum(64, RealisticConfig()), np.random.default_rng(0))
    n = len(noise)
    ctf = CTFParams(np.full(n, 15000.0), np.full(n, 15000.0), np.zeros(n), np.full(n, 300.0), np.full(n, 2.7),
                    np.full(n, 0.1), np.zeros(n), np.zeros(n))
    plain = radial_noise_spectrum(prepare(noise, ctf, 5.0, PreprocessConfig(box=32, whiten=False)))
    white = radial_noise_spectrum(prepare(noise, ctf, 5.0, PreprocessConfig(box=32, whiten=True)))
    assert plain[2] / plain[14] > 3  # coloured before
    assert 0.6 < white[2] / white[14] < 1.6  # flat after whitening


def test_true_working_spectrum_whitens_the_noise_after_preprocessing():
    """The simulator's spectrum at the working box (the oracle bound of the benchmark's
    whiten_spectrum="true"): prepare() with it flattens pure coloured noise as well as the
    estimate from the images does."""
    from clcluster.bench.benchmark import prepare
    from clcluster.bench.realistic_benchmark import true_working_spectrum
    from clcluster.image.ctf import CTFParams
    from clcluster.steps.preprocess import PreprocessConfig, radial_noise_spectrum

    rc = RealisticConfig()
    noise = coloured_noise(300, noise_spectrum(64, rc), np.random.default_rng(1))
    n = len(noise)
    ctf = CTFParams(np.full(n, 15000.0), np.full(n, 15000.0), np.zeros(n), np.full(n, 300.0), np.full(n, 2.7),
                    np.full(n, 0.1), np.zeros(n), np.zeros(n))
    true = true_working_spectrum(64, 32, rc)
    assert true.shape == (17,) and true[1] > 4 * true[16]
    white = radial_noise_spectrum(prepare(noise, ctf, 5.0, PreprocessConfig(box=32, whiten=True), spectrum=true))[1:16]
    assert white.max() / white.min() < 1.3

"""Preprocessing (CTF correction, Fourier crop, low-pass, background normalisation, soft mask,
whitening, per-shard driver). Array-module tests take the `xp`/`xpcall` fixtures (conftest.py):
NumPy always; CuPy, compared with NumPy within float tolerance, only on a GPU machine (skipped
with "CuPy/GPU not available" elsewhere: the CuPy paths have not run on a CPU-only machine)."""
import json
import tracemalloc

import numpy as np
import pytest

import clcluster.steps.preprocess as pp
from clcluster.core.backend import gpu_available
from clcluster.image.imageops import fourier_filter, freq_grid, radius_grid
from clcluster.io.star import read_star
from clcluster.steps.preprocess import (PreprocessConfig, estimate_noise_spectrum, preprocess_batch, preprocess_table,
                                        radial_noise_spectrum, whiten)
from clcluster.steps.simulate import SimulationConfig, simulate, write_simulation


def _coloured_noise(n, box, seed):
    """White Gaussian noise through a radial filter whose power falls ~100x from DC to Nyquist."""
    rng = np.random.default_rng(seed)
    fy, fx = freq_grid(box, 1.0)
    f = np.sqrt(fx ** 2 + fy ** 2)
    return fourier_filter(rng.normal(size=(n, box, box)).astype(np.float32), 1.0 / (1.0 + (f / 0.05) ** 2) ** 0.5)


@pytest.mark.parametrize("ctf_mode,extra", [("phase_flip", {}), ("wiener", {"wiener_snr": 1.0}), ("none", {}),
                                            ("phase_flip", {"lowpass_A": 12.0, "mask_radius_px": 10.0})])
def test_preprocess_batch_shapes_and_devices(easy_sim, xpcall, ctf_mode, extra):
    cfg, sim = easy_sim
    pc = PreprocessConfig(box=32, ctf=ctf_mode, **extra)
    out = xpcall(preprocess_batch, sim.images[:16], sim.ctf.subset(np.arange(16)), cfg.apix, pc, atol=2e-3)
    assert out.shape == (16, 32, 32) and out.dtype == np.float32
    if "mask_radius_px" not in extra:  # RELION convention: background mean 0, std 1
        bg = out[:, radius_grid(32) > pc.bg_radius()]
        assert np.allclose(bg.mean(1), 0, atol=1e-4) and np.allclose(bg.std(1), 1, atol=1e-3)
    else:  # soft mask: 1 inside the radius, 0 beyond radius + 3 px edge
        assert np.all(out[:, radius_grid(32) >= 13.0] == 0)


def test_optional_lowpass_removes_power_beyond_cutoff(easy_sim, xpcall):
    cfg, sim = easy_sim  # 64 px at 2.5 Å/px → 32 px at 5 Å/px, Nyquist 10 Å
    out = xpcall(preprocess_batch, sim.images[:16], sim.ctf.subset(np.arange(16)), cfg.apix,
                 PreprocessConfig(box=32, lowpass_A=20.0), atol=2e-3)
    ref = xpcall(preprocess_batch, sim.images[:16], sim.ctf.subset(np.arange(16)), cfg.apix,
                 PreprocessConfig(box=32), atol=2e-3)
    fy, fx = freq_grid(32, 5.0)
    f = np.sqrt(fx ** 2 + fy ** 2)
    p, p_ref = np.abs(np.fft.rfft2(out)) ** 2, np.abs(np.fft.rfft2(ref)) ** 2
    beyond = f > 1 / 20.0 + 0.01  # past the 0.02 1/Å raised-cosine edge
    assert p[:, beyond].sum() < 1e-8 * p_ref[:, beyond].sum()
    assert p[:, (f > 0) & (f < 1 / 20.0 - 0.01)].sum() > 0.1 * p_ref[:, (f > 0) & (f < 1 / 20.0 - 0.01)].sum()


def test_whitening_flattens_radial_noise_spectrum(xpcall):
    box = 64
    train, test = _coloured_noise(200, box, 0), _coloured_noise(200, box, 1)
    before = radial_noise_spectrum(test)[1:]
    assert before.max() / before.min() > 20
    spec = xpcall(radial_noise_spectrum, train, rtol=1e-3)
    after = radial_noise_spectrum(xpcall(whiten, test, spec, rtol=1e-3, atol=1e-3))[1:]
    # the spectrum estimated on other noise images flattens this set within sampling error
    assert after.max() / after.min() < 1.25
    assert np.allclose(after, 1.0, rtol=0.15)


def test_background_estimate_leaves_out_a_centred_particle():
    """Coloured noise plus a strong centred blob (radius ~5 px, inside the 12 px background
    radius): the whole-image estimate takes the blob's low-frequency power for noise; the
    background estimate stays within 20 % of the noise-only spectrum in every shell 1..16."""
    box = 32
    noise = _coloured_noise(400, box, 2)
    blob = 4.0 * np.exp(-radius_grid(box) ** 2 / (2 * 3.0 ** 2)).astype(np.float32)
    truth = radial_noise_spectrum(_coloured_noise(400, box, 3))[1:]
    cfg = PreprocessConfig(box=box, whiten=True, whiten_estimate="background")
    bg = estimate_noise_spectrum(noise + blob, cfg)[1:]
    whole = estimate_noise_spectrum(noise + blob, PreprocessConfig(box=box, whiten=True))[1:]
    assert np.all(np.abs(bg / truth - 1) < 0.2)
    assert np.max(whole / truth) > 2.0  # the signal inflates the whole-image estimate
    with pytest.raises(ValueError, match="whiten_estimate"):
        estimate_noise_spectrum(noise, PreprocessConfig(whiten_estimate="residual"))


@pytest.fixture(scope="module")
def sim_star(tmp_path_factory):
    """A simulated 3.1 STAR: 384 particles of 128 px at 1.25 Å/px in 4 stacks of 100."""
    cfg = SimulationConfig(views=2, images_per_view=192, box=128, apix=1.25, stack_size=100, snr=0.1, seed=4)
    sim = simulate(cfg)
    return write_simulation(sim, cfg, tmp_path_factory.mktemp("sim")), sim, cfg


def test_preprocess_table_writes_float16_and_sidecar(sim_star, tmp_path, monkeypatch):
    star, sim, cfg = sim_star
    table = read_star(star).subset(np.arange(150))
    reads = []
    real_read = pp.read_images
    monkeypatch.setattr(pp, "read_images", lambda paths, idx, names=None, whole=None: reads.append(len(paths)) or real_read(paths, idx, names, whole))
    pc = PreprocessConfig(box=64, batch_size=64, ctf="phase_flip", mask_radius_px=24, whiten=False)
    meta = preprocess_table(table, tmp_path / "shard_0.npy", pc, device="cpu")
    assert reads == [64, 64, 22]  # one batch of raw images at a time
    out = np.load(tmp_path / "shard_0.npy", mmap_mode="r")
    assert out.dtype == np.float16 and out.shape == (150, 64, 64)
    side = json.loads((tmp_path / "shard_0.json").read_text())
    assert side == meta
    assert side["box"] == 64 and side["input_box"] == 128 and side["particles"] == 150
    assert side["input_apix_A"] == pytest.approx(1.25) and side["apix_A"] == pytest.approx(2.5)
    assert side["ctf_correction"] == "phase_flip" and side["star_labels"]["rlnCtfDataArePhaseFlipped"] == 1
    assert side["star_labels"]["rlnImagePixelSize"] == pytest.approx(2.5) and side["star_labels"]["rlnImageSize"] == 64
    assert side["steps"] == ["ctf_phase_flip", "fourier_crop_128_to_64", "normalise_background_r24px", "soft_mask_r24px"]
    assert side["particle_radius_px"] == pytest.approx(24.0)  # the background radius: the pick contrast's disc
    assert side["dtype"] == "float16" and side["array_module"] == "numpy" and side["batch_size"] == 64
    # the same numbers as preprocessing the images in memory (up to float16 rounding)
    ref = preprocess_batch(sim.images[:150], sim.ctf.subset(np.arange(150)), cfg.apix, pc)
    assert np.allclose(out.astype(np.float32), ref, atol=2e-2, rtol=1e-2)


def test_preprocess_table_whitening_and_no_ctf(sim_star, tmp_path):
    star, sim, cfg = sim_star
    table = read_star(star).subset(np.arange(128))
    pc = PreprocessConfig(box=32, batch_size=50, ctf="none", whiten=True)
    meta = preprocess_table(table, tmp_path / "w.npy", pc, device="cpu")
    out = np.load(tmp_path / "w.npy").astype(np.float32)
    assert meta["star_labels"]["rlnCtfDataArePhaseFlipped"] == 0 and meta["whitened"]
    assert "whiten" in meta["steps"] and len(meta["noise_spectrum"]) == 17
    spec = radial_noise_spectrum(out)[1:]  # SNR 0.1: nearly all noise, so nearly flat after whitening
    before = radial_noise_spectrum(preprocess_batch(sim.images[:128], None, cfg.apix, pc))[1:]
    assert spec.max() / spec.min() < 0.5 * before.max() / before.min()
    bg = out[:, radius_grid(32) > pc.bg_radius()]
    assert np.allclose(bg.mean(1), 0, atol=2e-3) and np.allclose(bg.std(1), 1, atol=5e-3)
    # the background estimate: the same driver, a spectrum measured outside bg_radius only
    pb = PreprocessConfig(box=32, batch_size=50, ctf="none", whiten=True, whiten_estimate="background")
    mb = preprocess_table(table, tmp_path / "b.npy", pb, device="cpu")
    ref = estimate_noise_spectrum(preprocess_batch(sim.images[:128], None, cfg.apix, pb, mask=False), pb)
    assert np.allclose(mb["noise_spectrum"], ref, rtol=2e-2)
    assert not np.allclose(mb["noise_spectrum"], meta["noise_spectrum"], rtol=2e-2)


def test_spectrum_rows_are_evenly_spaced_over_the_whole_set():
    assert pp.spectrum_rows(0).size == 0
    assert list(pp.spectrum_rows(5, 2000)) == [0, 1, 2, 3, 4]
    rows = pp.spectrum_rows(10_000, 2000)
    assert rows.size == 2000 and rows[0] == 0 and rows[-1] == 9_999 and set(np.diff(rows)) <= {5, 6}


def test_shards_whitened_by_the_sets_spectrum_equal_the_unsharded_set(sim_star, tmp_path):
    """One spectrum for the whole set: preprocessing two shards with it gives the same pixels
    as preprocessing the whole set at once (which estimates the same spectrum itself), while
    each shard's own spectrum would differ."""
    star, _, _ = sim_star
    table = read_star(star).subset(np.arange(200))
    pc = PreprocessConfig(box=32, batch_size=64, whiten=True)
    spectrum = pp.table_noise_spectrum(table, pc, "cpu")
    whole = preprocess_table(table, tmp_path / "all.npy", pc, device="cpu")
    assert np.allclose(whole["noise_spectrum"], spectrum, rtol=1e-12)
    parts = [table.subset(np.arange(0, 120)), table.subset(np.arange(120, 200))]
    for i, part in enumerate(parts):
        preprocess_table(part, tmp_path / f"s{i}.npy", pc, device="cpu", spectrum=spectrum)
    sharded = np.concatenate([np.load(tmp_path / f"s{i}.npy") for i in range(2)])
    assert np.array_equal(sharded, np.load(tmp_path / "all.npy"))
    own = pp.table_noise_spectrum(parts[1], pc, "cpu")
    assert not np.allclose(own, spectrum, rtol=1e-3)


def test_spectrum_file_round_trip_and_refusals(sim_star, tmp_path):
    star, _, _ = sim_star
    table = read_star(star).subset(np.arange(40))
    pc = PreprocessConfig(box=32, whiten=True)
    spectrum = pp.table_noise_spectrum(table, pc, "cpu")
    pp.write_spectrum(tmp_path / "s.json", spectrum, table, pc)
    assert np.array_equal(pp.read_spectrum(tmp_path / "s.json", 32), spectrum)
    with pytest.raises(ValueError, match=r"s\.json: the noise spectrum is for a 32 px box, the working box is 64 px"):
        pp.read_spectrum(tmp_path / "s.json", 64)
    bad = json.loads((tmp_path / "s.json").read_text())
    bad["noise_spectrum"][3] = -1.0
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="bad.json: the noise spectrum has non-finite or non-positive power"):
        pp.read_spectrum(tmp_path / "bad.json", 32)
    (tmp_path / "junk.json").write_text("{}")
    with pytest.raises(ValueError, match="junk.json: not a noise spectrum file"):
        pp.read_spectrum(tmp_path / "junk.json", 32)


def test_preprocess_table_memory_does_not_grow_with_the_shard(sim_star, tmp_path):
    """Peak Python-heap allocation (tracemalloc; NumPy registers its buffers) while preprocessing
    96 and 384 particles of 128 px with batch_size 64: the same, and a fixed multiple of one raw
    float32 batch (FFT work arrays; measured ~7.6x with NumPy 2.4). The output is a memory map
    on disk, not counted."""
    star, _, _ = sim_star
    table = read_star(star)
    pc = PreprocessConfig(box=64, batch_size=64, whiten=True)
    batch_raw = 64 * 128 * 128 * 4
    peaks = []
    for n in (96, 384):
        tracemalloc.start()
        try:
            preprocess_table(table.subset(np.arange(n)), tmp_path / f"m{n}.npy", pc, device="cpu")
            peaks.append(tracemalloc.get_traced_memory()[1])
        finally:
            tracemalloc.stop()
    assert peaks[1] < 1.1 * peaks[0] + 1e6
    assert peaks[1] < 10 * batch_raw


@pytest.mark.gpu
@pytest.mark.skipif(not gpu_available(), reason="CuPy/GPU not available")
def test_preprocess_table_on_cupy_matches_numpy(sim_star, tmp_path):
    star, _, _ = sim_star
    table = read_star(star).subset(np.arange(100))
    pc = PreprocessConfig(box=64, batch_size=32, ctf="wiener", whiten=True, mask_radius_px=24)
    m_gpu = preprocess_table(table, tmp_path / "g.npy", pc, device="cuda")
    m_cpu = preprocess_table(table, tmp_path / "c.npy", pc, device="cpu")
    assert m_gpu["array_module"] == "cupy" and m_cpu["array_module"] == "numpy"
    assert np.allclose(np.load(tmp_path / "g.npy").astype(np.float32), np.load(tmp_path / "c.npy").astype(np.float32),
                       atol=2e-2, rtol=1e-2)


def test_background_radius_in_angstrom(easy_sim):
    cfg, sim = easy_sim  # 64 px at 2.5 Å/px → 32 px at 5 Å/px
    pc = PreprocessConfig(box=32, bg_radius_A=60.0, bg_radius_px=5)
    assert pc.bg_radius(5.0) == pytest.approx(12.0)
    assert PreprocessConfig(box=32).bg_radius() == pytest.approx(12.0)  # RELION default 0.375 x box
    with pytest.raises(ValueError, match="working pixel size"):
        pc.bg_radius()
    out = preprocess_batch(sim.images[:8], sim.ctf.subset(np.arange(8)), cfg.apix, pc)
    bg = out[:, radius_grid(32) > 12.0]
    assert np.allclose(bg.mean(1), 0, atol=1e-4) and np.allclose(bg.std(1), 1, atol=1e-3)


@pytest.mark.parametrize("mode", ["phase_flip", "wiener"])
def test_preprocess_batch_equals_the_step_by_step_chain(easy_sim, mode):
    from clcluster.image.ctf import phase_flip, wiener_filter
    from clcluster.image.imageops import fourier_crop, normalise_background

    cfg, sim = easy_sim
    ctf = sim.ctf.subset(np.arange(10))
    pc = PreprocessConfig(box=32, ctf=mode, wiener_snr=2.0)
    corrected = phase_flip(sim.images[:10], ctf, cfg.apix) if mode == "phase_flip" else \
        wiener_filter(sim.images[:10], ctf, cfg.apix, 2.0)
    chain = normalise_background(fourier_crop(corrected, 32), pc.bg_radius())
    assert np.allclose(preprocess_batch(sim.images[:10], ctf, cfg.apix, pc), chain, atol=1e-4)

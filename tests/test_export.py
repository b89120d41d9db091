"""Export step: aligned CTF-aware class averages, RELION/cryoSPARC exports, class quality.

Simulated data at SNR 0.05 (4 views x 60 images, 64 px at 2.5 Å/px, working box 32 px); the
simulator's true classes are the labels so that the averages are tested, not the clustering."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import starfile
from scipy import ndimage

from clcluster.em.averages import (aligned_means, class_quality, energy_concentration, frc, relion_pose,
                                   resolution_from_frc)
from clcluster.image.ctf import CTFParams, phase_flip
from clcluster.steps.export import ExportConfig, export
from clcluster.image.imageops import rotate
from clcluster.io.cryosparc import read_cs
from clcluster.io.mrc import read_images
from clcluster.io.star import read_star
from clcluster.steps.preprocess import PreprocessConfig, preprocess_batch
from clcluster.steps.simulate import SimulationConfig, simulate, write_simulation

K = 4
WORK_BOX = 32


def searched_ncc(img: np.ndarray, ref: np.ndarray, step: int = 3) -> float:
    """Best normalised cross-correlation of img with ref over rotations (step degrees) and all
    (circular) shifts: the class frame is arbitrary."""
    ref = ref - ref.mean()
    fr = np.conj(np.fft.rfft2(ref))
    nref = np.linalg.norm(ref)
    best = -1.0
    for th in range(0, 360, step):
        r = rotate(img[None].astype(np.float32), [th])[0]
        r = r - r.mean()
        cc = np.fft.irfft2(np.fft.rfft2(r) * fr, s=ref.shape).max() / (np.linalg.norm(r) * nref)
        best = max(best, float(cc))
    return best


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    d = tmp_path_factory.mktemp("export")
    cfg = SimulationConfig(views=K, images_per_view=60, snr=0.05, seed=3, stack_size=100)
    sim = simulate(cfg)
    star = write_simulation(sim, cfg, d / "data")
    table = read_star(star)
    labels = np.array(sim.truth["class"].to_numpy(), dtype=np.int64)
    work = preprocess_batch(sim.images, CTFParams.from_table(table), cfg.apix, PreprocessConfig(box=WORK_BOX))
    rng = np.random.default_rng(0)
    n = len(labels)
    assignments = {"labels": labels, "distance": rng.uniform(0.2, 0.8, n), "margin": rng.uniform(0, 0.3, n),
                   "probability": rng.uniform(0.3, 1.0, n), "stability": np.array([1.0, 0.9, 0.4, np.nan]),
                   "seed_ari": np.float64(0.8)}
    emb = rng.standard_normal((n, 16)).astype(np.float32) + 3 * np.eye(16, dtype=np.float32)[labels]
    meta = {"apix_A": cfg.apix * cfg.box / WORK_BOX, "input_apix_A": cfg.apix, "input_box": cfg.box}
    out = d / "export"
    summary = export(table, assignments, work, meta, K, out, ExportConfig(tsne_max_points=120), embeddings=emb)
    return {"sim": sim, "cfg": cfg, "star": star, "table": table, "labels": labels, "out": out, "probability": assignments["probability"],
            "summary": summary, "work_apix": meta["apix_A"]}


def test_aligned_averages_match_projections_far_better_than_unaligned_means(run):
    sim, out = run["sim"], run["out"]
    avgs = read_images([out / "class_averages.mrcs"] * K, np.arange(K))
    assert avgs.shape == (K, 64, 64)  # input box, from the original images
    plain = aligned_means(sim.images, run["labels"], K)
    aligned = [searched_ncc(avgs[j], sim.projections[j]) for j in range(K)]
    unaligned = [searched_ncc(plain[j], sim.projections[j]) for j in range(K)]
    print("rotation-searched NCC aligned", np.round(aligned, 3), "unaligned", np.round(unaligned, 3))
    assert min(aligned) > 0.75
    assert np.mean(aligned) > np.mean(unaligned) + 0.25


def _image_names(path):
    d = starfile.read(path, always_dict=True)
    return d["particles"]["rlnImageName"].astype(str).tolist(), d


def test_every_star_rereads_without_loss_or_duplicates(run):
    out, n = run["out"], len(run["labels"])
    src, _ = _image_names(run["star"])
    names, d = _image_names(out / "particles_classified.star")
    assert names == src and len(set(names)) == n
    assert "optics" in d and len(d["optics"]) == 1
    per_class = []
    for j in range(1, K + 1):
        nm, dj = _image_names(out / "classes" / f"class_{j:03d}.star")
        assert (dj["particles"]["rlnClassNumber"] == j).all()
        per_class += nm
    assert sorted(per_class) == sorted(src) and len(set(per_class)) == n
    sel, ds = _image_names(out / "particles_selected.star")
    assert len(set(sel)) == len(sel) and set(sel) <= set(src)
    chosen = set(ds["particles"]["rlnClassNumber"])
    assert chosen == set(run["summary"]["selected_classes"]) and len(sel) == run["summary"]["selected_particles"]
    model = starfile.read(out / "class_averages.star", always_dict=True)
    mc = model["model_classes"]
    assert len(mc) == K and abs(mc["rlnClassDistribution"].sum() - 1) < 1e-9
    assert mc["rlnReferenceImage"].tolist()[0] == "000001@class_averages.mrcs"
    assert (mc["rlnEstimatedResolution"] >= 2 * run["cfg"].apix).all()


def test_columns_relion_needs_for_reconstruction_with_units(run):
    d = starfile.read(run["out"] / "particles_classified.star", always_dict=True)
    optics, p = d["optics"], d["particles"]
    for col in ("rlnOpticsGroup", "rlnImagePixelSize", "rlnImageSize", "rlnImageDimensionality", "rlnVoltage",
                "rlnSphericalAberration", "rlnAmplitudeContrast"):
        assert col in optics, col
    assert optics["rlnImagePixelSize"].iloc[0] == pytest.approx(2.5)  # Å/px
    assert optics["rlnImageSize"].iloc[0] == 64 and optics["rlnImageDimensionality"].iloc[0] == 2
    assert optics["rlnVoltage"].iloc[0] == pytest.approx(300.0)  # kV
    assert optics["rlnSphericalAberration"].iloc[0] == pytest.approx(2.7)  # mm
    for col in ("rlnImageName", "rlnOpticsGroup", "rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle", "rlnAnglePsi",
                "rlnOriginXAngst", "rlnOriginYAngst", "rlnClassNumber", "rlnClclusterDistance", "rlnClclusterMargin"):
        assert col in p, col
    assert np.allclose(p["rlnClclusterClassProbability"], run["probability"])
    assert p["rlnImageName"].str.match(r"^\d+@\S+\.mrcs$").all()
    assert p["rlnDefocusU"].between(5000, 50000).all()  # Å
    assert p["rlnAnglePsi"].between(-180, 180).all()  # degrees
    assert pd.api.types.is_integer_dtype(p["rlnClassNumber"]) and set(p["rlnClassNumber"]) <= set(range(1, K + 1))
    max_A = (ExportConfig().align_max_shift_px * np.sqrt(2) + 1e-6) * run["work_apix"]  # search radius 2 working px
    assert (np.hypot(p["rlnOriginXAngst"], p["rlnOriginYAngst"]) <= max_A).all()  # Å, not px
    assert np.abs(p["rlnOriginXAngst"]).max() > 1.0


def relion_centre(images, psi_deg, origin_px):
    """RELION's reading of a 2D pose, written from its definitions rather than our imageops:
    shift the image by +origin (relion_reconstruct), then undo psi: the observation P is the
    reference R sampled as P(p) = R(A(psi)^T p) (Projector::rotate2D, A = Euler matrix of
    (0, 0, psi)), so R(q) = P(A q) with A = [[c, s], [-s, c]] in (x, y)."""
    out = np.empty_like(images)
    box = images.shape[-1]
    c0 = box // 2
    for i, (img, psi, o) in enumerate(zip(images, psi_deg, origin_px)):
        x = ndimage.shift(img, (o[1], o[0]), order=1, mode="constant")
        c, s = np.cos(np.deg2rad(psi)), np.sin(np.deg2rad(psi))
        m = np.array([[c, -s], [s, c]])  # A in (row=y, col=x) order
        out[i] = ndimage.affine_transform(x, m, offset=c0 - m @ [c0, c0], order=1, mode="constant")
    return out


def test_pose_follows_relion_convention(run):
    """Centring the original images as RELION would, from the written psi and origins, gives a
    sharp average; the opposite signs do not."""
    p = starfile.read(run["out"] / "particles_classified.star", always_dict=True)["particles"]
    sim, table, labels = run["sim"], run["table"], run["labels"]
    x = phase_flip(sim.images, CTFParams.from_table(table), run["cfg"].apix)
    origin_px = p[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy() / run["cfg"].apix
    psi = p["rlnAnglePsi"].to_numpy()
    right, wrong = [], []
    for j in range(2):
        rows = np.flatnonzero(labels == j)
        good = relion_centre(x[rows], psi[rows], origin_px[rows]).mean(0)
        bad = relion_centre(x[rows], -psi[rows], -origin_px[rows]).mean(0)
        right.append(searched_ncc(good, sim.projections[j], 6))
        wrong.append(searched_ncc(bad, sim.projections[j], 6))
    print("RELION-convention centring: right signs", np.round(right, 3), "wrong signs", np.round(wrong, 3))
    assert min(right) > max(wrong) + 0.1  # refined poses raise the wrong-sign centring too (0.58-0.67)


def test_relion_pose_signs():
    psi, ox, oy = relion_pose([190.0, -10.0, 180.0], [[1.0, -2.0], [0, 0], [0.5, 0]], 5.0)
    np.testing.assert_allclose(psi, [-170.0, -10.0, 180.0])
    np.testing.assert_allclose(ox, [-5.0, 0.0, -2.5])
    np.testing.assert_allclose(oy, [10.0, 0.0, 0.0])


def test_cryosparc_dataset_rereads(run):
    out, n = run["out"], len(run["labels"])
    cs = np.load(out / "particles_classified.cs")
    for field in ("uid", "blob/path", "blob/idx", "blob/shape", "blob/psize_A", "ctf/df1_A", "ctf/accel_kv",
                  "alignments2D/class", "alignments2D/pose", "alignments2D/shift", "alignments2D/psize_A"):
        assert field in cs.dtype.names, field
    assert len(np.unique(cs["uid"])) == n
    np.testing.assert_array_equal(cs["alignments2D/class"], run["labels"])
    t = read_cs(out / "particles_classified.cs")
    assert len(t) == n
    src = run["table"]
    assert [p.resolve() for p in t.image_refs()[0]] == [p.resolve() for p in src.image_refs()[0]]
    np.testing.assert_array_equal(t.image_refs()[1], src.image_refs()[1])
    np.testing.assert_allclose(t.particles["rlnDefocusU"], src.particles["rlnDefocusU"], rtol=1e-6)
    sel = np.load(out / "particles_selected.cs")
    assert len(sel) == run["summary"]["selected_particles"]


def test_pictures_and_summary(run):
    out = run["out"]
    for name in ("class_averages.png", "frc.png", "embedding_map.png", "class_quality.csv", "summary.json"):
        assert (out / name).stat().st_size > 0, name
    s = json.loads((out / "summary.json").read_text())
    assert sorted(s["rank_order"]) == list(range(1, K + 1))
    q = pd.read_csv(out / "class_quality.csv")
    assert list(q.sort_values("rank")["class"]) == s["rank_order"]
    # the cluster step's seed stability, per class (NaN: not measured), and in the model STAR
    np.testing.assert_allclose(q["stability"], [1.0, 0.9, 0.4, np.nan])
    model = starfile.read(out / "class_averages.star", always_dict=True)["model_classes"]
    np.testing.assert_allclose(model["rlnClclusterStability"], [1.0, 0.9, 0.4, np.nan])
    assert s["seed_ari"] == pytest.approx(0.8)


def test_unstable_classes_suggested_as_junk_only_when_asked():
    from clcluster.steps.export import add_stability

    labels = np.repeat([0, 1, 2, 3], [50, 30, 15, 10])
    q = class_quality(labels, 4, np.array([12.0, 14.0, 10.0, 8.0]), junk_resolution_A=25.0, min_class_fraction=0.05)
    stab = np.array([0.9, 0.3, np.nan, 0.7])
    off = add_stability(q, stab)
    assert off["selected"].all() and off["stability"].iloc[1] == 0.3
    on = add_stability(q, stab, min_stability=0.5)
    assert on["suggestion"].tolist() == ["good", "junk", "good", "good"]  # unmeasured class 3 not judged
    assert on["selected"].tolist() == [True, False, True, True]
    user = add_stability(class_quality(labels, 4, np.full(4, 12.0), select=[2]), stab, min_stability=0.5, user_select=True)
    assert user["selected"].tolist() == [False, True, False, False]  # the user's list wins; suggestion still junk
    assert user["suggestion"][1] == "junk"
    none = add_stability(q, np.zeros(4), min_stability=0.5)
    assert none["selected"].sum() == 1 and bool(none.loc[none["rank"] == 1, "selected"].iloc[0])  # never empty
    assert "stability" not in add_stability(q, None) and "stability" not in add_stability(q, np.ones(3))


def test_frc_resolution():
    rng = np.random.default_rng(1)
    a = rng.standard_normal((64, 64))
    assert resolution_from_frc(frc(a, a), 64, 2.0) == pytest.approx(4.0)  # Nyquist
    b = rng.standard_normal((64, 64))
    assert resolution_from_frc(frc(a, b), 64, 2.0) > 20.0  # independent noise: no resolution


def test_class_quality_ranking_and_selection():
    labels = np.repeat([0, 1, 2, 3], [50, 30, 15, 1])
    res = np.array([12.0, 30.0, 10.0, 8.0])
    q = class_quality(labels, 4, res, junk_resolution_A=25.0, min_class_fraction=0.05)
    assert q["rank"].tolist() == [3, 4, 2, 1]  # finest first, then largest
    assert q["suggestion"].tolist() == ["good", "junk", "good", "junk"]
    assert q["selected"].tolist() == [True, False, True, False]
    q = class_quality(labels, 4, res, select=[2, 4])
    assert q["selected"].tolist() == [False, True, False, True]
    q = class_quality(labels, 4, np.full(4, 99.0), junk_resolution_A=25.0)
    assert q["selected"].sum() == 1  # never an empty selection
    with pytest.raises(ValueError):
        class_quality(labels, 4, res, select=[5])


def test_coherence_flags_a_catch_all_class():
    """A class whose members match their own average far worse than the other classes' members
    (junk gathered in one class) is suggested as junk, whatever its FRC resolution; similar classes are not."""
    labels = np.repeat(np.arange(8), 40)
    ncc = np.repeat([0.30, 0.31, 0.29, 0.32, 0.30, 0.28, 0.31, 0.15], 40)
    res = np.full(8, 15.0)
    q = class_quality(labels, 8, res, score=ncc, min_coherence_z=-3.0)
    assert q["suggestion"].tolist() == ["good"] * 7 + ["junk"]
    assert q["coherence_z"].iloc[7] < -3 < q["coherence_z"].iloc[:7].min()
    assert class_quality(labels, 8, res, score=ncc)["suggestion"].eq("good").all()  # criterion off
    same = np.repeat([0.30, 0.31, 0.29, 0.32, 0.30, 0.28, 0.31, 0.30], 40)
    assert class_quality(labels, 8, res, score=same, min_coherence_z=-3.0)["suggestion"].eq("good").all()
    # nearly equal classes (a tiny MAD): a class 2.4 % below the median is not an outlier
    tight = np.repeat([0.5054, 0.4999, 0.5078, 0.5013, 0.5097, 0.5133, 0.5056, 0.4942, 0.5084, 0.5073], 40)
    ten = np.repeat(np.arange(10), 40)
    assert class_quality(ten, 10, np.full(10, 15.0), score=tight, min_coherence_z=-3.0)["suggestion"].eq("good").all()
    few = np.repeat([0, 1, 2], 40)  # too few classes for a robust spread: no z-score, nothing flagged
    q = class_quality(few, 3, np.full(3, 15.0), score=ncc[:120], min_coherence_z=-3.0)
    assert q["coherence_z"].isna().all() and q["suggestion"].eq("good").all()


def test_an_incoherent_class_is_junk_only_where_it_holds_noise_like_picks():
    """With the pick screen's flags, a class of low coherence whose picks are not noise-like (weak
    particles matching a blurred average) stays; one holding far more noise-like picks than the
    screen may take of real particles (5 %) is junk."""
    labels = np.repeat(np.arange(8), 40)
    ncc = np.repeat([0.30, 0.31, 0.29, 0.32, 0.30, 0.28, 0.31, 0.15], 40)
    res = np.full(8, 15.0)
    clean = np.zeros(len(labels), bool)
    clean[[5, 90, 300]] = True  # a few noise-like picks, one of them in the incoherent class
    q = class_quality(labels, 8, res, score=ncc, min_coherence_z=-3.0, noise_like=clean, noise_allowance=0.05)
    assert q["suggestion"].eq("good").all() and q["noise_excess_z"].max() < 3
    junky = clean.copy()
    junky[280:296] = True  # 16 of the class's 40 picks noise-like
    q = class_quality(labels, 8, res, score=ncc, min_coherence_z=-3.0, noise_like=junky, noise_allowance=0.05)
    assert q["suggestion"].tolist() == ["good"] * 7 + ["junk"] and q["noise_excess_z"].iloc[7] > 3


def test_concentration_flags_a_class_average_that_is_a_compact_spot():
    """Clean projections of eight views and one average that is a compact bright blob off the
    centre (an ice blob class), all with a little noise: only the blob's contrast energy is
    concentrated in a few pixels, and only its class is suggested as junk."""
    sim = simulate(SimulationConfig(views=8, images_per_view=1, snr=1.0, seed=4))
    views = sim.projections[:, 16:48, 16:48]
    yy, xx = np.mgrid[:32, :32] - 16
    blob = views.max() * np.exp(-((yy - 3) ** 2 + (xx + 2) ** 2) / (2 * 1.5 ** 2))
    rng = np.random.default_rng(0)
    averages = np.concatenate([views, blob[None]]) + 0.1 * views.std() * rng.standard_normal((9, 32, 32))
    share = energy_concentration(averages, 12.0)
    assert share.shape == (9,) and np.all((share > 0) & (share <= 1))
    assert share[8] > 1.5 * share[:8].max()
    labels = np.repeat(np.arange(9), 30)
    q = class_quality(labels, 9, np.full(9, 15.0), concentration=share, max_concentration_z=3.0)
    assert q["suggestion"].tolist() == ["good"] * 8 + ["junk"]
    assert q["concentration_z"].iloc[8] > 3 > q["concentration_z"].iloc[:8].max()
    assert class_quality(labels, 9, np.full(9, 15.0), concentration=share)["suggestion"].eq("good").all()  # off
    q8 = class_quality(labels[:240], 8, np.full(8, 15.0), concentration=share[:8], max_concentration_z=3.0)
    assert q8["suggestion"].eq("good").all()  # views alone: no outlier


def test_relion30_flavour_and_working_box_averages(run, tmp_path):
    """A RELION 3.0 file (no optics block) gets origins in px; `average_box: working` averages the
    preprocessed images; the user's class list decides the selection."""
    import dataclasses

    table = run["table"]
    parts = table.particles.copy()
    for col in ("rlnImagePixelSize", "rlnVoltage", "rlnSphericalAberration", "rlnAmplitudeContrast"):
        parts[col] = table.column(col)
    t30 = dataclasses.replace(table, particles=parts.drop(columns="rlnOpticsGroup"), optics=None, version=None)
    labels = run["labels"]
    work = preprocess_batch(run["sim"].images, CTFParams.from_table(t30), run["cfg"].apix, PreprocessConfig(box=WORK_BOX))
    cfg = ExportConfig(average_box="working", select=[2, 3], cryosparc=False, align_iterations=2)
    s = export(t30, {"labels": labels}, work, run["work_apix"], K, tmp_path, cfg)
    d = starfile.read(tmp_path / "particles_classified.star", always_dict=True)
    assert list(d) == ["particles"]
    p = d["particles"]
    assert "rlnOriginX" in p and "rlnOriginXAngst" not in p
    # the class alignment's search disc (2 working px per axis) plus the refinement's window, in input px
    reach = 2 * np.sqrt(2) + s["pose_refinement"]["shift_window_px"]
    assert (np.hypot(p["rlnOriginX"], p["rlnOriginY"]) <= reach * 2 + 1e-6).all()
    sel = starfile.read(tmp_path / "particles_selected.star")
    assert set(sel["rlnClassNumber"]) == {2, 3} and len(sel) == int(np.isin(labels, [1, 2]).sum())
    assert s["averages"]["box"] == WORK_BOX


def test_rescue_keeps_particles_that_match_a_selected_class():
    """Particles of a junk-suggested class that look like a selected class's average are kept;
    pure-noise members of that class are not (fixed seed, 24 px box)."""
    from clcluster.em.averages import rescue_particles

    rng = np.random.default_rng(3)
    box = 24
    yy, xx = np.mgrid[:box, :box] - box // 2
    view = np.exp(-((xx - 3) ** 2 + yy ** 2) / 8.0) - np.exp(-((xx + 3) ** 2 + (yy - 2) ** 2) / 6.0)
    view /= view.std()
    good = view[None] + 0.5 * rng.standard_normal((60, box, box))
    noise = 0.5 * rng.standard_normal((40, box, box))
    images = np.concatenate([good, noise]).astype(np.float32)
    labels = np.r_[np.zeros(40, int), np.ones(60, int)]  # class 1: 20 good particles + 40 noise images
    selected = np.array([True, False])
    zeros = np.zeros(100)
    r = rescue_particles(images, labels, selected, zeros, np.zeros((100, 2)), 0.05, n_angles=32, max_shift_px=1)
    assert r.kept[:40].all()  # selected members stay
    assert r.kept[40:60].mean() >= 0.8  # good particles of the junk class are rescued
    assert r.kept[60:].mean() <= 0.1  # noise is not
    assert (r.matched_class[40:60] == 0).all()
    off = rescue_particles(images, labels, selected, zeros, np.zeros((100, 2)), 0.0)
    assert (off.kept == (labels == 0)).all()


def test_pick_contrast_is_written_and_noise_like_picks_leave_the_selection(run):
    out, summary = run["out"], run["summary"]
    d = starfile.read(out / "particles_classified.star", always_dict=True)["particles"]
    contrast = d["rlnClclusterPickContrast"].to_numpy()
    assert np.isfinite(contrast).all() and len(contrast) == len(run["labels"])
    assert np.median(contrast) > 0  # every pick of this stack is a particle in the disc
    sel = set(_image_names(out / "particles_selected.star")[0])
    names = d["rlnImageName"].astype(str).to_numpy()
    threshold = summary["pick_contrast_threshold"]
    if threshold is not None:
        assert not sel & set(names[contrast < threshold - 1e-6])  # the STAR holds rounded values
    if threshold is not None:
        assert abs(summary["noise_like_picks"] - int((contrast < threshold).sum())) <= 1
    assert summary["noise_like_picks"] <= 0.1 * len(names)
    if summary["pick_loss_estimated"] is not None:
        assert 0 <= summary["pick_loss_estimated"] <= 0.05  # the default export.pick_max_good_loss


def test_surround_z_is_written_and_crowded_picks_leave_the_selection(run):
    out, summary = run["out"], run["summary"]
    d = starfile.read(out / "particles_classified.star", always_dict=True)["particles"]
    z = d["rlnClclusterSurroundZ"].to_numpy()
    assert np.isfinite(z).all() and len(z) == len(run["labels"])
    assert abs(np.median(z)) < 0.05  # a robust z over the stack
    names = d["rlnImageName"].astype(str).to_numpy()
    sel = set(_image_names(out / "particles_selected.star")[0])
    assert not sel & set(names[z > 2.5 + 1e-3])  # the default max_surround_z; the STAR holds rounded values
    assert abs(summary["surround_picks"] - int((z > 2.5).sum())) <= 1
    assert summary["surround_picks"] <= 0.05 * len(names)  # lone particles only: few outliers

"""Inputs that other tools write and users produce: subtomogram layouts and multi-image files
named as one particle, RELION's CTF state flags (phase flipped, premultiplied), the defocus sign
convention, compressed stacks, write failures, the smallest inputs, the report dependency,
cryoSPARC shift units and STAR number text. Real mrcfile/starfile I/O throughout."""
from __future__ import annotations

import argparse
import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import pytest

from clcluster.steps import check
from clcluster.em.averages import wiener_class_averages
from clcluster.steps.check import check_particles
from clcluster.image.ctf import CTFParams, apply_ctf
from clcluster.io import ParticleFileError, ParticleTable, read_star, write_star
from clcluster.io.mrc import StackError, read_images
from clcluster.steps.preprocess import PreprocessConfig, preprocess_table

BOX = 32
APIX = 2.0
REPO = Path(__file__).resolve().parents[1]


def write_mrc(path: Path, data: np.ndarray, stack: bool = True) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with mrcfile.new(path, overwrite=True) as m:
        m.set_data(np.asarray(data, dtype=np.float32))
        if stack and data.ndim == 3:
            m.set_image_stack()
        else:
            m.set_volume() if data.ndim == 3 else None
    return path


def blobs(n: int, box: int = BOX, seed: int = 0) -> np.ndarray:
    """n images of an off-centre Gaussian blob pair plus weak noise (a particle-like signal)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:box, :box] - box / 2
    clean = np.exp(-((x - 3) ** 2 + y ** 2) / 8.0) + 0.6 * np.exp(-((x + 4) ** 2 + (y - 3) ** 2) / 5.0)
    return (clean[None] + 0.05 * rng.normal(size=(n, box, box))).astype(np.float32)


def star_table(tmp_path: Path, names, *, defocus=15000.0, optics_extra=None, name="particles.star") -> ParticleTable:
    """A RELION 3.1 STAR (written and read back) with CTF columns for the given image names."""
    n = len(names)
    p = pd.DataFrame({"rlnImageName": pd.Series(names, dtype="str")})
    p["rlnDefocusU"] = np.full(n, defocus, dtype=np.float64)
    p["rlnDefocusV"] = np.full(n, defocus - 200.0 * np.sign(defocus), dtype=np.float64)
    p["rlnDefocusAngle"] = 30.0
    p["rlnOpticsGroup"] = 1
    o = pd.DataFrame({"rlnOpticsGroupName": ["opticsGroup1"], "rlnOpticsGroup": [1], "rlnImagePixelSize": [APIX],
                      "rlnImageSize": [BOX], "rlnImageDimensionality": [2], "rlnVoltage": [300.0],
                      "rlnSphericalAberration": [2.7], "rlnAmplitudeContrast": [0.1]})
    for k, v in (optics_extra or {}).items():
        o[k] = v
    star = tmp_path / name
    write_star(star, ParticleTable(particles=p, optics=o, path=star))
    return read_star(star)


def run_check(argv) -> int:
    return check.main(check.add_args(argparse.ArgumentParser()).parse_args([str(a) for a in argv]))


# ---- multi-image files named as one particle, subtomograms ---------------------------------------
WARP_STAR = """# version 50001

data_general

_rlnTomoSubTomosAre2DStacks                       1

# version 50001

data_optics

loop_
_rlnOpticsGroup #1
_rlnOpticsGroupName #2
_rlnSphericalAberration #3
_rlnVoltage #4
_rlnTomoTiltSeriesPixelSize #5
_rlnCtfDataAreCtfPremultiplied #6
_rlnImageDimensionality #7
_rlnTomoSubtomogramBinning #8
_rlnImagePixelSize #9
_rlnImageSize #10
_rlnAmplitudeContrast #11
1 opticsGroup1 2.700000 300.000000 1.350000 1 2 4.000000 5.400000 32 0.070000

# version 50001

data_particles

loop_
_rlnTomoName #1
_rlnTomoVisibleFrames #2
_rlnImageName #3
_rlnOpticsGroup #4
TS_01 [0,1,1,1,1] subtomo/TS_01_000001_5.40A.mrcs 1
TS_01 [1,1,1,1,0] subtomo/TS_01_000002_5.40A.mrcs 1
"""


def test_warp_2d_stack_subtomograms_are_refused_with_what_they_are(tmp_path, capsys):
    """WarpTools / RELION 5 2D-stack subtomograms: one .mrcs of tilt images per particle, named
    without index@, `_rlnTomoSubTomosAre2DStacks 1` in data_general."""
    for i in (1, 2):
        write_mrc(tmp_path / f"subtomo/TS_01_00000{i}_5.40A.mrcs", blobs(5, seed=i))
    star = tmp_path / "warp_particles.star"
    star.write_text(WARP_STAR)
    with pytest.raises(ParticleFileError, match="subtomogram particles.*_rlnTomoSubTomosAre2DStacks 1.*2D particle images"):
        read_star(star)
    assert run_check([star, "--no-ctf"]) == 2
    assert "subtomogram particles" in capsys.readouterr().err
    # the same particles with the data_general block removed: the stacks give them away
    star.write_text(WARP_STAR.split("# version 50001\n\ndata_optics", 1)[1].join(["# version 50001\n\ndata_optics", ""]))
    t = read_star(star)
    problems = check_particles(t, ctf_required=False)
    assert len(problems) == 2 and all(p.scope == "stack" for p in problems)
    assert "a stack of 5 images of 32×32 px" in problems[0].message and "no index@" in problems[0].message
    assert "index@stack" in problems[0].fix
    with pytest.raises(StackError, match="a stack of 5 images.*names the whole file"):
        read_images(*t.image_refs(), whole=t.whole_file_rows())


def test_image_dimensionality_3_is_refused(tmp_path):
    write_mrc(tmp_path / "a.mrcs", blobs(2))
    with pytest.raises(ParticleFileError, match="_rlnImageDimensionality is 3"):
        star_table(tmp_path, ["1@a.mrcs", "2@a.mrcs"], optics_extra={"rlnImageDimensionality": [3]})


def test_volume_named_as_particle_is_refused_single_image_is_read(tmp_path):
    write_mrc(tmp_path / "subtomo.mrc", blobs(BOX), stack=False)  # a 32^3 volume
    write_mrc(tmp_path / "single.mrc", blobs(1)[0], stack=False)  # one 2D image
    t = star_table(tmp_path, ["subtomo.mrc", "single.mrc"])
    (p,) = check_particles(t)
    assert p.rows == (1,) and "3D volume of 32×32×32 voxels" in p.message
    with pytest.raises(StackError, match="3D volume"):
        read_images(*t.image_refs(), whole=t.whole_file_rows())
    one = t.subset([1])
    np.testing.assert_array_equal(read_images(*one.image_refs(), whole=one.whole_file_rows())[0], blobs(1)[0])


def test_missing_ctf_hint_does_not_lead_to_no_ctf_for_any_input(tmp_path):
    write_mrc(tmp_path / "a.mrcs", blobs(2))
    t = star_table(tmp_path, ["1@a.mrcs", "2@a.mrcs"])
    t.optics = t.optics.drop(columns=["rlnVoltage"])
    (p,) = check_particles(t)
    assert "lack _rlnVoltage" in p.message and "only for 2D particle images" in p.fix


# ---- CTF state flags ------------------------------------------------------------------------------
def _flagged(tmp_path, flag, images, name):
    write_mrc(tmp_path / f"{name}.mrcs", images)
    extra = {flag: [1]} if flag else {}
    return star_table(tmp_path, [f"{i}@{name}.mrcs" for i in range(1, len(images) + 1)], optics_extra=extra,
                      name=f"{name}.star")


@pytest.mark.parametrize("flag", ["rlnCtfDataArePhaseFlipped", "rlnCtfDataAreCtfPremultiplied"])
def test_flagged_data_are_not_phase_flipped_again(tmp_path, flag):
    images = blobs(6)
    flagged = _flagged(tmp_path, flag, images, "flagged")
    plain = _flagged(tmp_path, None, images, "plain")
    out = {}
    for key, table, mode in (("flagged", flagged, "phase_flip"), ("plain", plain, "phase_flip"), ("none", plain, "none")):
        meta = preprocess_table(table, tmp_path / f"{key}.npy", PreprocessConfig(box=16, ctf=mode), device="cpu")
        out[key] = np.load(tmp_path / f"{key}.npy").astype(np.float32)
        out[key + "_meta"] = meta
    np.testing.assert_allclose(out["flagged"], out["none"], atol=2e-3)  # corrected once: by whoever flagged it
    assert np.abs(out["flagged"] - out["plain"]).max() > 0.1
    state = "phase_flipped" if "Flipped" in flag else "premultiplied"
    rec = json.loads((tmp_path / "flagged.json").read_text())
    assert rec["ctf_input"] == {state: {"particles": 6, "applied": rec["ctf_input"][state]["applied"]}}
    assert rec["ctf_input"][state]["applied"].startswith("nothing")
    assert "ctf_phase_flip" not in rec["steps"] and rec["star_labels"]["rlnCtfDataArePhaseFlipped"] == 1
    assert "ctf_phase_flip" in out["plain_meta"]["steps"]


def test_premultiplied_wiener_preprocessing_equals_raw(tmp_path):
    """Wiener filtering premultiplied images divides by CTF^2 + 1/snr only: the same estimate
    as from the raw images."""
    raw_images = blobs(4)
    raw = _flagged(tmp_path, None, raw_images, "raw")
    params = CTFParams.from_table(raw)
    pre_images = apply_ctf(raw_images, params, APIX)
    pre = _flagged(tmp_path, "rlnCtfDataAreCtfPremultiplied", pre_images, "pre")
    cfg = PreprocessConfig(box=BOX, ctf="wiener", wiener_snr=1.0)
    preprocess_table(raw, tmp_path / "raw.npy", cfg, device="cpu")
    preprocess_table(pre, tmp_path / "pre.npy", cfg, device="cpu")
    a, b = (np.load(tmp_path / f"{k}.npy").astype(np.float32) for k in ("raw", "pre"))
    assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.995


def test_premultiplied_class_average_uses_ctf_squared_weighting(tmp_path):
    """The Wiener class average of premultiplied images (CTF x raw) equals that of the raw
    images: numerator CTF_i X_i, denominator CTF_i^2, never CTF^2 X_i / CTF^2."""
    raw_images = blobs(8, seed=4)
    raw = _flagged(tmp_path, None, raw_images, "raw")
    pre_images = apply_ctf(raw_images, CTFParams.from_table(raw), APIX)
    labels, zeros = np.zeros(8, np.int64), np.zeros(8)
    res = {}
    for key, flag in (("raw", None), ("pre", "rlnCtfDataAreCtfPremultiplied"), ("unflagged", None)):
        t = raw if key == "raw" else _flagged(tmp_path, flag, pre_images, key)
        res[key] = wiener_class_averages(t, labels, 1, zeros, np.zeros((8, 2)), snr=1.0).full[0]
    corr = lambda a: np.corrcoef(a.ravel(), res["raw"].ravel())[0, 1]  # (scale differs: background normalisation)
    assert corr(res["pre"]) > 0.999 and corr(res["unflagged"]) < 0.9


def test_flags_are_kept_in_exported_star(tmp_path):
    write_mrc(tmp_path / "a.mrcs", blobs(2))
    t = star_table(tmp_path, ["1@a.mrcs", "2@a.mrcs"], optics_extra={"rlnCtfDataAreCtfPremultiplied": [1]})
    write_star(tmp_path / "out.star", t.with_absolute_paths())
    assert read_star(tmp_path / "out.star").optics["rlnCtfDataAreCtfPremultiplied"].tolist() == [1]


def test_check_summary_reports_ctf_plan_and_sign_convention(tmp_path, capsys):
    write_mrc(tmp_path / "a.mrcs", blobs(2))
    t = star_table(tmp_path, ["1@a.mrcs", "2@a.mrcs"], optics_extra={"rlnCtfDataArePhaseFlipped": [1]})
    assert run_check([t.path]) == 0
    out = capsys.readouterr().out
    assert "2 particles already phase flipped (_rlnCtfDataArePhaseFlipped 1): not flipped again" in out
    assert "positive = underfocus" in out


# ---- defocus sign ---------------------------------------------------------------------------------
def test_negative_defocus_is_refused_naming_the_convention(tmp_path):
    write_mrc(tmp_path / "a.mrcs", blobs(2))
    t = star_table(tmp_path, ["1@a.mrcs", "2@a.mrcs"], defocus=-15000.0)
    (p,) = check_particles(t)
    assert p.scope == "table" and "every defocus value is negative" in p.message and "positive = underfocus" in p.fix
    with pytest.raises(ParticleFileError, match="negative defocus.*positive = underfocus"):
        preprocess_table(t, tmp_path / "x.npy", PreprocessConfig(box=16), device="cpu")
    assert not (tmp_path / "x.npy").exists()
    mixed = t.with_particles(t.particles.assign(rlnDefocusU=[15000.0, -15000.0], rlnDefocusV=[14800.0, -14800.0]))
    (p,) = check_particles(mixed)
    assert p.scope == "particle" and p.row == 2


# ---- compressed stacks ----------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["stack.mrcs.gz", "stack.mrcs"])
def test_gzip_stack_is_named_compressed(tmp_path, name):
    write_mrc(tmp_path / "plain.mrcs", blobs(2))
    (tmp_path / name).write_bytes(gzip.compress((tmp_path / "plain.mrcs").read_bytes()))
    t = star_table(tmp_path, [f"1@{name}", f"2@{name}"])
    (p,) = check_particles(t)
    assert "gzip-compressed" in p.message and "gunzip -k" in p.fix
    with pytest.raises(StackError, match="gzip-compressed.*decompress it"):
        read_images(*t.image_refs())


# ---- write failures ---------------------------------------------------------------------------------
def _cli(args, limit_bytes=None, cwd=None):
    """`python -m clcluster.cli ARGS` in a subprocess; with limit_bytes, under RLIMIT_FSIZE
    (SIGXFSZ ignored, as Python does, so writes fail with EFBIG)."""
    code = "import sys; from clcluster.cli import main; sys.exit(main(sys.argv[1:]))"
    pre = None
    if limit_bytes is not None:
        def pre():
            import resource
            import signal
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))
    import clcluster

    env = dict(os.environ, PYTHONPATH=str(Path(clcluster.__file__).resolve().parents[1]))  # the code under test
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                          preexec_fn=pre, env=env, cwd=cwd, timeout=300)


def test_check_exclude_bad_into_unwritable_folder(tmp_path):
    write_mrc(tmp_path / "a.mrcs", blobs(12))
    t = star_table(tmp_path, [f"{i}@a.mrcs" for i in range(1, 14)])  # row 13 is past the end
    (tmp_path / "results").write_text("a file where a folder should be")
    out = tmp_path / "results" / "checked" / "good.star"
    r = _cli(["check", t.path, "--exclude-bad", out])
    assert r.returncode == 2 and "Traceback" not in r.stderr
    (line,) = [ln for ln in r.stderr.splitlines() if "error" in ln]
    assert str(tmp_path / "results") in line and "not a folder" in line


def test_preprocess_hits_file_size_limit(tmp_path):
    write_mrc(tmp_path / "a.mrcs", blobs(12, box=64))
    t = star_table(tmp_path, [f"{i}@a.mrcs" for i in range(1, 13)])
    out = tmp_path / "pre" / "shard_0.npy"
    r = _cli(["preprocess", t.path, "--out", out, "--box", "64", "--device", "cpu"], limit_bytes=20000)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    (line,) = [ln for ln in r.stderr.splitlines() if "error" in ln]
    assert str(out) in line and "File too large" in line and "file size limit" in line
    assert not out.exists() and not out.with_suffix(".json").exists()
    assert [p.name for p in (tmp_path / "pre").iterdir()] == []  # no temporary file left behind


# ---- smallest inputs ----------------------------------------------------------------------------------
@pytest.mark.parametrize("n, k", [(1, 1), (2, 1), (5, 3), (11, 6)])
def test_too_few_particles_are_refused_before_any_work(tmp_path, n, k):
    write_mrc(tmp_path / "a.mrcs", blobs(max(n, 1)))
    t = star_table(tmp_path, [f"{i}@a.mrcs" for i in range(1, n + 1)])
    (p,) = check_particles(t, classes=k)
    assert p.scope == "table" and "too few to classify" in p.message and f"at least {max(10, 2 * k)}" in p.message


def test_enough_particles_pass(tmp_path):
    write_mrc(tmp_path / "a.mrcs", blobs(10))
    t = star_table(tmp_path, [f"{i}@a.mrcs" for i in range(1, 11)])
    assert check_particles(t, classes=1) == [] and check_particles(t, classes=5) == []


@pytest.mark.slow
@pytest.mark.parametrize("k", [1, 5])
def test_ten_particles_run_end_to_end(tmp_path, k):
    """The smallest input `check` accepts runs through every step (the workflow, tiny config)."""
    from clcluster.steps.simulate import SimulationConfig, simulate, write_simulation

    cfg = SimulationConfig(views=2, images_per_view=5, snr=0.5, seed=2)
    star = write_simulation(simulate(cfg), cfg, tmp_path / "data")
    results = tmp_path / "results"
    cmd = [sys.executable, "-m", "snakemake", "--cores", "2", "--nolock", "--configfile",
           str(REPO / "tests/workflow/config.yaml"), "--config", f"results={results}", f"particles={star}",
           f"classes={k}"]
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    classified = read_star(results / "export/particles_classified.star")
    assert len(classified) == 10 and set(classified.particles["rlnClassNumber"]) <= set(range(1, k + 1))


@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_embedding_map_of_few_points(tmp_path, n):
    from clcluster.steps.export import embedding_map

    feats = np.random.default_rng(0).normal(size=(n, 8)).astype(np.float32)
    info = embedding_map(feats, np.zeros(n, np.int64), tmp_path / "map.png")
    assert (tmp_path / "map.png").stat().st_size > 0 and info["points"] == n


# ---- packaging ------------------------------------------------------------------------------------------
def test_report_dependency_in_main_dependencies():
    text = (REPO / "pyproject.toml").read_text()
    deps = text.split("dependencies = [", 1)[1].split("]\n", 1)[0]  # the main list, not the extras
    assert '"snakemake[reports]' in deps or '"pygments' in deps, deps


# ---- cryoSPARC shifts ---------------------------------------------------------------------------------
def test_cs_shifts_in_pixels_of_the_image_as_pyem_reads_them(tmp_path):
    """pyem's csparc2star: rlnOriginX/Y = alignments2D/shift (pixels of the image), then Å by
    blob/psize_A; rlnAnglePsi = degrees(alignments2D/pose)."""
    from clcluster.steps.export import cs_array

    write_mrc(tmp_path / "a.mrcs", blobs(3))
    t = star_table(tmp_path, ["1@a.mrcs", "2@a.mrcs", "3@a.mrcs"])
    origin_A = np.array([[2.0, -4.0], [0.5, 0.0], [-6.0, 3.0]])
    psi = np.array([10.0, -170.0, 90.0])
    cs = cs_array(t, psi, origin_A, np.zeros(3, np.int64), align_apix=APIX * BOX / 16)  # poses found at box 16
    np.testing.assert_allclose(cs["alignments2D/psize_A"], cs["blob/psize_A"])
    pyem_origin_A = cs["alignments2D/shift"] * cs["blob/psize_A"][:, None]
    np.testing.assert_allclose(pyem_origin_A, origin_A, rtol=1e-6)
    np.testing.assert_allclose(np.rad2deg(cs["alignments2D/pose"]), psi, rtol=1e-6)


# ---- STAR number text -----------------------------------------------------------------------------------
def test_star_never_writes_negative_zero(tmp_path):
    write_mrc(tmp_path / "a.mrcs", blobs(2))
    t = star_table(tmp_path, ["1@a.mrcs", "2@a.mrcs"])
    t = t.with_particles(t.particles.assign(rlnOriginXAngst=[-0.0, 1.5], rlnAnglePsi=[0.0, -0.0]))
    write_star(tmp_path / "z.star", t)
    text = (tmp_path / "z.star").read_text()
    assert "-0.0" not in text and read_star(tmp_path / "z.star").particles["rlnOriginXAngst"].tolist() == [0.0, 1.5]

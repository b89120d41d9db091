"""Conformance with particle files written by real tools (the shared real-world corpus).

The corpus folder is $CLCLUSTER_REALWORLD, by default `shared/realworld` beside the repository.
If it is missing the tests fail when CI=true and are skipped otherwise. Every .star / .cs file
in the corpus must be listed below, either as read (count, pixel sizes in Å/px, flavour,
particles per optics group) or as refused (words the ParticleFileError message must contain).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from clcluster.steps.check import check_particles
from clcluster.image.ctf import CTFParams
from clcluster.io import ParticleFileError, read_particles
from clcluster.io.mrc import read_images, stack_shape

CORPUS = Path(os.environ.get("CLCLUSTER_REALWORLD", Path(__file__).resolve().parents[2] / "shared" / "realworld"))

# file: (particles, pixel sizes [Å/px], flavour, particles per optics-block row, particle block name)
READ = {
    "ASPIRE-Python/rln_proj_65_centered.star": (4, [1.0], "3.1", [4], "particles"),
    "ASPIRE-Python/sample_particles_relion30.star": (17, [1.338], "3.0", None, "model_class_1"),
    "ASPIRE-Python/sample_particles_relion31.star": (17, [1.4], "3.1", [8, 9], "particles"),
    "ASPIRE-Python/starfile.star": (3796, [1.338], "3.0", None, ""),
    "cryodrgn/FinalRefinement-OriginalParticles-PfCRT.star": (5, [1.035], "3.0", None, "images"),
    "cryodrgn/empiar_10076_7.star": (7, [1.31], "3.0", None, ""),
    "cryodrgn/relion31.6opticsgroups.star": (139, [1.24, 1.25], "3.1", [48, 29, 5, 7, 26, 24], "particles"),
    "cryodrgn/relion31.star": (5, [2.806], "3.1", [5], "particles"),
    "cryodrgn/relion31.v2.star": (5, [2.806], "3.1", [5], "particles"),
    "cryodrgn/relion5.star": (17, [0.89], "3.1", [17], "particles"),
    "cryodrgn/sta_testing_bin8.star": (219, [1.96], "3.0", None, ""),
    "emtable/run_it016_data.star": (4748, [1.244835], "3.1", [4748], "particles"),
    "isecc/test.star": (1, [1.1], "3.1", [1], "particles"),
    "relion/ref_it002_data.star": (9, [3.54], "3.0", None, ""),
    "scipion-em-esrf/input_particles.star": (10, [3.0], "3.1", [10], "particles"),
    "simplecryoem/pyem.star": (24, [3.54], "3.1", [24], "particles"),
    "simplecryoem/relion_proj_batch.star": (24, [3.54], "3.1", [24], "particles"),
    "starfile/one_loop.star": (16, [5.0], "3.0", None, ""),
    "starfile/optics_group_inter1965.star": (1, [1.04], "3.1", [1], "particles"),
    "topaz/particles.star": (1500, [3.733333e4 / 38023], "3.0", None, "images"),
    "cryodrgn/cryosparc_J2_particles_exported.cs": (22, [1.345], "3.1", [22], "particles"),
    "cryodrgn/cryosparc_P12_J24_001_particles.cs": (2019, [2.95], "3.1", [2019], "particles"),
    "cryodrgn/empiar_10076_7.cs": (7, [1.31], "3.1", [7], "particles"),
}

# file: words the refusal message must contain (besides the file name)
REFUSED = {
    "ASPIRE-Python/rln_proj_64.star": ["no pixel size", "no data_optics"],
    "ASPIRE-Python/run_001_it025_model.star": ["not a particle file", "model"],
    "ASPIRE-Python/run_001_it025_optimiser.star": ["not a particle file", "optimiser"],
    "emtable/nma.star": ["not a particle file", "rln prefix"],
    "emtable/relion_it017_data.star": ["without _rlnMagnification"],
    "emtable/relion_it017_optimiser.star": ["not a particle file", "optimiser"],
    "emtable/run_it016_optimiser.star": ["not a particle file", "optimiser"],
    "emtable/xmipp.star": ["not a particle file"],
    "relion/ref_it002_model.star": ["not a particle file", "model"],
    "relion/ref_it002_optimiser.star": ["not a particle file", "optimiser"],
    "starfile/empty_loop.star": ["not a particle file", "empty"],
    "starfile/loop_double_quote.star": ["not a particle file"],
    "starfile/postprocess.star": ["not a particle file", "postprocess"],
    "starfile/rln3.1_data_style.star": ["ambiguous", "data_block_2", "data_block_3"],
    "starfile/run_it025_optimiser_2D.star": ["not a particle file", "optimiser"],
    "cryosparc-tools/4k_dataset.cs": ["no blob/ fields"],
}

# particle files whose stacks are in the corpus: (stack, shape (n, ny, nx))
WITH_STACKS = {
    "cryodrgn/relion31.star": ("cryodrgn/relion31.mrcs", (5, 256, 256)),
    "cryodrgn/relion31.v2.star": ("cryodrgn/relion31.mrcs", (5, 256, 256)),
    "cryodrgn/empiar_10076_7.star": ("cryodrgn/empiar_10076_7.mrc", (7, 320, 320)),
    "cryodrgn/empiar_10076_7.cs": ("cryodrgn/empiar_10076_7.mrc", (7, 320, 320)),
    "ASPIRE-Python/sample_particles_relion30.star": ("ASPIRE-Python/sample.mrcs", (17, 200, 200)),
    "ASPIRE-Python/sample_particles_relion31.star": ("ASPIRE-Python/sample.mrcs", (17, 200, 200)),
    "ASPIRE-Python/rln_proj_65_centered.star": ("ASPIRE-Python/rln_proj_65_centered.mrcs", (4, 65, 65)),
    "simplecryoem/relion_proj_batch.star": ("simplecryoem/relion_proj_batch.mrcs", (24, 64, 64)),
}


@pytest.fixture(scope="module")
def corpus() -> Path:
    if not CORPUS.is_dir():
        msg = f"real-world corpus not found at {CORPUS} (set CLCLUSTER_REALWORLD)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(msg)
        pytest.skip(msg)
    return CORPUS


def test_every_particle_file_is_listed(corpus):
    found = {p.relative_to(corpus).as_posix() for p in corpus.rglob("*") if p.suffix in (".star", ".cs")}
    assert found == set(READ) | set(REFUSED), "corpus and expectations differ: update READ / REFUSED"


@pytest.mark.parametrize("name", sorted(READ))
def test_read(corpus, name):
    n, apix, flavour, groups, block = READ[name]
    t = read_particles(corpus / name)
    assert len(t) == n
    assert t.flavour == flavour
    assert t.particles_block == block
    np.testing.assert_allclose(np.unique(np.round(t.pixel_size(), 4)), np.round(apix, 4), rtol=1e-4)
    if groups is not None:
        assert np.bincount(t.optics_group_rows(), minlength=len(t.optics)).tolist() == groups
    paths, idx = t.image_refs()
    assert len(paths) == n and (idx >= 0).all()
    names = t.particles["rlnImageName"].astype(str)
    assert names.str.len().gt(0).all()


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_refused(corpus, name):
    with pytest.raises(ParticleFileError) as e:
        read_particles(corpus / name)
    msg = str(e.value)
    assert str(corpus / name) in msg
    for word in REFUSED[name]:
        assert word in msg


@pytest.mark.parametrize("name", sorted(WITH_STACKS))
def test_present_stacks(corpus, name):
    stack, shape = WITH_STACKS[name]
    assert stack_shape(corpus / stack) == shape
    t = read_particles(corpus / name)
    paths, idx = t.image_refs()
    assert {Path(p) for p in paths} == {corpus / stack}
    images = read_images(paths, idx)
    assert images.shape == (len(t),) + shape[1:]
    assert np.isfinite(images).all()
    assert check_particles(t, ctf_required=False) == []


def test_quirks(corpus):
    # particles after optics, 6 groups numbered apart from their names, pixel size per group
    t = read_particles(corpus / "cryodrgn/relion31.6opticsgroups.star")
    opt = t.optics.set_index("rlnOpticsGroup")
    want = opt.loc[t.particles["rlnOpticsGroup"], "rlnImagePixelSize"].to_numpy()
    np.testing.assert_allclose(t.pixel_size(), want)
    assert opt.loc[1, "rlnOpticsGroupName"] == "opticsGroup5"
    # two optics groups at 300 and 200 kV, tabs, trailing text after a label
    t = read_particles(corpus / "ASPIRE-Python/sample_particles_relion31.star")
    assert sorted(np.unique(t.column("rlnVoltage")).tolist()) == [200.0, 300.0]
    assert "rlnMtfFileName" in t.optics.columns and len(t.optics.columns) == 8
    # legacy Magnification / DetectorPixelSize [µm]; voltage per particle
    t = read_particles(corpus / "ASPIRE-Python/sample_particles_relion30.star")
    assert sorted(np.unique(t.column("rlnVoltage"), return_counts=True)[1].tolist()) == [8, 9]
    # `_level_0` pandas artefact kept as an ordinary column
    assert "level_0" in read_particles(corpus / "simplecryoem/pyem.star").particles.columns
    # no '@': one image per file, index 0
    paths, idx = read_particles(corpus / "starfile/one_loop.star").image_refs()
    assert (idx == 0).all() and str(paths[0]).endswith(".mrc")
    # names are kept as text (bare integers, unpadded indices)
    t = read_particles(corpus / "cryodrgn/empiar_10076_7.star")
    assert t.particles["rlnMicrographName"].tolist()[0] == "1"
    # cryoSPARC: '>' export marker stripped, 0-based blob/idx -> 1-based
    t = read_particles(corpus / "cryodrgn/cryosparc_J2_particles_exported.cs")
    assert t.particles["rlnImageName"].iloc[0].startswith("1@J1/imported/")
    assert t.optics["rlnImageSize"].tolist() == [300]


def test_cs_and_star_agree(corpus):
    cs = read_particles(corpus / "cryodrgn/empiar_10076_7.cs")
    st = read_particles(corpus / "cryodrgn/empiar_10076_7.star")
    pc, ic = cs.image_refs()
    ps, is_ = st.image_refs()
    assert pc == ps and (ic == is_).all()
    np.testing.assert_array_equal(read_images(pc, ic), read_images(ps, is_))
    a, b = CTFParams.from_table(cs), CTFParams.from_table(st)
    for field in ("defocus_u", "defocus_v", "defocus_angle", "voltage", "cs", "amplitude_contrast", "phase_shift"):
        np.testing.assert_allclose(np.asarray(getattr(a, field), float), np.asarray(getattr(b, field), float),
                                   rtol=1e-5, atol=1e-5, err_msg=field)
    np.testing.assert_allclose(cs.pixel_size(), st.pixel_size(), rtol=1e-5)


@pytest.mark.parametrize("name", sorted(READ))
def test_check_reports_ctf_plan_and_sign_convention(corpus, name, capsys):
    """`clcluster check` says what it will do about RELION's CTF state flags (none of the corpus
    files sets them) and which defocus sign it assumes."""
    import argparse

    from clcluster.steps import check

    args = check.add_args(argparse.ArgumentParser()).parse_args([str(corpus / name), "--no-pixels"])
    check.main(args)
    out = capsys.readouterr().out
    t = read_particles(corpus / name)
    if all(t.column(c) is not None for c in ("rlnDefocusU", "rlnVoltage", "rlnSphericalAberration",
                                             "rlnAmplitudeContrast", "rlnDefocusV", "rlnDefocusAngle")):
        assert f"CTF: {len(t)} particles CTF-corrected by preprocessing" in out
        assert "defocus sign: defocus in Å, positive = underfocus" in out
    else:
        assert "CTF: the particles lack CTF columns" in out


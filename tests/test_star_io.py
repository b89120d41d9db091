"""STAR and cryoSPARC particle I/O: round trips keep flavour, blocks, rows and columns; image
names `index@stack` (1-based) resolve relative to the STAR file's folder; quirks of real
writers are read and malformed files are refused with ParticleFileError."""
from __future__ import annotations

from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import pytest

from clcluster.io import ParticleFileError, ParticleTable, read_particles, read_star, write_star
from clcluster.io.mrc import read_images
from clcluster.io.star import parse_image_name

OPTICS = """
# version 30001

data_optics

loop_
_rlnOpticsGroupName #1
_rlnOpticsGroup #2
_rlnVoltage #3
_rlnSphericalAberration #4
_rlnAmplitudeContrast #5
_rlnImagePixelSize #6
_rlnImageSize #7
_rlnImageDimensionality #8
opticsGroup1 1 300.0 2.7 0.1 1.5 16 2
opticsGroup2 2 200.0 2.0 0.07 2.0 16 2
"""

PARTICLES = """
# version 30001

data_particles

loop_
_rlnImageName #1
_rlnMicrographName #2
_rlnDefocusU #3
_rlnDefocusV #4
_rlnDefocusAngle #5
_rlnOpticsGroup #6
_rlnAnglePsi #7
_rlnCtfMaxResolution #8
000001@Stacks/a.mrcs 0003.mrc 12000.5 11800.25 33.3 1 -12.5 1e-08
000002@Stacks/a.mrcs 0003.mrc 12001.5 11801.25 33.3 1 90.0 4.2
000003@Stacks/a.mrcs "mic with space.mrc" 13000.0 12800.0 -20.0 2 180.0 4.2
"""

RELION30 = """
data_images

loop_
_rlnDefocusAngle #1
_rlnDefocusU #2
_rlnDefocusV #3
_rlnDetectorPixelSize #4
_rlnImageName #5
_rlnMagnification #6
_rlnVoltage #7
_rlnSphericalAberration #8
_rlnAmplitudeContrast #9
_rlnOriginX #10
10.0 15000.0 14800.0 14.0 1@a.mrcs 39548 300 2.7 0.1 1.5
11.0 16000.0 15800.0 14.0 2@a.mrcs 39548 300 2.7 0.1 -0.5
"""


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def assert_same(a: ParticleTable, b: ParticleTable):
    assert a.flavour == b.flavour
    assert (a.particles_block, a.optics_block) == (b.particles_block, b.optics_block)
    pd.testing.assert_frame_equal(a.particles, b.particles, check_dtype=False)
    if a.optics is not None:
        pd.testing.assert_frame_equal(a.optics, b.optics, check_dtype=False)


def test_relion31_round_trip(tmp_path):
    t = read_star(write(tmp_path / "in.star", OPTICS + PARTICLES))
    assert t.flavour == "3.1" and len(t) == 3 and t.version == 30001
    np.testing.assert_allclose(t.pixel_size(), [1.5, 1.5, 2.0])
    np.testing.assert_allclose(t.column("rlnVoltage"), [300, 300, 200])
    assert t.particles["rlnMicrographName"].tolist() == ["0003.mrc", "0003.mrc", "mic with space.mrc"]
    write_star(tmp_path / "out.star", t)
    text = (tmp_path / "out.star").read_text()
    assert text.index("data_optics") < text.index("data_particles") and "# version 30001" in text
    u = read_star(tmp_path / "out.star")
    assert_same(t, u)
    assert u.particles["rlnCtfMaxResolution"].iloc[0] == 1e-08  # no precision lost
    # a subset keeps optics and every column
    write_star(tmp_path / "sub.star", t.subset([2]))
    s = read_star(tmp_path / "sub.star")
    assert len(s) == 1 and list(s.particles.columns) == list(t.particles.columns) and len(s.optics) == 2


def test_relion30_round_trip(tmp_path):
    t = read_star(write(tmp_path / "in.star", RELION30))
    assert t.flavour == "3.0" and t.particles_block == "images"
    np.testing.assert_allclose(t.pixel_size(), 14.0 * 1e4 / 39548)  # µm * 1e4 / mag = Å/px
    write_star(tmp_path / "out.star", t)
    text = (tmp_path / "out.star").read_text()
    assert "data_optics" not in text and "data_images" in text
    assert_same(t, read_star(tmp_path / "out.star"))


def test_unnamed_block_round_trip(tmp_path):
    t = read_star(write(tmp_path / "in.star", RELION30.replace("data_images", "data_")))
    assert t.particles_block == ""
    write_star(tmp_path / "out.star", t)
    assert_same(t, read_star(tmp_path / "out.star"))


def test_particles_before_optics(tmp_path):
    t = read_star(write(tmp_path / "in.star", PARTICLES + OPTICS + "#\n"))
    assert t.flavour == "3.1" and len(t) == 3
    np.testing.assert_allclose(t.pixel_size(), [1.5, 1.5, 2.0])


def make_stack(path: Path, n: int, box: int = 16) -> np.ndarray:
    images = np.arange(n * box * box, dtype=np.float32).reshape(n, box, box)
    path.parent.mkdir(parents=True, exist_ok=True)
    with mrcfile.new(path, overwrite=True) as m:
        m.set_data(images)
    return images


def test_image_names_relative_to_star_folder(tmp_path, monkeypatch):
    images = make_stack(tmp_path / "project" / "Stacks" / "a.mrcs", 3)
    star = write(tmp_path / "project" / "p.star", OPTICS + PARTICLES.replace("000001@", "3@").replace("000003@", "1@"))
    monkeypatch.chdir(tmp_path)  # the current folder must not matter
    t = read_star(star)
    paths, idx = t.image_refs()
    assert idx.tolist() == [2, 1, 0]  # 1-based in the file, 0-based inside
    assert all(p == tmp_path / "project" / "Stacks" / "a.mrcs" for p in paths)
    np.testing.assert_array_equal(read_images(paths, idx), images[[2, 1, 0]])


def test_project_root_first(tmp_path):
    make_stack(tmp_path / "root" / "Stacks" / "a.mrcs", 3)
    star = write(tmp_path / "elsewhere" / "p.star", OPTICS + PARTICLES)
    t = read_star(star, root=tmp_path / "root")
    assert t.image_refs()[0][0] == tmp_path / "root" / "Stacks" / "a.mrcs"
    # not under the root: falls back to the STAR's folder
    t = read_star(star, root=tmp_path / "nowhere")
    assert t.image_refs()[0][0] == tmp_path / "elsewhere" / "Stacks" / "a.mrcs"


def test_parse_image_name():
    assert parse_image_name("000001@Stacks/a.mrcs") == (0, "Stacks/a.mrcs")
    assert parse_image_name("12@b.mrc") == (11, "b.mrc")
    assert parse_image_name("F:/sub/one.mrc") == (0, "F:/sub/one.mrc")  # no '@': a single-image file
    for bad in ("0@a.mrcs", "x@a.mrcs", "-1@a.mrcs", "3@", ""):
        with pytest.raises(ParticleFileError):
            parse_image_name(bad, "p.star", 4)


@pytest.mark.parametrize("edit", [
    lambda s: s.replace("\n", "\r\n"),                                   # Windows line ends
    lambda s: "\ufeff" + s,                                              # byte-order mark
    lambda s: s.replace(" 12000.5 ", "\t12000.5\t"),                     # tabs
    lambda s: s.replace("_rlnDefocusU #3", "_rlnDefocusU #3 [Defocus in A]"),  # trailing text
    lambda s: s.replace("_rlnDefocusV #4", "_rlnDefocusV #4\n# comment\n"),    # comment in labels
    lambda s: s + "stop_\n",                                             # STAR stop_
    lambda s: s.replace("0003.mrc 12000.5", "'0003.mrc' 12000.5"),       # single quotes
    lambda s: "data_\n\n" + s,                                           # an empty block first
    lambda s: s.rstrip("\n"),                                            # no newline at the end
])
def test_quirks_read(tmp_path, edit):
    t = read_star(write(tmp_path / "q.star", edit(OPTICS + PARTICLES)))
    assert len(t) == 3 and t.flavour == "3.1"
    assert t.particles["rlnImageName"].tolist()[0] == "000001@Stacks/a.mrcs"
    assert t.particles["rlnDefocusU"].tolist()[0] == 12000.5
    np.testing.assert_allclose(t.pixel_size(), [1.5, 1.5, 2.0])


def test_empty_and_single_row_loops(tmp_path):
    head = PARTICLES.split("000001@")[0]
    t = read_star(write(tmp_path / "e.star", OPTICS + head))
    assert len(t) == 0 and "rlnImageName" in t.particles.columns
    t = read_star(write(tmp_path / "one.star", OPTICS + head + PARTICLES.splitlines()[-3]))
    assert len(t) == 1


@pytest.mark.parametrize("text, words", [
    (OPTICS + PARTICLES.replace(" 4.2\n000003", "\n000003"), ["7 values for the 8 labels"]),
    (OPTICS + PARTICLES.replace("1e-08", "1e-08 extra"), ["9 values"]),
    (OPTICS + PARTICLES.replace("_rlnAnglePsi #7", "_rlnDefocusU #7"), ["appears twice"]),
    (OPTICS + PARTICLES.replace("data_particles", "data_a") + PARTICLES.replace("data_particles", "data_b"),
     ["ambiguous", "data_a", "data_b"]),
    (PARTICLES, ["no data_optics", "no pixel size"]),
    (OPTICS + PARTICLES.replace(" 2 180.0", " 3 180.0"), ["optics group 3"]),
    (RELION30.replace("_rlnMagnification #6", "_rlnFoo #6"), ["without _rlnMagnification"]),
    (RELION30.replace(" 39548 ", " 0 "), ["pixel size inf"]),
    ("data_general\n_rlnFinalResolution 3.2\n", ["not a particle file"]),
    ("hello\n", ["not a particle file"]),
])
def test_refused(tmp_path, text, words):
    p = write(tmp_path / "bad.star", text)
    with pytest.raises(ParticleFileError) as e:
        read_star(p)
    assert str(p) in str(e.value)
    for w in words:
        assert w in str(e.value)


def test_binary_and_missing_refused(tmp_path):
    p = tmp_path / "x.star"
    p.write_bytes(b"\x93NUMPY\x00\x01" + bytes(100))
    with pytest.raises(ParticleFileError, match="not a STAR text file"):
        read_star(p)
    with pytest.raises(ParticleFileError, match="not found"):
        read_particles(tmp_path / "missing.star")


# ---- cryoSPARC .cs --------------------------------------------------------------------------

def cs_array(n=3):
    dt = [("uid", "<u8"), ("blob/path", "S20"), ("blob/idx", "<u4"), ("blob/shape", "<u4", (2,)),
          ("blob/psize_A", "<f4"), ("ctf/accel_kv", "<f4"), ("ctf/cs_mm", "<f4"), ("ctf/amp_contrast", "<f4"),
          ("ctf/df1_A", "<f4"), ("ctf/df2_A", "<f4"), ("ctf/df_angle_rad", "<f4"), ("ctf/phase_shift_rad", "<f4"),
          ("ctf/bfactor", "<f4")]
    a = np.zeros(n, dtype=dt)
    a["uid"] = np.arange(n) + 100
    a["blob/path"] = [b">J1/extract/s.mrc"] * n
    a["blob/idx"] = np.arange(n)
    a["blob/shape"] = 16
    a["blob/psize_A"] = [1.31, 1.31, 2.0][:n]
    a["ctf/accel_kv"] = 300
    a["ctf/cs_mm"] = 2.7
    a["ctf/amp_contrast"] = 0.1
    a["ctf/df1_A"] = 15301.1
    a["ctf/df2_A"] = 14916.4
    a["ctf/df_angle_rad"] = np.deg2rad(30.0)
    a["ctf/phase_shift_rad"] = np.pi / 2
    a["ctf/bfactor"] = 50
    return a


def save_cs(path: Path, a) -> Path:
    with open(path, "wb") as f:  # np.save(str) would append .npy
        np.save(f, a)
    return path


def test_read_cs(tmp_path):
    t = read_particles(save_cs(tmp_path / "p.cs", cs_array()), root=tmp_path)
    assert t.flavour == "3.1" and len(t) == 3 and len(t.optics) == 2
    assert t.particles["rlnImageName"].tolist() == ["1@J1/extract/s.mrc", "2@J1/extract/s.mrc", "3@J1/extract/s.mrc"]
    np.testing.assert_allclose(t.pixel_size(), [1.31, 1.31, 2.0])
    assert t.particles["rlnDefocusU"].iloc[0] == 15301.1  # float32 carried by its decimal text
    np.testing.assert_allclose(t.particles["rlnDefocusAngle"], 30.0, rtol=1e-6)
    np.testing.assert_allclose(t.particles["rlnPhaseShift"], 90.0, rtol=1e-6)
    np.testing.assert_allclose(t.column("rlnVoltage"), 300.0)
    assert t.optics["rlnImageSize"].tolist() == [16, 16]
    assert t.image_refs()[0][0] == tmp_path / "J1/extract/s.mrc"
    write_star(tmp_path / "p.star", t)
    assert_same(t, read_star(tmp_path / "p.star"))


def test_cs_refused(tmp_path):
    with pytest.raises(ParticleFileError, match="zero particles"):
        read_particles(save_cs(tmp_path / "empty.cs", cs_array()[:0]))
    no_blob = np.zeros(2, dtype=[("uid", "<u8"), ("alignments2D/class", "<u4")])
    with pytest.raises(ParticleFileError, match="no blob/ fields"):
        read_particles(save_cs(tmp_path / "noblob.cs", no_blob))
    (tmp_path / "junk.cs").write_text("data_\n")
    with pytest.raises(ParticleFileError, match="not a cryoSPARC .cs file"):
        read_particles(tmp_path / "junk.cs")

"""`clcluster check`: every kind of bad input gives its message, all problems are reported
together, `exclude_bad` keeps good + excluded = input, and read_star never fails with anything
but ParticleFileError on malformed text (hypothesis)."""
from __future__ import annotations

import argparse
import tempfile
import warnings
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clcluster.steps import check
from clcluster.steps.check import check_particles, exclude_bad, format_report
from clcluster.io import ParticleFileError, ParticleTable, read_star, write_star
from clcluster.io.mrc import StackError, read_images

BOX = 16


def make_stack(path: Path, n: int, box: int = BOX, nan_at=()) -> None:
    rng = np.random.default_rng(0)
    images = rng.normal(size=(n, box, box)).astype(np.float32)
    for i in nan_at:
        images[i, 3, 4] = np.nan
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # mrcfile warns about the NaNs we put in
        with mrcfile.new(path, overwrite=True) as m:
            m.set_data(images)
            m.set_image_stack()


def make_table(tmp_path: Path, names, *, ctf=True, apix=1.5, optics=True) -> ParticleTable:
    """A STAR file in tmp_path (written and read back) for the given image names."""
    p = pd.DataFrame({"rlnImageName": pd.Series(names, dtype="str")})
    if ctf:
        p["rlnDefocusU"] = 15000.0
        p["rlnDefocusV"] = 14800.0
        p["rlnDefocusAngle"] = 30.0
    if optics:
        p["rlnOpticsGroup"] = 1
        o = pd.DataFrame({"rlnOpticsGroupName": ["opticsGroup1"], "rlnOpticsGroup": [1], "rlnImagePixelSize": [apix],
                          "rlnImageSize": [BOX], "rlnImageDimensionality": [2]})
        if ctf:
            o["rlnVoltage"], o["rlnSphericalAberration"], o["rlnAmplitudeContrast"] = 300.0, 2.7, 0.1
    else:
        o = None
        p["rlnDetectorPixelSize"] = apix
        p["rlnMagnification"] = 10000.0
        if ctf:
            p["rlnVoltage"], p["rlnSphericalAberration"], p["rlnAmplitudeContrast"] = 300.0, 2.7, 0.1
    star = tmp_path / "particles.star"
    write_star(star, ParticleTable(particles=p, optics=o, path=star))
    return read_star(star)


def messages(problems):
    return [p.message for p in problems]


def test_good_input(tmp_path):
    make_stack(tmp_path / "Stacks" / "a.mrcs", 12)
    t = make_table(tmp_path, [f"{i}@Stacks/a.mrcs" for i in range(1, 13)])
    assert check_particles(t, classes=2, batch=3) == []
    assert format_report([]) == "No problems found."


def test_missing_stack_and_exclusion(tmp_path):
    make_stack(tmp_path / "a.mrcs", 2)
    t = make_table(tmp_path, ["1@a.mrcs", "1@gone.mrcs", "2@a.mrcs", "2@gone.mrcs"])
    probs = check_particles(t)
    assert len(probs) == 1 and probs[0].scope == "stack" and probs[0].rows == (2, 4)
    assert "stack file not found" in probs[0].message and probs[0].file.endswith("gone.mrcs")
    good, excluded = exclude_bad(t, probs)
    assert good.particles["rlnImageName"].tolist() == ["1@a.mrcs", "2@a.mrcs"]
    assert excluded["row"].tolist() == [2, 4] and excluded["reason"].str.contains("not found").all()
    assert len(good) + len(excluded) == len(t)


def test_index_out_of_range(tmp_path):
    make_stack(tmp_path / "a.mrcs", 2)
    t = make_table(tmp_path, ["1@a.mrcs", "3@a.mrcs"])
    (p,) = check_particles(t)
    assert p.row == 2 and p.image_name == "3@a.mrcs" and "past the end of the stack (2 images)" in p.message


def test_bad_image_names(tmp_path):
    make_stack(tmp_path / "a.mrcs", 2)
    t = make_table(tmp_path, ["1@a.mrcs", "0@a.mrcs", "x@a.mrcs"])
    probs = check_particles(t)
    assert [p.row for p in probs] == [2, 3]
    assert "1-based" in probs[0].message and "non-integer" in probs[1].message


def test_different_boxes(tmp_path):
    make_stack(tmp_path / "a.mrcs", 3)
    make_stack(tmp_path / "b.mrcs", 1, box=24)
    t = make_table(tmp_path, ["1@a.mrcs", "2@a.mrcs", "3@a.mrcs", "1@b.mrcs"])
    msgs = " | ".join(messages(check_particles(t)))
    assert "box 24×24 px differs from the 16×16 px of the other stacks" in msgs
    assert "_rlnImageSize says 16" in msgs


def test_pixel_sizes_differ_within_group(tmp_path):
    make_stack(tmp_path / "a.mrcs", 3)
    t = make_table(tmp_path, ["1@a.mrcs", "2@a.mrcs", "3@a.mrcs"], optics=False)
    p = t.particles.copy()
    p.loc[2, "rlnDetectorPixelSize"] = 2.0
    (prob,) = check_particles(t.with_particles(p))
    assert prob.row == 3 and "pixel size 2 Å differs from the 1.5 Å" in prob.message


def test_missing_ctf(tmp_path):
    make_stack(tmp_path / "a.mrcs", 1)
    t = make_table(tmp_path, ["1@a.mrcs"], ctf=False)
    (p,) = check_particles(t, ctf_required=True)
    assert p.scope == "table" and "_rlnDefocusU" in p.message and "_rlnVoltage" in p.message
    assert check_particles(t, ctf_required=False) == []


def test_non_finite_ctf(tmp_path):
    make_stack(tmp_path / "a.mrcs", 2)
    t = make_table(tmp_path, ["1@a.mrcs", "2@a.mrcs"])
    p = t.particles.copy()
    p.loc[1, "rlnDefocusU"] = np.nan
    (prob,) = check_particles(t.with_particles(p))
    assert prob.row == 2 and "_rlnDefocusU is not finite" in prob.message


def test_non_finite_and_blank_pixels(tmp_path):
    make_stack(tmp_path / "a.mrcs", 7, nan_at=(1, 5))
    with mrcfile.open(tmp_path / "a.mrcs", "r+") as m:
        m.data[3] = 0.0
    t = make_table(tmp_path, [f"{i}@a.mrcs" for i in range(1, 8)])
    probs = check_particles(t, batch=2)  # batches cut through the stack
    assert sorted((p.row, p.message) for p in probs) == [
        (2, "image has non-finite pixels (NaN or Inf)"), (4, "image is constant (every pixel has the same value)"),
        (6, "image has non-finite pixels (NaN or Inf)")]
    assert check_particles(t, check_pixels=False) == []


def test_empty_star(tmp_path):
    t = make_table(tmp_path, [])
    assert len(t) == 0
    (p,) = check_particles(t, classes=3)[:1]
    assert "holds no particles" in p.message and p.scope == "table"


def test_duplicates(tmp_path):
    make_stack(tmp_path / "a.mrcs", 2)
    t = make_table(tmp_path, ["1@a.mrcs", "2@a.mrcs", "000001@a.mrcs", "1@./a.mrcs"])
    probs = check_particles(t)
    assert [p.row for p in probs] == [3, 4]
    assert all("referenced more than once" in p.message for p in probs)
    good, excluded = exclude_bad(t, probs)
    assert good.particles["rlnImageName"].tolist() == ["1@a.mrcs", "2@a.mrcs"]


@pytest.mark.parametrize("cut, words", [(+64, "header describes"), (-5000, "corrupt or truncated")])
def test_corrupt_mrc(tmp_path, cut, words):
    make_stack(tmp_path / "a.mrcs", 5)
    raw = (tmp_path / "a.mrcs").read_bytes()
    (tmp_path / "a.mrcs").write_bytes(raw[:cut] if cut < 0 else raw + bytes(cut))
    t = make_table(tmp_path, ["1@a.mrcs", "2@a.mrcs"])
    (p,) = check_particles(t)
    assert p.scope == "stack" and words in p.message and p.rows == (1, 2)


def test_truncated_stack_keeps_readable_images(tmp_path, capsys):
    """A stack whose header claims more images than the file holds (WarpTools/M, a copy cut
    short): the particles of complete images are usable; the others are named, excludable."""
    make_stack(tmp_path / "a.mrcs", 5)
    raw = (tmp_path / "a.mrcs").read_bytes()
    (tmp_path / "a.mrcs").write_bytes(raw[:-100])  # image 5 incomplete
    t = make_table(tmp_path, ["1@a.mrcs", "2@a.mrcs", "4@a.mrcs"])
    notes = []
    assert check_particles(t, notes=notes) == []
    assert "holds only images 1-4" in notes[0]
    images = read_images(*t.image_refs())
    with mrcfile.open(tmp_path / "a.mrcs", permissive=True) as m:  # mrcfile reads the header alone
        assert m.data is None
    assert images.shape == (3, BOX, BOX) and np.isfinite(images).all()
    t = make_table(tmp_path, ["1@a.mrcs", "5@a.mrcs"])
    (p,) = check_particles(t)
    assert p.scope == "particle" and p.row == 2 and "holds only images 1-4" in p.message
    with pytest.raises(StackError, match="holds only images 1-4 of the 5"):
        read_images(*t.image_refs())
    out = tmp_path / "good.star"
    assert run_cli([t.path, "--exclude-bad", out]) == 0
    assert read_star(out).particles["rlnImageName"].str.endswith("1@" + str(tmp_path / "a.mrcs")).tolist() == [True]


def test_classes_larger_than_particles(tmp_path):
    make_stack(tmp_path / "a.mrcs", 2)
    t = make_table(tmp_path, ["1@a.mrcs", "2@a.mrcs"])
    (p,) = check_particles(t, classes=3)
    assert "3 classes asked for but there are 2 particles" in p.message
    assert check_particles(t) == []


def test_all_problems_reported_together(tmp_path):
    make_stack(tmp_path / "a.mrcs", 3, nan_at=(0,))
    make_stack(tmp_path / "b.mrcs", 1, box=24)
    t = make_table(tmp_path, ["1@a.mrcs", "2@a.mrcs", "9@a.mrcs", "2@a.mrcs", "1@b.mrcs", "1@gone.mrcs"], ctf=False)
    probs = check_particles(t, classes=10)
    report = format_report(probs)
    for words in ("10 classes", "lack _rlnDefocusU", "stack file not found", "past the end",
                  "more than once", "non-finite pixels", "box 24×24"):
        assert words in report, words
    good, excluded = exclude_bad(t, probs)
    assert good.particles["rlnImageName"].tolist() == ["2@a.mrcs"]
    assert len(good) + len(excluded) == len(t)


def run_cli(argv):
    return check.main(check.add_args(argparse.ArgumentParser()).parse_args([str(a) for a in argv]))


def test_cli(tmp_path, capsys):
    make_stack(tmp_path / "a.mrcs", 2)
    t = make_table(tmp_path, ["1@a.mrcs", "2@a.mrcs", "3@a.mrcs"])
    star = t.path
    assert run_cli([star]) == 1
    assert "past the end" in capsys.readouterr().out
    out, csv = tmp_path / "good.star", tmp_path / "excluded.csv"
    assert run_cli([star, "--exclude-bad", out, "--excluded-list", csv]) == 0
    good = read_star(out)
    assert len(good) == 2 and good.flavour == "3.1"
    ex = pd.read_csv(csv)
    assert ex["row"].tolist() == [3] and ex["rlnImageName"].tolist() == ["3@a.mrcs"]
    assert run_cli([out]) == 0
    assert run_cli([out, "--classes", "1"]) == 1  # 2 particles: too few for the pipeline
    assert run_cli([tmp_path / "missing.star"]) == 2
    assert run_cli([star, "--no-ctf", "--classes", "5", "--exclude-bad", out]) == 1  # table-level: not excludable


def test_cli_count_only_checks_the_number_of_classes_without_reading_stacks(tmp_path, capsys):
    """--count-only (the workflow's check_classes rule): particles against --classes, no stack read."""
    t = make_table(tmp_path, [f"{i}@missing.mrcs" for i in range(1, 13)])  # 12 particles, no stack
    assert run_cli([t.path, "--count-only", "--classes", "6"]) == 0     # 12 >= 2 x 6
    assert "No problems found." in capsys.readouterr().out
    assert run_cli([t.path, "--count-only", "--classes", "7"]) == 1     # 12 < 2 x 7
    assert "too few to classify into 7 classes" in capsys.readouterr().out
    assert run_cli([t.path, "--count-only", "--classes", "13"]) == 1    # more classes than particles
    assert run_cli([t.path, "--classes", "6"]) == 1                     # the full check reads the stack


# ---- fuzzing read_star ---------------------------------------------------------------------

VALID = """# version 30001

data_optics

loop_
_rlnOpticsGroup #1
_rlnImagePixelSize #2
_rlnVoltage #3
1 1.5 300.0

data_particles

loop_
_rlnImageName #1
_rlnDefocusU #2
_rlnOpticsGroup #3
000001@a.mrcs 15000.0 1
000002@a.mrcs "15000.0" 1
"""

PIECES = ["data_", "loop_", "_rln", "#", "\n", " ", "\t", '"', "'", "@", "stop_", "_rlnImageName", "1", "nan", "\r",
          "data_particles\n", "loop_\n_rlnImageName\n", "\x00", "é"]


@st.composite
def mutated(draw):
    text = VALID
    for _ in range(draw(st.integers(1, 4))):
        pos = draw(st.integers(0, len(text)))
        op = draw(st.sampled_from(["insert", "delete", "replace"]))
        piece = draw(st.one_of(st.sampled_from(PIECES), st.text(max_size=5)))
        if op == "insert":
            text = text[:pos] + piece + text[pos:]
        elif op == "delete":
            text = text[:pos] + text[pos + draw(st.integers(1, 30)):]
        else:
            text = text[:pos] + piece + text[pos + len(piece):]
    return text


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=st.one_of(mutated(), st.text(max_size=200)))
def test_fuzz_read_star(text):
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "f.star"
        p.write_bytes(text.encode("utf-8", "surrogatepass"))
        try:
            t = read_star(p)
        except ParticleFileError as e:
            assert str(p) in str(e)
            return
        assert isinstance(t, ParticleTable)
        assert "rlnImageName" in t.particles.columns
        if len(t):
            assert np.all(t.pixel_size() > 0)

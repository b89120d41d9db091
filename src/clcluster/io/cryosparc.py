"""cryoSPARC particle files (.cs: a NumPy structured array) as a RELION 3.1 `ParticleTable`.

The conversion follows pyem's `csparc2star`:
- `_rlnImageName` = f"{blob/idx + 1}@{blob/path}" (cryoSPARC's `blob/idx` is 0-based; a
  leading `>`, cryoSPARC's export-relative marker, is stripped from `blob/path`);
- `_rlnDefocusU/V` = `ctf/df1_A`, `ctf/df2_A` (Å); `_rlnDefocusAngle` = degrees(`ctf/df_angle_rad`)
  (same sign and origin as RELION: pyem converts with `np.rad2deg` directly);
- `_rlnPhaseShift` = degrees(`ctf/phase_shift_rad`), `_rlnCtfBfactor` = `ctf/bfactor` (Å²),
  `_rlnCtfScalefactor` = `ctf/scale`;
- optics block synthesised, one group per distinct (pixel size `blob/psize_A` [Å/px],
  box `blob/shape`, voltage `ctf/accel_kv` [kV], Cs `ctf/cs_mm` [mm], amplitude contrast
  `ctf/amp_contrast`).

cryoSPARC stores float32; values are carried over by their shortest decimal form (15301.1
stays 15301.1, not 15301.099609375). Paths in a .cs are relative to the cryoSPARC project
folder: pass it as `root`. Not converted: poses (`alignments*`), `blob/sign` (cryoSPARC's
flag for the particles' contrast), higher-order aberrations (`ctf/tilt_A`, `ctf/trefoil_A`,
`ctf/tetra_A`, `ctf/anisomag`).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from clcluster.io.star import ParticleFileError, ParticleTable


def _short(values) -> np.ndarray:
    """float32 values as float64 with the same shortest decimal text (1.31f -> 1.31)."""
    a = np.asarray(values)
    if a.dtype == np.float32:
        return a.astype(str).astype(np.float64)
    return a.astype(np.float64)


def _text(values) -> np.ndarray:
    a = np.asarray(values)
    if a.dtype.kind == "S":
        return np.char.decode(a, "utf-8", errors="replace").astype(object)
    return a.astype(str).astype(object)


def _strip_marker(paths: np.ndarray) -> np.ndarray:
    return np.array([p[1:] if p.startswith(">") else p for p in paths], dtype=object)


def _load_cs(path: Path) -> np.ndarray:
    """The .cs structured array (one row per particle), with blob/path, blob/idx and blob/psize_A."""
    if not path.exists():
        raise ParticleFileError(f"{path}: particle file not found")
    try:
        cs = np.load(path, allow_pickle=False)
    except Exception as e:
        raise ParticleFileError(f"{path}: not a cryoSPARC .cs file (np.load failed: {type(e).__name__}: {e})") from None
    names = cs.dtype.names if isinstance(cs, np.ndarray) else None
    if not names:
        raise ParticleFileError(f"{path}: not a cryoSPARC .cs file (not a NumPy structured array)")
    if cs.ndim != 1:
        raise ParticleFileError(f"{path}: cryoSPARC .cs array has shape {cs.shape}; expected one row per particle")
    if not any(n.startswith("blob/") for n in names):
        prefixes = sorted({n.split("/")[0] for n in names if "/" in n})
        raise ParticleFileError(
            f"{path}: no blob/ fields, so no particle images are referenced ({len(cs)} rows; fields "
            f"{', '.join(p + '/*' for p in prefixes[:6])}{' …' if len(prefixes) > 6 else ''}); export the "
            "particles from a cryoSPARC job whose output includes the particle blob (e.g. Extract, 2D "
            "classification)")
    if len(cs) == 0:
        raise ParticleFileError(f"{path}: cryoSPARC .cs file with zero particles")
    missing = [f for f in ("blob/path", "blob/idx", "blob/psize_A") if f not in names]
    if missing:
        raise ParticleFileError(f"{path}: cryoSPARC .cs file lacks {', '.join(missing)}")
    return cs


def _image_names(path: Path, cs: np.ndarray) -> np.ndarray:
    """`_rlnImageName` of every row: f"{blob/idx + 1}@{blob/path}" (object array)."""
    stacks = _strip_marker(_text(cs["blob/path"]))
    idx = np.asarray(cs["blob/idx"]).astype(np.int64)
    if (idx < 0).any():
        i = int(np.flatnonzero(idx < 0)[0])
        raise ParticleFileError(f"{path}: row {i + 1}: negative blob/idx {idx[i]}")
    return pd.Series(idx + 1).astype(str).to_numpy(dtype=object) + "@" + stacks


def _optics_groups(cs: np.ndarray, apix: np.ndarray) -> tuple[np.ndarray, pd.DataFrame]:
    """(0-based optics group of every row, the optics block): one group per distinct pixel size
    (Å/px), box (px), voltage (kV), Cs (mm) and amplitude contrast."""
    names = cs.dtype.names
    n = len(cs)
    box = np.asarray(cs["blob/shape"])[:, -1].astype(np.int64) if "blob/shape" in names else np.zeros(n, np.int64)
    optics_cols = {"rlnImagePixelSize": apix, "rlnImageSize": box}
    for field, label in (("ctf/accel_kv", "rlnVoltage"), ("ctf/cs_mm", "rlnSphericalAberration"),
                         ("ctf/amp_contrast", "rlnAmplitudeContrast")):
        if field in names:
            optics_cols[label] = _short(cs[field])
    key = pd.DataFrame(optics_cols)
    if "blob/shape" not in names:
        key = key.drop(columns="rlnImageSize")
    groups, uniques = pd.factorize(pd.MultiIndex.from_frame(key))
    optics = pd.DataFrame(list(uniques), columns=key.columns)
    optics.insert(0, "rlnOpticsGroup", np.arange(1, len(optics) + 1))
    optics.insert(0, "rlnOpticsGroupName", [f"opticsGroup{g}" for g in optics["rlnOpticsGroup"]])
    optics["rlnImageDimensionality"] = 2
    optics["rlnCtfDataAreCtfPremultiplied"] = 0
    optics["rlnOpticsGroupName"] = optics["rlnOpticsGroupName"].astype("str")
    return groups, optics


# .cs field -> (RELION label, radians converted to degrees)
_PARTICLE_FIELDS = (("ctf/df1_A", "rlnDefocusU", False), ("ctf/df2_A", "rlnDefocusV", False),
                    ("ctf/df_angle_rad", "rlnDefocusAngle", True), ("ctf/phase_shift_rad", "rlnPhaseShift", True),
                    ("ctf/bfactor", "rlnCtfBfactor", False), ("ctf/scale", "rlnCtfScalefactor", False))


def _particle_columns(cs: np.ndarray, image_names: np.ndarray, groups: np.ndarray) -> pd.DataFrame:
    """The particles block: image name, micrograph, optics group (1-based) and the CTF columns present."""
    names = cs.dtype.names
    particles = pd.DataFrame({"rlnImageName": pd.Series(image_names, dtype="str")})
    if "location/micrograph_path" in names:
        particles["rlnMicrographName"] = pd.Series(_strip_marker(_text(cs["location/micrograph_path"])), dtype="str")
    particles["rlnOpticsGroup"] = groups + 1
    for field, label, radians in _PARTICLE_FIELDS:
        if field in names:
            particles[label] = _short(np.rad2deg(np.asarray(cs[field])) if radians else cs[field])
    return particles


def read_cs(path, root=None) -> ParticleTable:
    """Read a cryoSPARC .cs particle file into a RELION 3.1-flavoured ParticleTable.

    Refuses (ParticleFileError) files that are not NumPy structured arrays, have zero rows,
    or lack the `blob/path`, `blob/idx` or `blob/psize_A` fields."""
    path = Path(path)
    cs = _load_cs(path)
    image_names = _image_names(path, cs)
    apix = _short(cs["blob/psize_A"])
    groups, optics = _optics_groups(cs, apix)
    particles = _particle_columns(cs, image_names, groups)
    bad = np.flatnonzero(~(np.isfinite(apix) & (apix > 0)))
    if bad.size:
        i = int(bad[0])
        raise ParticleFileError(f"{path}: row {i + 1} ({image_names[i]}) has blob/psize_A {apix[i]:g} "
                                "(must be a positive pixel size in Å)")
    return ParticleTable(particles=particles, optics=optics, path=path, root=Path(root) if root else None,
                         particles_block="particles", optics_block="optics", version=30001)

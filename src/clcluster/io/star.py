"""RELION STAR particle files through `starfile`: read, resolve optics, write in the input's flavour.

A `ParticleTable` holds the particle rows (a pandas DataFrame, column names without the
leading underscore, as `starfile` gives them), the optics block when there is one (RELION
3.1+), and the names of the blocks, so that what is written keeps the input's flavour,
every column and the optics block. Indices inside the package are 0-based; `_rlnImageName`
is `index@stack` with a 1-based index.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd
import starfile

from .atomic import atomic_path


class ParticleFileError(ValueError):
    """A particle file that cannot be used; the message names the file and what is wrong."""


@dataclasses.dataclass
class ParticleTable:
    """Particles of one STAR file.

    particles: one row per particle (columns like "rlnImageName", "rlnDefocusU").
    optics: the optics groups (RELION 3.1+), or None for the 3.0 flavour.
    path: the STAR file it came from (stack paths are relative to its folder).
    root: optional project root that stack paths are resolved against first.
    """

    particles: pd.DataFrame
    optics: pd.DataFrame | None = None
    path: Path | None = None
    root: Path | None = None
    particles_block: str = "particles"
    optics_block: str = "optics"

    @property
    def flavour(self) -> str:
        return "3.1" if self.optics is not None else "3.0"

    def __len__(self) -> int:
        return len(self.particles)

    def subset(self, rows) -> "ParticleTable":
        """A table with the given 0-based rows (same optics, same origin)."""
        return dataclasses.replace(self, particles=self.particles.iloc[rows].reset_index(drop=True))

    def with_particles(self, particles: pd.DataFrame) -> "ParticleTable":
        return dataclasses.replace(self, particles=particles.reset_index(drop=True))

    @property
    def folder(self) -> Path:
        return self.path.parent if self.path is not None else Path(".")

    # ---- per-particle values merged from the optics block -------------------------------
    def column(self, name: str, default=None) -> np.ndarray | None:
        """Per-particle values of a RELION label ("rlnVoltage"), from the particle rows or
        from the particle's optics group; `default` (or None) when absent in both."""
        if name in self.particles.columns:
            return self.particles[name].to_numpy()
        if self.optics is not None and name in self.optics.columns:
            groups = self.optics_group_rows()
            return self.optics[name].to_numpy()[groups]
        if default is None:
            return None
        return np.full(len(self.particles), default)

    def optics_group_rows(self) -> np.ndarray:
        """Row of the optics block for each particle (by `rlnOpticsGroup` number)."""
        if self.optics is None:
            raise ParticleFileError(f"{self.path}: no optics block")
        if "rlnOpticsGroup" not in self.particles.columns:
            if len(self.optics) == 1:
                return np.zeros(len(self.particles), dtype=int)
            raise ParticleFileError(
                f"{self.path}: {len(self.optics)} optics groups but the particles have no _rlnOpticsGroup column")
        numbers = self.optics["rlnOpticsGroup"].to_numpy() if "rlnOpticsGroup" in self.optics else np.arange(1, len(self.optics) + 1)
        lookup = {int(n): i for i, n in enumerate(numbers)}
        groups = self.particles["rlnOpticsGroup"].to_numpy()
        rows = np.empty(len(groups), dtype=int)
        for i, g in enumerate(groups):
            try:
                rows[i] = lookup[int(g)]
            except (KeyError, ValueError):
                raise ParticleFileError(
                    f"{self.path}: particle row {i + 1} ({self.image_name(i)}) names optics group {g}, "
                    f"which the optics block does not define (groups {sorted(lookup)})") from None
        return rows

    def image_name(self, i: int) -> str:
        if "rlnImageName" in self.particles.columns:
            return str(self.particles["rlnImageName"].iloc[i])
        return f"row {i + 1}"

    def pixel_size(self) -> np.ndarray:
        """Pixel size of each particle image in Å/px (ImagePixelSize, PixelSize, or
        DetectorPixelSize [µm] * 1e4 / Magnification for RELION <= 3.0)."""
        for label in ("rlnImagePixelSize", "rlnPixelSize"):
            v = self.column(label)
            if v is not None:
                return v.astype(np.float64)
        det, mag = self.column("rlnDetectorPixelSize"), self.column("rlnMagnification")
        if det is not None and mag is not None:
            return det.astype(np.float64) * 1e4 / mag.astype(np.float64)
        raise ParticleFileError(
            f"{self.path}: no pixel size anywhere (need _rlnImagePixelSize in the optics block, "
            "_rlnPixelSize, or _rlnDetectorPixelSize with _rlnMagnification)")

    # ---- image references ---------------------------------------------------------------
    def image_refs(self) -> tuple[list[Path], np.ndarray]:
        """(stack path, 0-based index) of every particle, paths resolved against the project
        root (if given and the file exists there), else the STAR file's folder."""
        if "rlnImageName" not in self.particles.columns:
            raise ParticleFileError(f"{self.path}: no _rlnImageName column; this is not a particle file")
        paths, indices = [], np.empty(len(self.particles), dtype=np.int64)
        cache: dict[str, Path] = {}
        for i, name in enumerate(self.particles["rlnImageName"].astype(str)):
            idx, stack = parse_image_name(name, self.path, i)
            indices[i] = idx
            if stack not in cache:
                cache[stack] = self.resolve(stack)
            paths.append(cache[stack])
        return paths, indices

    def resolve(self, stack: str) -> Path:
        p = Path(stack)
        if p.is_absolute():
            return p
        if self.root is not None and (self.root / p).exists():
            return self.root / p
        return self.folder / p


def parse_image_name(name: str, star_path=None, row: int = 0) -> tuple[int, str]:
    """Split `index@stack` (1-based index) into (0-based index, stack). A name without `@`
    is a single-image file (index 0)."""
    name = name.strip()
    if "@" not in name:
        return 0, name
    idx, stack = name.split("@", 1)
    try:
        i = int(idx)
    except ValueError:
        raise ParticleFileError(f"{star_path}: particle row {row + 1}: _rlnImageName {name!r} has a non-integer index") from None
    if i < 1:
        raise ParticleFileError(f"{star_path}: particle row {row + 1}: _rlnImageName {name!r} has index {i}; indices are 1-based")
    return i - 1, stack


def _is_particles(df) -> bool:
    return isinstance(df, pd.DataFrame) and "rlnImageName" in df.columns


def _is_optics(df) -> bool:
    return isinstance(df, pd.DataFrame) and "rlnOpticsGroup" in df.columns and "rlnImageName" not in df.columns and (
        "rlnVoltage" in df.columns or "rlnImagePixelSize" in df.columns or "rlnOpticsGroupName" in df.columns)


def read_star(path, root=None) -> ParticleTable:
    """Read a RELION 3.1+ (optics + particles) or 3.0 (particles only) STAR file."""
    path = Path(path)
    if not path.exists():
        raise ParticleFileError(f"{path}: particle file not found")
    try:
        blocks = starfile.read(path, always_dict=True)
    except Exception as e:  # starfile raises many kinds on malformed text
        raise ParticleFileError(f"{path}: not a readable STAR file ({type(e).__name__}: {e})") from None
    particle_names = [k for k, v in blocks.items() if _is_particles(v)]
    if not particle_names:
        raise ParticleFileError(f"{path}: no data block with an _rlnImageName column; this is not a particle file")
    if len(particle_names) > 1:
        preferred = [k for k in particle_names if k == "particles"]
        particle_names = preferred or particle_names[:1]
    pname = particle_names[0]
    particles = blocks[pname].reset_index(drop=True)
    optics_names = [k for k, v in blocks.items() if _is_optics(v) and k != pname]
    optics = blocks[optics_names[0]].reset_index(drop=True) if optics_names else None
    return ParticleTable(particles=particles, optics=optics, path=path,
                         root=Path(root) if root else None, particles_block=pname,
                         optics_block=optics_names[0] if optics_names else "optics")


def write_star(path, table: ParticleTable) -> None:
    """Write `table` keeping its flavour: optics + particles for 3.1, particles alone for 3.0.

    Written atomically (temporary name, then rename)."""
    blocks = {}
    if table.optics is not None:
        blocks[table.optics_block] = table.optics
    blocks[table.particles_block] = table.particles
    with atomic_path(path) as tmp:
        starfile.write(blocks, tmp, float_format="%.6f")

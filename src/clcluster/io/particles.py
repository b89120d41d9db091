"""One entry point for particle files: RELION STAR or cryoSPARC .cs, chosen by extension
(or, for other extensions, by content: the NumPy magic bytes mean .cs, text means STAR)."""
from __future__ import annotations

from pathlib import Path

from clcluster.io.cryosparc import read_cs
from clcluster.io.star import ParticleFileError, ParticleTable, read_star

# Hidden column of the shard STAR files: each particle's 0-based row in the input particle file,
# so that every later step can put its results back in input order and check that none is lost.
ROW_COLUMN = "clclusterInputRow"


def read_particles(path, root=None) -> ParticleTable:
    """Read a particle file (.star or .cs) into a ParticleTable; `root` is the project folder
    that stack paths are resolved against first (cryoSPARC paths are relative to it)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".cs":
        return read_cs(path, root=root)
    if suffix == ".star":
        return read_star(path, root=root)
    if not path.exists():
        raise ParticleFileError(f"{path}: particle file not found")
    try:
        with open(path, "rb") as f:
            magic = f.read(6)
    except OSError as e:
        raise ParticleFileError(f"{path}: cannot read the particle file ({e.strerror or e})") from None
    if magic == b"\x93NUMPY":
        return read_cs(path, root=root)
    if suffix in (".mrc", ".mrcs", ".st", ".map"):
        raise ParticleFileError(f"{path}: an image stack, not a particle file; pass the .star (or .cs) "
                                "that lists the particles")
    return read_star(path, root=root)

"""File I/O: STAR (via starfile), cryoSPARC .cs, MRC stacks (via mrcfile), atomic writes.

`read_particles(path, root=None)` is the entry point for particle files (.star or .cs)."""
from clcluster.io.particles import read_particles
from clcluster.io.star import ParticleFileError, ParticleTable, read_star, write_star

__all__ = ["read_particles", "read_star", "write_star", "ParticleTable", "ParticleFileError"]

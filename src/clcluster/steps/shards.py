"""Shards: contiguous subsets of the particle table, as STAR files (no pixel copy)."""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np

from clcluster.io.particles import ROW_COLUMN
from clcluster.io.star import ParticleTable, write_star

log = logging.getLogger(__name__)


def plan_shards(n: int, size: int) -> list[range]:
    """Consecutive ranges of at most `size` particles covering 0..n-1."""
    return [range(s, min(n, s + size)) for s in range(0, n, size)]


def n_shards(n: int, size: int) -> int:
    return max(1, -(-n // size))


def write_shards(table: ParticleTable, size: int, out_dir) -> list[Path]:
    """Write shard_{i}.star files with the input's optics and columns plus the input row index;
    stack paths are made absolute so the shards can live anywhere."""
    out_dir = Path(out_dir)
    parts = table.with_absolute_paths().particles
    parts[ROW_COLUMN] = np.arange(len(parts))
    full = table.with_particles(parts)
    out = []
    for i, r in enumerate(plan_shards(len(table), size)):
        p = out_dir / f"shard_{i}.star"
        write_star(p, full.subset(np.arange(r.start, r.stop)))
        out.append(p)
    return out


# --- command line: `clcluster shard` -------------------------------------------------------------
def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("particles", help="RELION STAR (3.0 or 3.1+) or cryoSPARC .cs")
    p.add_argument("--size", type=int, required=True, help="particles per shard")
    p.add_argument("--out-dir", required=True, help="folder for shard_{i}.star")
    p.add_argument("--root", help="project root that relative stack paths are resolved against first")


def main(args: argparse.Namespace) -> int:
    from clcluster.io import read_particles

    table = read_particles(args.particles, root=args.root or None)
    paths = write_shards(table, args.size, args.out_dir)
    log.info("%d particles in %d shards of at most %d", len(table), len(paths), args.size)
    return 0

"""How long does one E-step take? Times one annealed-EM pass (`align.soft_align_all`) and one
ML2D E-step (`ml2d.ML2D.e_step`) over all K classes and over c candidate classes per particle,
on random images (the cost does not depend on the content), one CPU thread.

    python benchmarks/estep_timing.py [--particles 2000] [--box 32] [--k 50] [--candidates 8] [--repeats 3]

Grids: the annealed EM's default `PolarGrid(box)` (13 shifts, 64 angles), ML2D with 64
rotations and shifts up to 3 px (29 shifts). Prints the best of `repeats` runs (after one
warm-up) per case. To compare two revisions, run it with PYTHONPATH pointing at each one's
src/, alternately, on the same machine.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from clcluster.em import ml2d
from clcluster.em.align import PolarCache, PolarGrid, PolarScanner, soft_align_all


def best_time(f, repeats: int) -> float:
    f()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        f()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--particles", type=int, default=2000)
    p.add_argument("--box", type=int, default=32)
    p.add_argument("--k", type=int, default=50)
    p.add_argument("--candidates", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    torch.set_num_threads(1)
    n, box, k, c = a.particles, a.box, a.k, a.candidates
    rng = np.random.default_rng(0)
    refs = rng.normal(size=(k, box, box)).astype(np.float32)
    labels = rng.integers(0, k, n)
    images = (refs[labels] + 3 * rng.normal(size=(n, box, box))).astype(np.float32)
    cand = np.concatenate([labels[:, None], rng.integers(0, k, (n, c - 1))], axis=1)

    pg = PolarGrid(box)
    cache = PolarCache(images, pg)
    refs_polar = torch.randn(k, pg.n_radii, pg.n_angles, generator=torch.Generator().manual_seed(0))
    log_prior = torch.full((k,), -np.log(k))
    times = {}
    for name, cd in (("all classes", None), (f"{c} candidates", cand)):
        times[f"annealed EM pass, {name}"] = best_time(
            lambda: soft_align_all(cache, refs_polar, cd, 300.0, log_prior), a.repeats
        )
    scan = PolarScanner(box, 64, 3)
    for name, cd in (("all classes", None), (f"{c} candidates", cand)):
        data = ml2d.image_data(torch.as_tensor(images), scan, k, cd, None, 1.5e9)
        model = ml2d.ML2D(scan, k).start(refs, float(data.xx.mean() / data.npix))
        times[f"ML2D E-step, {name}"] = best_time(lambda: model.e_step(data), a.repeats)
    print(f"{n} particles, box {box}, K={k}")
    for name, t in times.items():
        print(f"{name:34s} {t:.3f} s")


if __name__ == "__main__":
    main()

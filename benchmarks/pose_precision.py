"""Precision of the exported in-plane poses against simulated truth, with and without the local
pose refinement (export.refine_poses).

    python benchmarks/pose_precision.py                      # box 64 -> 32 and 128 -> 32, SNR 0.2
    python benchmarks/pose_precision.py --cases 64,32,0.05 128,64,0.1

Each case BOX,WORK,SNR simulates 4 views x 60 images of the built-in volume (box BOX px at
2.5 x 64 / BOX Å/px, shifts up to 3 x BOX / 64 px), phase flips and crops them to WORK px, and
runs `export.export` with the true classes twice (refinement off / on). The scatter is the RMS
error of the written poses (psi, origins) against the truth after removing each class's
constant frame offset (a class average's frame is arbitrary): angle in degrees, shift in input
pixels. Times are the whole export's wall time.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import starfile

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from test_poses import _scatter

from clcluster.image.ctf import CTFParams
from clcluster.steps.export import ExportConfig, export
from clcluster.io.star import read_star
from clcluster.steps.preprocess import PreprocessConfig, preprocess_batch
from clcluster.steps.simulate import SimulationConfig, simulate, write_simulation


def run_case(box: int, work: int, snr: float, views: int = 4, per_view: int = 60, seed: int = 3) -> dict:
    folder = Path(tempfile.mkdtemp(prefix="pose-precision-"))
    cfg = SimulationConfig(views=views, images_per_view=per_view, snr=snr, seed=seed, box=box,
                           apix=2.5 * 64 / box, max_shift_px=3 * box / 64, stack_size=200)
    sim = simulate(cfg)
    table = read_star(write_simulation(sim, cfg, folder / "data"))
    labels = sim.truth["class"].to_numpy().astype(np.int64)
    images = preprocess_batch(sim.images, CTFParams.from_table(table), cfg.apix, PreprocessConfig(box=work))
    out = {}
    for refine in (False, True):
        t0 = time.time()
        export(table, {"labels": labels}, images, {"apix_A": cfg.apix * box / work}, views, folder / f"export_{refine}",
               ExportConfig(refine_poses=refine, cryosparc=False))
        p = starfile.read(folder / f"export_{refine}" / "particles_classified.star", always_dict=True)["particles"]
        angle, shift = _scatter(p["rlnAnglePsi"].to_numpy(), p[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy(),
                                sim.truth, cfg.apix, labels)
        out[refine] = (angle, shift, time.time() - t0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", nargs="+", default=["64,32,0.2", "128,32,0.2"], help="BOX,WORK,SNR")
    args = ap.parse_args()
    print("| Input box → working box, SNR | Working-grid poses: angle, shift | Refined: angle, shift | "
          "Export time without / with refinement |")
    print("|---|---|---|---|")
    for case in args.cases:
        box, work, snr = case.split(",")
        r = run_case(int(box), int(work), float(snr))
        print(f"| {box} → {work}, SNR {snr} | {r[False][0]:.2f}°, {r[False][1]:.2f} px | {r[True][0]:.2f}°, "
              f"{r[True][1]:.2f} px | {r[False][2]:.0f} s / {r[True][2]:.0f} s |", flush=True)


if __name__ == "__main__":
    main()

"""Whitening variants on one realistic stack (coloured noise): the noise spectrum estimated from
the whole images, from their background, or the simulator's true spectrum (an oracle bound),
optionally with a wider refinement shift search. One results table per variant under OUT.

    python benchmarks/noise_whitening.py OUT [--particles 2000] [--variants none estimate true background]
        [--shift 2] [--methods cl_refined truth_kmeans] [--ribosome PATH]
"""
from __future__ import annotations

import argparse
import copy
import logging
from pathlib import Path

import pandas as pd

from clcluster.bench.realistic_benchmark import RealisticBenchmarkConfig, run_realistic_benchmark
from clcluster.core.config import load_config
from clcluster.steps.simulate import SimulationConfig

VARIANTS = ("none", "estimate", "true", "background")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--particles", type=int, default=2000)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    ap.add_argument("--shift", type=int, nargs="+", default=[2], help="cluster.refine_max_shift_px values")
    ap.add_argument("--methods", nargs="+", default=["cl_refined", "truth_kmeans"])
    ap.add_argument("--ribosome", default="../shared/data/volumes/clean70SRibosome_vol_65p.mrc")
    ap.add_argument("--config", default="config/config.yaml")
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    sc = SimulationConfig(volumes=(a.ribosome,), apix=5.0, volume_apix=5.0, mode="realistic",
                          realistic={"particles": a.particles})
    rows = []
    for shift in a.shift:
        for v in a.variants:
            cfg = copy.deepcopy(load_config(a.config))
            cfg["preprocess"]["whiten"] = v != "none"
            cfg["preprocess"]["whiten_estimate"] = "background" if v == "background" else "images"
            cfg["cluster"]["refine_max_shift_px"] = shift
            bc = RealisticBenchmarkConfig(methods=tuple(a.methods), whiten_spectrum="true" if v == "true" else "estimate")
            df = run_realistic_benchmark(bc, cfg, Path(a.out) / f"{v}_shift{shift}", sc)
            rows.append(df.assign(whitening=v, refine_max_shift_px=shift))
            pd.concat(rows).to_csv(Path(a.out) / "summary.csv", index=False)
            print(pd.concat(rows)[["whitening", "refine_max_shift_px", "method", "view_median_deg", "view_score",
                                   "junk_removed", "good_kept", "fidelity"]].to_string(index=False), flush=True)


if __name__ == "__main__":
    main()

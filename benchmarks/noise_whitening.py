"""Whitening variants on one realistic stack (coloured noise): the noise spectrum estimated from
the whole images, from their background, or the simulator's true spectrum (an oracle bound),
optionally with a wider refinement shift search. One results table per variant under OUT.

    python benchmarks/noise_whitening.py OUT [--particles 2000] [--variants none estimate true background]
        [--shift 2] [--methods cl_refined truth_kmeans] [--ribosome PATH]
    python benchmarks/noise_whitening.py --information [--particles 400]

--information prints, for the coloured and the white noise of the same pixel SNR (0.05), the SNR per
Fourier shell of the working box (clean good particles' power over the noise power) and its sum
over the box's Fourier bins (what an ideal whitened matched filter collects per image).
"""
from __future__ import annotations

import argparse
import copy
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from clcluster.bench.realistic_benchmark import RealisticBenchmarkConfig, run_realistic_benchmark
from clcluster.core.config import load_config
from clcluster.steps.simulate import SimulationConfig

VARIANTS = ("none", "estimate", "true", "background")


def information(ribosome: str, particles: int, snr: float = 0.05, work_box: int = 32) -> None:
    from clcluster.sim.realistic import PARTICLE, RealisticConfig, noise_spectrum, radial_profile, simulate_realistic_clean
    from clcluster.steps.simulate import load_volume

    for name, extra in (("coloured", {}), ("white", {"noise_lowfreq_rise": 0, "noise_rolloff": 0})):
        sc = SimulationConfig(volumes=(ribosome,), apix=5.0, volume_apix=5.0, mode="realistic",
                              realistic={"particles": particles, **extra})
        rc = RealisticConfig.from_dict(sc.realistic)
        clean, _, truth, _ = simulate_realistic_clean(sc, rc, load_volume(ribosome, sc.box, sc.apix, sc.volume_apix))
        c = clean[truth["kind"].to_numpy().astype(str) == PARTICLE]
        box = c.shape[-1]
        noise = radial_profile(noise_spectrum(box, rc)) * c.var(axis=(1, 2)).mean() / snr
        shell_snr = radial_profile((np.abs(np.fft.fft2(c)) ** 2).mean(0) / box ** 2) / noise
        k = np.fft.fftfreq(box) * box
        counts = np.bincount(np.rint(np.sqrt(k[:, None] ** 2 + k[None, :] ** 2)).astype(int).ravel())
        keep = slice(1, work_box // 2 + 1)
        print(f"{name}: SNR per shell 1..{work_box // 2}: {np.round(shell_snr[keep], 3)}; sum over the working box's "
              f"bins {float((counts[keep] * shell_snr[keep]).sum()):.1f}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", nargs="?")
    ap.add_argument("--information", action="store_true")
    ap.add_argument("--particles", type=int, default=2000)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    ap.add_argument("--shift", type=int, nargs="+", default=[2], help="cluster.refine_max_shift_px values")
    ap.add_argument("--methods", nargs="+", default=["cl_refined", "truth_kmeans"])
    ap.add_argument("--ribosome", default="../shared/data/volumes/clean70SRibosome_vol_65p.mrc")
    ap.add_argument("--config", default="config/config.yaml")
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if a.information:
        return information(a.ribosome, a.particles)
    if a.out is None:
        ap.error("OUT is required unless --information")
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

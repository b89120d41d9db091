"""How well does the pick contrast (`image.pickscore`) tell noise-like picks from particles?

Simulates realistic stacks (the ribosome map, box 64 at 5 Å/px, realistic mode), prepares them
as the default config does (whitened) and also without whitening, and prints for each the area
under the ROC curve of the score (good particles against each junk kind; 0.5 = no information),
the estimated noise-like fraction and, for several `export.pick_max_good_loss` settings, the
fraction of good particles kept and of junk removed (all junk and per kind).

    python benchmarks/pick_contrast.py [--particles 2000] [--ribosome PATH]

Cases: SNR 0.05, uniform views, 25 % junk (the realistic benchmark's default) and SNR 0.02,
preferred views, 30 % junk.
"""
from __future__ import annotations

import argparse
import dataclasses

import numpy as np
from sklearn.metrics import roc_auc_score

from clcluster.bench.benchmark import prepare
from clcluster.core.config import load_config
from clcluster.image.pickscore import pick_contrast
from clcluster.sim.realistic import PARTICLE, RealisticConfig, add_coloured_noise, simulate_realistic_clean
from clcluster.steps.preprocess import PreprocessConfig
from clcluster.steps.simulate import SimulationConfig, load_volume

CASES = {"SNR 0.05, uniform, 25 % junk": (0.05, {}),
         "SNR 0.02, preferred, 30 % junk": (0.02, {"orientations": "preferred", "junk_fraction": 0.3})}
LOSSES = (0.02, 0.05, 0.1)


def stacks(ribosome: str, particles: int, snr: float, realistic: dict, cfg: dict):
    """{'whitened': images, 'unwhitened': images} (n, box, box) and the pick kinds (n,)."""
    sc = SimulationConfig(volumes=(ribosome,), apix=5.0, volume_apix=5.0, mode="realistic",
                          realistic={"particles": particles, **realistic})
    rc = RealisticConfig.from_dict(sc.realistic)
    clean, ctf, truth, _ = simulate_realistic_clean(sc, rc, load_volume(ribosome, sc.box, sc.apix, sc.volume_apix))
    kind = truth["kind"].to_numpy().astype(str)
    noisy, _ = add_coloured_noise(clean, kind == PARTICLE, snr, rc, sc.seed)
    pp = PreprocessConfig.from_dict(cfg["preprocess"])
    return {name: prepare(noisy, ctf, sc.apix, dataclasses.replace(pp, whiten=w))
            for name, w in (("whitened", True), ("unwhitened", False))}, kind


def report(images, kind: np.ndarray) -> None:
    good = kind == PARTICLE
    kinds = sorted(set(kind) - {PARTICLE})
    box = images.shape[-1]
    base = pick_contrast(images, 0.375 * box, LOSSES[0])
    aucs = [roc_auc_score(good, base.scores)] + [
        roc_auc_score(np.r_[np.ones(good.sum()), np.zeros((kind == k).sum())], np.r_[base.scores[good], base.scores[kind == k]])
        for k in kinds]
    print(f"  AUC all {aucs[0]:.2f}; " + ", ".join(f"{k} {a:.2f}" for k, a in zip(kinds, aucs[1:])))
    print(f"  estimated noise-like fraction {base.noise_fraction:.2f} (empty picks {np.mean(kind == 'empty'):.2f})")
    print("  | max_good_loss | good kept | junk removed | " + " | ".join(kinds) + " |")
    for loss in LOSSES:
        pc = pick_contrast(images, 0.375 * box, loss)
        flag = pc.noise_like
        print(f"  | {loss} | {1 - flag[good].mean():.3f} | {flag[~good].mean():.3f} | "
              + " | ".join(f"{flag[kind == k].mean():.2f}" for k in kinds) + " |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--particles", type=int, default=2000)
    ap.add_argument("--ribosome", default="../shared/data/volumes/clean70SRibosome_vol_65p.mrc")
    ap.add_argument("--config", default="config/config.yaml")
    a = ap.parse_args()
    cfg = load_config(a.config)
    for name, (snr, realistic) in CASES.items():
        images, kind = stacks(a.ribosome, a.particles, snr, realistic, cfg)
        for prep, x in images.items():
            print(f"{name}, {a.particles} picks, {prep}:")
            report(x, kind)


if __name__ == "__main__":
    main()

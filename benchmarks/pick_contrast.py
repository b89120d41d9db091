"""How well does the pick contrast (`image.pickscore`) tell noise-like picks from particles?

Simulates realistic stacks (the ribosome map, box 64 at 5 Å/px, realistic mode), prepares them
as the default config does (whitened) and also without whitening, and prints for each the area
under the ROC curve of the score (good particles against each junk kind; 0.5 = no information),
the estimated noise-like fraction and, for several `export.pick_max_good_loss` settings, the
estimated and the real fraction of good particles lost and of junk removed (all junk and per
kind), with Storey's loss estimate alone (the refinement's fit) and bounded by the model of the
particles' scores as well (the export's selection).

    python benchmarks/pick_contrast.py [--particles 2000] [--ribosome PATH]

Cases: SNR 0.05, uniform views, 25 % junk (the realistic benchmark's default) and SNR 0.02,
preferred views, 30 % junk.

    python benchmarks/pick_contrast.py --particles 4000 --ml2d-seeds 1 2

also fits ML2D with balanced priors (K=20, random references, 40 iterations) on the whitened
SNR 0.05 stack with and without its noise-like picks (those are then labelled by the fitted
model) and prints the view-coherence score of each fit.
"""
from __future__ import annotations

import argparse
import dataclasses

import numpy as np
from sklearn.metrics import roc_auc_score

from clcluster.bench.benchmark import prepare
from clcluster.core.config import load_config
from clcluster.bench.realistic_scores import coherence_references, median_view_angle, view_score
from clcluster.em.ml2d import classify, ml2d
from clcluster.image.pickscore import pick_contrast
from clcluster.sim.realistic import PARTICLE
from clcluster.steps.preprocess import PreprocessConfig
from refinement_start import noisy_realistic_stack

CASES = {"SNR 0.05, uniform, 25 % junk": (0.05, {}),
         "SNR 0.02, preferred, 30 % junk": (0.02, {"orientations": "preferred", "junk_fraction": 0.3})}
LOSSES = (0.02, 0.05, 0.1)


def stacks(ribosome: str, particles: int, snr: float, realistic: dict, cfg: dict):
    """{'whitened': images, 'unwhitened': images} (n, box, box), the pick kinds (n,) and the
    true viewing directions (n, 3)."""
    noisy, ctf, truth, sc = noisy_realistic_stack(ribosome, particles, snr, realistic)
    pp = PreprocessConfig.from_dict(cfg["preprocess"])
    return ({name: prepare(noisy, ctf, sc.apix, dataclasses.replace(pp, whiten=w))
             for name, w in (("whitened", True), ("unwhitened", False))},
            truth["kind"].to_numpy().astype(str), truth[["dir_x", "dir_y", "dir_z"]].to_numpy())


def fit_without_noise_like(images, kind: np.ndarray, dirs: np.ndarray, seeds, k: int = 20) -> None:
    """View score of balanced ML2D fits (random references) on all picks and without the
    noise-like ones (`export.pick_max_good_loss` 0.05), every pick labelled by the fitted model."""
    good = kind == PARTICLE
    coherence = coherence_references(dirs[good], k, 0)
    fit_rows = np.flatnonzero(~pick_contrast(images, None, 0.05).noise_like)
    for seed in seeds:
        for name, rows in (("all picks", np.arange(len(images))), ("the picks that are not noise-like", fit_rows)):
            result = ml2d(images[rows], k, max_iter=40, n_rotations=64, max_shift=3, seed=seed, balance=True)
            labels = classify(images, result)[0]
            score = view_score(median_view_angle(dirs[good], labels[good]), coherence)
            print(f"  ML2D (balanced, seed {seed}) fitted on {name} ({len(rows)}): view score {score:.3f}")


def report(images, kind: np.ndarray) -> None:
    good = kind == PARTICLE
    kinds = sorted(set(kind) - {PARTICLE})
    base = pick_contrast(images, None, LOSSES[0])
    aucs = [roc_auc_score(good, base.scores)] + [
        roc_auc_score(np.r_[np.ones(good.sum()), np.zeros((kind == k).sum())], np.r_[base.scores[good], base.scores[kind == k]])
        for k in kinds]
    print(f"  AUC all {aucs[0]:.2f}; " + ", ".join(f"{k} {a:.2f}" for k, a in zip(kinds, aucs[1:])))
    print(f"  estimated noise-like fraction {base.noise_fraction:.2f} (empty picks {np.mean(kind == 'empty'):.2f})")
    print("  | loss estimate | max_good_loss | estimated loss | good kept | junk removed | " + " | ".join(kinds) + " |")
    for model in (False, True):
        for loss in LOSSES:
            pc = pick_contrast(images, None, loss, particle_model=model)
            flag = pc.noise_like
            print(f"  | {'Storey + particle model' if model else 'Storey'} | {loss} | {pc.estimated_loss:.3f} | "
                  f"{1 - flag[good].mean():.3f} | {flag[~good].mean():.3f} | "
                  + " | ".join(f"{flag[kind == k].mean():.2f}" for k in kinds) + " |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--particles", type=int, default=2000)
    ap.add_argument("--ribosome", default="../shared/data/volumes/clean70SRibosome_vol_65p.mrc")
    ap.add_argument("--config", default="config/config.yaml")
    ap.add_argument("--ml2d-seeds", type=int, nargs="*", default=[], help="also the ML2D fits with and without noise-like picks")
    a = ap.parse_args()
    cfg = load_config(a.config)
    for i, (name, (snr, realistic)) in enumerate(CASES.items()):
        images, kind, dirs = stacks(a.ribosome, a.particles, snr, realistic, cfg)
        for prep, x in images.items():
            print(f"{name}, {a.particles} picks, {prep}:")
            report(x, kind)
        if i == 0 and a.ml2d_seeds:
            fit_without_noise_like(images["whitened"], kind, dirs, a.ml2d_seeds)


if __name__ == "__main__":
    main()

"""How much junk could any selection remove from the default classes, given what each pick carries?

Runs the default pipeline (contrastive stage + refinement + ML2D stage, `config/config.yaml`) on
one realistic stack (the ribosome map, box 64 at 5 Å/px, SNR 0.05, 25 % junk, K=20, uniform
views), then its automatic selection, and prints:

- the automatic selection's junk removed and good particles kept (all junk and per kind);
- what supervised classifiers (gradient boosting, logistic regression) reach on per-pick
  features of the same run when trained on the truth (good against junk; 5-fold
  cross-validation, so every pick is scored by a model that never saw it), cut where they keep
  90 % of the good particles, for several feature sets. They show what the features carry: a
  rule without the truth is not expected to do much better on the same features.

Features: the pick contrast (`image.pickscore`), whether the pick's class is suggested as junk,
its best NCC with a kept class average, with a junk class average and with its own class average
(each over rotations and shifts of +-2 px), the surround z (`em.surround`), and the pick's
particle-band power inside the particle radius and around it (log; the pick contrast is their
difference). The absolute band powers are not used by the selection: they depend on the noise
level of each micrograph, which real stacks do not share.

    python benchmarks/selection_frontier.py [--particles 4000] [--snr 0.05] [--ribosome PATH]
"""
from __future__ import annotations

import argparse
import dataclasses
import time

import numpy as np
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import cross_val_predict

from clcluster.bench.benchmark import prepare
from clcluster.bench.realistic_benchmark import cl_pipeline
from clcluster.core.config import load_config
from clcluster.em.align import PolarCache, align_all
from clcluster.em.averages import aligned_means, alignment_grid, centred_polar, split_halves
from clcluster.image.imageops import BACKGROUND_RADIUS_FRACTION
from clcluster.image.pickscore import shell_powers
from clcluster.sim.realistic import PARTICLE
from clcluster.steps.export import ExportConfig, class_poses, make_averages, select_particles
from clcluster.steps.preprocess import PreprocessConfig
from refinement_start import noisy_realistic_stack

K = 20
GOOD_KEPT = 0.9
FEATURE_SETS = {
    "pick contrast": ["contrast"],
    "pick contrast + surround z": ["contrast", "surround"],
    "pick contrast + classes (junk class, NCC kept / junk / own)": ["contrast", "junk_class", "ncc_kept", "ncc_junk", "ncc_own"],
    "all of the above": ["contrast", "junk_class", "ncc_kept", "ncc_junk", "ncc_own", "surround"],
    "all of the above + band power inside and around": ["contrast", "junk_class", "ncc_kept", "ncc_junk", "ncc_own",
                                                        "surround", "inside", "around"],
}
CLASSIFIERS = {"gradient boosting": lambda seed: HistGradientBoostingClassifier(max_iter=200, random_state=seed),
               "logistic regression": lambda seed: LogisticRegression(max_iter=2000)}


def per_kind(kept: np.ndarray, kinds: np.ndarray) -> str:
    """'junk removed x.xxx, good kept y.yyy (kind removed ...)'."""
    good = kinds == PARTICLE
    kinds_removed = " / ".join(f"{k} {1 - kept[kinds == k].mean():.2f}" for k in np.unique(kinds[~good]))
    return f"junk removed {1 - kept[~good].mean():.3f}, good kept {kept[good].mean():.3f} ({kinds_removed})"


def class_ncc(images, labels: np.ndarray, poses, apix: float) -> np.ndarray:
    """(n, K) each pick's best NCC with each class's aligned mean (rotations, shifts +-2 px)."""
    means = aligned_means(images, labels, K, poses.angle_deg, poses.shift_at(apix))
    cache = PolarCache(images, alignment_grid(images.shape[-1], 128, 2), device="cpu", batch_size=512, max_bytes=1e9)
    refs = centred_polar(means, cache)
    return np.stack([align_all(cache, refs[j:j + 1], None, accumulate=False)[0].score for j in range(K)], axis=1)


def features(images, labels: np.ndarray, poses, quality, apix: float) -> dict:
    """Per-pick features (n,) of the run (module docstring)."""
    selected = quality.table["selected"].to_numpy()
    ncc = class_ncc(images, labels, poses, apix)
    inner, outer = shell_powers(images, BACKGROUND_RADIUS_FRACTION * images.shape[-1])
    return {"contrast": quality.picks.scores, "surround": quality.surround_z,
            "junk_class": (~selected[labels]).astype(float), "ncc_kept": ncc[:, selected].max(axis=1),
            "ncc_junk": ncc[:, ~selected].max(axis=1) if (~selected).any() else np.zeros(len(labels)),
            "ncc_own": ncc[np.arange(len(labels)), labels],
            "inside": np.log(np.maximum(inner @ quality.picks.weights, 1e-30)),
            "around": np.log(np.maximum(outer @ quality.picks.weights, 1e-30))}


def supervised_cut(x: np.ndarray, good: np.ndarray, classifier, seed: int = 0) -> np.ndarray:
    """(n,) kept: out-of-fold probability of being good at or above its 10 % quantile over good picks."""
    x = (x - x.mean(axis=0)) / np.maximum(x.std(axis=0), 1e-12)
    p = cross_val_predict(classifier(seed), x, good, cv=5, method="predict_proba")[:, 1]
    return p >= np.quantile(p[good], 1 - GOOD_KEPT)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--particles", type=int, default=4000)
    ap.add_argument("--snr", type=float, default=0.05)
    ap.add_argument("--ribosome", default="../shared/data/volumes/clean70SRibosome_vol_65p.mrc")
    args = ap.parse_args()
    cfg = load_config("config/config.yaml")
    t0 = time.time()
    noisy, ctf, truth, sc = noisy_realistic_stack(args.ribosome, args.particles, args.snr)
    pp = PreprocessConfig.from_dict(cfg["preprocess"])
    images = prepare(noisy, ctf, sc.apix, pp)
    plain = prepare(noisy, ctf, sc.apix, dataclasses.replace(pp, whiten=False))
    apix = sc.apix * sc.box / pp.box
    kinds = truth["kind"].to_numpy().astype(str)
    good = kinds == PARTICLE
    res, _, _ = cl_pipeline(images, K, cfg, 0, apix)
    ec = ExportConfig.from_dict(cfg["export"])
    assignments = {"angle_deg": res.angle_deg, "shift_px": res.shift_px}
    poses = class_poses(images, res.labels, K, assignments, apix, ec, "cpu", 0)
    averages = make_averages(None, plain, res.labels, K, poses, split_halves(res.labels, 0), ec, "working", apix)
    quality = select_particles(images, res.labels, K, averages, poses, assignments, ec, apix, "cpu", 0)
    print(f"{args.particles} picks, SNR {args.snr}, K={K} ({time.time() - t0:.0f} s)")
    print(f"automatic selection: {per_kind(quality.kept, kinds)}")
    feats = features(images, res.labels, poses, quality, apix)
    for name, cols in FEATURE_SETS.items():
        for cname, classifier in CLASSIFIERS.items():
            kept = supervised_cut(np.column_stack([feats[c] for c in cols]), good, classifier)
            print(f"supervised, {cname}, {name}: {per_kind(kept, kinds)}")


if __name__ == "__main__":
    main()

"""Can the refinement hold a good partition? Each row starts the package's refinement stages
from a given partition of one realistic stack (whitened, as `preprocess.whiten: true` prepares
it) and reports the view coherence of the labels they return.

    python benchmarks/refinement_start.py [--particles 2000] [--snr 0.05] [--ribosome PATH]

Starts: `truth` (K-means on the true viewing directions, junk spread at random: the perfect
partition) and `random` (random labels). Stages: one hard-EM pass and the default refinement
chain (`cluster.refine_chain`, which starts from each class's unaligned, rotationally blurred
mean); the ML2D stage (`ml2d.polish`) started from the true poses, and from poses found by the
export's reference-free in-class alignment (`averages.refine_class_poses` with re-centring,
a 0.4-box mask and +-4 px shifts), after 3 and 10 iterations; the refinement chain started
from that alignment's class means instead of the blurred ones. Also printed: how the junk kinds
spread over the classes after 10 ML2D iterations from the true poses.

    python benchmarks/refinement_start.py --chain-only --starts truth cl

runs only the chain from blurred and from aligned class means; `cl` is the pipeline's own start
(the contrastive embedding's K-means classes, the default config's training).
"""
from __future__ import annotations

import argparse
import dataclasses
import time

import numpy as np

import tempfile
from pathlib import Path

from clcluster.bench.benchmark import embed_stack, prepare
from clcluster.bench.realistic_benchmark import truth_partition
from clcluster.bench.realistic_scores import coherence_references, median_view_angle, view_score
from clcluster.core.config import load_config
from clcluster.em.align import PolarCache, PolarGrid, hard_em
from clcluster.em.averages import aligned_means, centred_polar, recentre, refine_class_poses
from clcluster.image.imageops import circular_mask
from clcluster.em.ml2d import polish
from clcluster.sim.realistic import PARTICLE, RealisticConfig, add_coloured_noise, simulate_realistic_clean
from clcluster.steps.cluster import ClusterConfig, assign, kmeans, refine_chain
from clcluster.steps.preprocess import PreprocessConfig
from clcluster.steps.simulate import SimulationConfig, load_volume

K = 20


def noisy_realistic_stack(ribosome: str, particles: int, snr: float, realistic: dict | None = None):
    """A realistic stack of the ribosome map (box 64 at 5 Å/px; `realistic`: further keys of the
    realistic mode): noisy images (n, 64, 64), their CTFs, the truth table and the SimulationConfig."""
    sc = SimulationConfig(volumes=(ribosome,), apix=5.0, volume_apix=5.0, mode="realistic",
                          realistic={"particles": particles, **(realistic or {})})
    rc = RealisticConfig.from_dict(sc.realistic)
    clean, ctf, truth, _ = simulate_realistic_clean(sc, rc, load_volume(ribosome, sc.box, sc.apix, sc.volume_apix))
    noisy, _ = add_coloured_noise(clean, truth["kind"].to_numpy().astype(str) == PARTICLE, snr, rc, sc.seed)
    return noisy, ctf, truth, sc


def realistic_stack(ribosome: str, particles: int, snr: float, cfg: dict):
    """Whitened preprocessed images (n, 32, 32), truth table and the working-box true poses."""
    noisy, ctf, truth, sc = noisy_realistic_stack(ribosome, particles, snr)
    good = truth["kind"].to_numpy().astype(str) == PARTICLE
    pp = dataclasses.replace(PreprocessConfig.from_dict(cfg["preprocess"]), whiten=True)
    images = prepare(noisy, ctf, sc.apix, pp)
    poses = (truth["psi_deg"].to_numpy(), truth[["shift_x_px", "shift_y_px"]].to_numpy() * pp.box / sc.box)
    return images, truth, good, poses


def aligned_class_means(images, labels: np.ndarray, cache: PolarCache):
    """Polar references (K, R, A) on `cache`'s grid: each class's members aligned to their own
    running average (re-centred, 0.4-box mask, +-4 px, 6 iterations), averaged, re-centred and masked."""
    box = images.shape[-1]
    cp = refine_class_poses(images, labels, K, iterations=6, n_angles=64, max_shift_px=4, centre=True, mask_radius=0.4)
    means, _ = recentre(aligned_means(images, labels, K, cp.angle_deg, cp.shift_px))
    return centred_polar(means * circular_mask(box, 0.4 * box, soft_edge=0.1 * box), cache)


def embedding_start(images, cfg: dict) -> np.ndarray:
    """The pipeline's own start: K-means classes of the contrastive embedding (default training)."""
    with tempfile.TemporaryDirectory() as d:
        feats = embed_stack(images, cfg, 0, Path(d), 10.0)
    feats = feats.astype(np.float32)
    return assign(feats, kmeans(feats, K, 10, 0, 200000), 1)[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--particles", type=int, default=2000)
    ap.add_argument("--snr", type=float, default=0.05)
    ap.add_argument("--ribosome", default="../shared/data/volumes/clean70SRibosome_vol_65p.mrc")
    ap.add_argument("--config", default="config/config.yaml")
    ap.add_argument("--starts", nargs="+", default=["truth", "random"], choices=["truth", "random", "cl"])
    ap.add_argument("--chain-only", action="store_true", help="only the chain from blurred and from aligned class means")
    a = ap.parse_args()
    cfg = load_config(a.config)
    cc = ClusterConfig.from_dict(cfg["cluster"])
    images, truth, good, true_poses = realistic_stack(a.ribosome, a.particles, a.snr, cfg)
    dirs = truth[["dir_x", "dir_y", "dir_z"]].to_numpy()
    coh = coherence_references(dirs[good], K, 0)

    def row(start: str, stage: str, labels: np.ndarray, t0: float) -> None:
        deg = median_view_angle(dirs[good], labels[good])
        print(f"| {start} | {stage} | {deg:.1f} | {view_score(deg, coh):.2f} | {time.time() - t0:.0f} |", flush=True)

    print(f"K-means on the true directions {coh['kmeans_truth_deg']:.1f} deg, random labels {coh['random_deg']:.1f} deg\n")
    print("| start | stage | view median (deg) | view score | seconds |\n|---|---|---|---|---|")
    cache = PolarCache(images, PolarGrid(images.shape[-1], n_angles=cc.refine_angles, max_shift=cc.refine_max_shift_px))
    make = {"truth": lambda: truth_partition(dirs, good, K, 0), "random": lambda: np.random.default_rng(5).integers(0, K, len(images)),
            "cl": lambda: embedding_start(images, cfg)}
    starts = {name: make[name]() for name in a.starts}
    for name, lab0 in starts.items():
        t = time.time()
        row(name, "the start itself", lab0, t)
        if a.chain_only:
            for start, refs0 in (("blurred", None), ("aligned", aligned_class_means(images, lab0, cache))):
                t = time.time()
                res, ml = refine_chain(cache, images, lab0, None, K, cc, 0, 0, every_pass_wide=True, refs0=refs0)
                row(name, f"refinement chain from {start} class means: annealed EM", res.alignment.labels, t)
                row(name, f"refinement chain from {start} class means: then ML2D stage", ml.labels, t)
            continue
        row(name, "one hard-EM pass (blurred class means)", hard_em(cache, lab0, K, None, 1, seed=0).alignment.labels, t)
        t = time.time()
        res, ml = refine_chain(cache, images, lab0, None, K, cc, 0, 0, every_pass_wide=True)
        row(name, "refinement chain: annealed EM", res.alignment.labels, t)
        row(name, "refinement chain: then ML2D stage", ml.labels, t)
        t = time.time()
        cp = refine_class_poses(images, lab0, K, iterations=9, n_angles=64, max_shift_px=4, centre=True, mask_radius=0.4)
        for it in (3, 10):
            row(name, f"in-class alignment, then ML2D {it} iterations",
                polish(images, lab0, cp.angle_deg, cp.shift_px, K, max_iter=it, n_rotations=64, max_shift=3).labels, t)
    if a.chain_only or "truth" not in starts:
        return
    t = time.time()
    lab0 = starts["truth"]
    for it in (1, 10):
        ml = polish(images, lab0, *true_poses, K, max_iter=it, n_rotations=64, max_shift=3)
        row("truth", f"true poses, then ML2D {it} iterations", ml.labels, t)
    kinds = truth["kind"].to_numpy().astype(str)
    junk_classes = np.argsort(-np.bincount(ml.labels[~good], minlength=K))[:2]
    print(f"\nafter 10 ML2D iterations from the true poses the two classes richest in junk hold "
          f"{np.isin(ml.labels[~good], junk_classes).mean():.0%} of the junk and "
          f"{np.isin(ml.labels[good], junk_classes).mean():.0%} of the good particles; per kind: "
          + ", ".join(f"{k} {np.isin(ml.labels[kinds == k], junk_classes).mean():.0%}"
                      for k in np.unique(kinds) if k != PARTICLE))


if __name__ == "__main__":
    main()

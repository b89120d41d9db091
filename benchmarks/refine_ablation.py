"""Single refinements at many classes: which parts of the refinement buy accuracy, at what cost.

    python benchmarks/refine_ablation.py                       # K=50 x 100, builtin:0, SNR 0.05
    python benchmarks/refine_ablation.py --views 20 --images-per-view 50 --snr 0.1

One stack is simulated and prepared as `clcluster benchmark` does it (box 64 → 32, seed 0,
views at least 12° apart), embedded by the pipeline's encoder (config/config.yaml's `train`),
clustered by K-means++; then one refinement (`cluster.refine_chain`) from those K-means classes
per variant below, each a change of `cluster` keys against config/config.yaml (above
`refine_guards_max_k` classes `refine_lean_iterations` sets the annealed EM's passes). Printed
per variant: the keys, the accuracy (Hungarian-matched) of the annealed EM's labels and of the
ML2D stage's, the ML2D iterations run and the refinement's seconds.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import logging
import tempfile
import time
from pathlib import Path

import yaml

from clcluster.em.align import PolarCache, PolarGrid
from clcluster.bench.benchmark import embed_stack, prepare, stack_config
from clcluster.steps.cluster import ClusterConfig, assign, kmeans, refine_chain
from clcluster.core.metrics import hungarian_accuracy
from clcluster.steps.preprocess import PreprocessConfig
from clcluster.steps.simulate import add_noise, simulate_clean

REPO = Path(__file__).resolve().parents[1]

VARIANTS = (
    {"refine_lean_iterations": 25, "refine_ml_wide": 12, "refine_ml_budget": 0},  # ML2D over 15 candidates (da5fe43's stage)
    {"refine_lean_iterations": 25, "refine_ml_budget": 0},  # ML2D over all K, to convergence
    {"refine_ml_budget": 0},  # 15 annealed passes, ML2D over all K to convergence
    {"refine_ml_budget": 300},
    {},  # the default
    {"refine_ml_budget": 450},
)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--views", type=int, default=50)
    p.add_argument("--images-per-view", type=int, default=100)
    p.add_argument("--volume", default="builtin:0", help="builtin:N or ribosome")
    p.add_argument("--snr", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0, help="K-means++ seed (the stack's is 0)")
    p.add_argument("--variants", type=int, nargs="+", help="indices into VARIANTS (default: all)")
    p.add_argument("--config", default=str(REPO / "config" / "config.yaml"))
    p.add_argument("--ribosome", default=str(REPO.parent / "shared" / "data" / "volumes" / "clean70SRibosome_vol_65p.mrc"))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    cfg = yaml.safe_load(Path(args.config).read_text())
    sc = stack_config(args.volume, args.views, args.images_per_view, 64, 0, args.ribosome)
    clean = simulate_clean(sc)
    sim = add_noise(clean, args.snr, 0)
    pp = PreprocessConfig.from_dict(cfg["preprocess"])
    images = prepare(sim.images, sim.ctf, sc.apix, pp)
    truth = clean.truth["class"].to_numpy()
    k = args.views * len(sc.volumes)
    with tempfile.TemporaryDirectory() as d:
        feats = embed_stack(images, copy.deepcopy(cfg), 0, Path(d), sc.apix * sc.box / pp.box)
    base = ClusterConfig.from_dict(cfg["cluster"])
    labels, _, _, near = assign(feats, kmeans(feats, k, base.n_init, args.seed, base.minibatch_above), base.candidates)
    cache = PolarCache(images, PolarGrid(images.shape[-1], n_angles=base.refine_angles, max_shift=base.refine_max_shift_px))
    print(f"{args.volume}, K={k}, {len(truth)} images, SNR {args.snr}; K-means accuracy {hungarian_accuracy(truth, labels):.3f}")
    print("| cluster keys changed | annealed EM accuracy | ML2D stage accuracy | ML2D iterations | seconds |")
    print("|---|---|---|---|---|")
    for i in args.variants if args.variants is not None else range(len(VARIANTS)):
        over = VARIANTS[i]
        t = time.time()
        res, ml = refine_chain(cache, images, labels, near, k, dataclasses.replace(base, **over), seed=args.seed)
        keys = ", ".join(f"{key}: {v}" for key, v in over.items()) or "(default)"
        print(f"| {keys} | {hungarian_accuracy(truth, res.alignment.labels):.3f} | {hungarian_accuracy(truth, ml.labels):.3f} | "
              f"{ml.n_iter} | {time.time() - t:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

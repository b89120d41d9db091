"""Accuracy against the contrastive training budget, on the accuracy benchmark's data.

    python benchmarks/train_budget.py                                   # builtin:0, SNR 0.05, 30-240 steps
    python benchmarks/train_budget.py --volume ribosome --snr 0.02 --steps 60 240

One simulated stack (K=10 views x 200 images, box 64 → 32, seed 0, as `clcluster benchmark`
makes it) is classified by the default pipeline with `train.steps` set to each value (global
batch `train.batch_size`, default 128), everything else from config/config.yaml. Printed per
budget: images seen in training, training + embedding + K-means seconds, the alignment-free
stage's accuracy (encoder + K-means++) and the full classifier's (+ refinement), both
Hungarian-matched against the simulator's truth.
"""
from __future__ import annotations

import argparse
import copy
import logging
import tempfile
import time
from pathlib import Path

import yaml

from clcluster.bench.benchmark import prepare, run_cl, volume_setup
from clcluster.core.metrics import hungarian_accuracy
from clcluster.steps.preprocess import PreprocessConfig
from clcluster.steps.simulate import SimulationConfig, simulate

REPO = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, nargs="+", default=[30, 60, 120, 240])
    p.add_argument("--volume", default="builtin:0", help="builtin:N or ribosome")
    p.add_argument("--snr", type=float, default=0.05)
    p.add_argument("--config", default=str(REPO / "config" / "config.yaml"))
    p.add_argument("--ribosome", default=str(REPO.parent / "shared" / "data" / "volumes" / "clean70SRibosome_vol_65p.mrc"))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    cfg = yaml.safe_load(Path(args.config).read_text())
    sc = SimulationConfig(views=10, images_per_view=200, box=64, seed=0, snr=args.snr, **volume_setup(args.volume, args.ribosome))
    sim = simulate(sc)
    pp = PreprocessConfig.from_dict(cfg["preprocess"])
    images = prepare(sim.images, sim.ctf, sc.apix, pp)
    truth = sim.truth["class"].to_numpy()
    print(f"{args.volume}, SNR {args.snr}, {len(truth)} images, batch {cfg['train']['batch_size']}")
    print("| training steps | images seen | train + embed + K-means s | alignment-free accuracy | full classifier accuracy | total s |")
    print("|---|---|---|---|---|---|")
    for steps in args.steps:
        run_cfg = copy.deepcopy(cfg)
        run_cfg["train"]["steps"] = steps
        t = time.time()
        with tempfile.TemporaryDirectory() as d:
            free, refined, t_free, _ = run_cl(images, 10, run_cfg, 0, Path(d), sc.apix * sc.box / pp.box)
        print(f"| {steps} | {steps * cfg['train']['batch_size']} | {t_free:.0f} | {hungarian_accuracy(truth, free):.3f} | "
              f"{hungarian_accuracy(truth, refined):.3f} | {time.time() - t:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

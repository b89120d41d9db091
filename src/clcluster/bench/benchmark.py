"""Accuracy benchmark on simulated data: every method on the same stacks over an SNR grid.

Methods: CL-Clustering's alignment-free stage (contrastive encoder + K-means++) and the full
default classifier (+ alignment refinement over the m nearest classes), the same refinement
started from random partitions (what the CL start buys), ML2D (Scheres et al. 2005), PCA +
K-means on pixels, rotation-invariant features + spectral clustering, and the oracle (true
clean projections, the ceiling). Scores: Hungarian-matched accuracy, ARI, NMI; wall time; for
CL-Clustering's two rows the seed ARI (`seed_ari`: agreement of the whole method run with a second
master seed, `second_seed_labels`) and, for cl_refined, the cluster step's own seed-stability
ARI (`stability_ari`: cluster.stability_runs on a subset).
"""
from __future__ import annotations

import argparse
import os

from clcluster.core.cli_args import add_config, run_config

import dataclasses
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from clcluster.io.atomic import atomic_path, write_text
from clcluster.core.metrics import scores
from clcluster.core.rng import SEED_ARI, stream_seed

log = logging.getLogger(__name__)

METHODS = ("cl_kmeans", "cl_refined", "refine_random", "ml2d", "pca_kmeans", "invariant", "oracle")


@dataclasses.dataclass
class BenchmarkConfig:
    snrs: tuple = (0.25, 0.1, 0.05, 0.02, 0.01)
    volumes: tuple = ("builtin:0", "ribosome")
    views: int = 10
    images_per_view: int = 200
    box: int = 64
    methods: tuple = METHODS
    seed: int = 0
    ml2d_starts: int = 3
    seed_ari: bool = True  # run CL-Clustering a second time with another master seed (second_seed_labels)


def volume_setup(spec: str, ribosome_path: str | None) -> dict:
    """Simulation settings for a named benchmark volume. The ribosome map (5 Å voxels, ~250 Å
    across) is simulated at 6 Å/px so that it fits a 64 px box."""
    if spec == "ribosome":
        if not ribosome_path:
            raise ValueError("the ribosome volume needs --ribosome PATH (shared/data/volumes/clean70SRibosome_vol_65p.mrc)")
        return {"volumes": (ribosome_path,), "apix": 6.0, "volume_apix": 5.0}
    return {"volumes": (spec,), "apix": 2.5}


def stack_config(spec: str, views: int, images_per_view: int, box: int, seed: int, ribosome_path: str | None):
    """The benchmark's simulation of one volume: views at least 30 degrees apart up to 12 views,
    12 degrees above (more cannot be placed that far apart)."""
    from clcluster.steps.simulate import SimulationConfig

    return SimulationConfig(views=views, images_per_view=images_per_view, box=box, seed=seed,
                            min_separation_deg=30.0 if views <= 12 else 12.0, **volume_setup(spec, ribosome_path))


def prepare(images, ctf, apix, pp_cfg, spectrum=None):
    """The pipeline's preprocessing of a stack (n, D, D) at apix Å/px, as `preprocess_table`
    does it: with pp_cfg.whiten, the radial noise spectrum of the evenly spaced particles
    `spectrum_rows(n)` (unmasked; pp_cfg.whiten_estimate), or `spectrum` ((box//2+1,) per
    working-box shell) where given, then `whiten_batch` (whitening, background normalisation,
    the mask). -> (n, box, box) float32."""
    from clcluster.steps.preprocess import estimate_noise_spectrum, preprocess_batch, spectrum_rows, whiten_batch

    x = np.concatenate([preprocess_batch(images[s:s + 512], ctf.subset(np.arange(s, min(len(images), s + 512))), apix, pp_cfg,
                                         mask=not pp_cfg.whiten)
                        for s in range(0, len(images), 512)]).astype(np.float32)
    if pp_cfg.whiten:
        work_apix = apix * images.shape[-1] / pp_cfg.box
        if spectrum is None:
            spectrum = estimate_noise_spectrum(x[spectrum_rows(len(x))], pp_cfg, work_apix)
        x = whiten_batch(x, spectrum, pp_cfg, work_apix).astype(np.float32)
    return x


def embed_stack(images, run_cfg: dict, seed: int, workdir: Path, apix: float) -> np.ndarray:
    """The pipeline's train → embed on preprocessed images (n, D, D) (stored as float16, as the
    shards are): L2-normalised features (n, d)."""
    from clcluster.steps.embed import embed_images
    from clcluster.learn.models import load_encoder
    from clcluster.steps.train import TrainConfig, train

    np.save(workdir / "shard.npy", images.astype(np.float16))
    train([workdir / "shard.npy"], workdir / "encoder.pt", TrainConfig.from_dict(run_cfg["train"]), seed=seed, device="cpu", apix=apix)
    enc, _ = load_encoder(workdir / "encoder.pt")
    return embed_images(enc, images.astype(np.float16).astype(np.float32), run_cfg.get("embed", {}).get("batch_size", 128))


def cl_run(images, k, run_cfg: dict, seed: int, workdir: Path, apix: float):
    """The pipeline's own train → embed → cluster on preprocessed images (n, D, D); returns
    (the cluster step's Clustering, seconds of the alignment-free stage, total seconds)."""
    from clcluster.steps.cluster import ClusterConfig, cluster

    t0 = time.time()
    feats = embed_stack(images, run_cfg, seed, workdir, apix)
    t_embed = time.time() - t0
    # one clustering, as the pipeline runs it: its K-means labels are the alignment-free stage's
    res = cluster(feats, k, ClusterConfig.from_dict(run_cfg["cluster"]), seed=seed, images=images, device="cpu")
    return res, t_embed + res.timings["kmeans_s"], time.time() - t0


def run_cl(images, k, run_cfg: dict, seed: int, workdir: Path, apix: float):
    """`cl_run` as (alignment-free labels, refined labels, seconds of the alignment-free stage, total seconds)."""
    res, t_free, t_all = cl_run(images, k, run_cfg, seed, workdir, apix)
    return res.kmeans_labels, res.labels, t_free, t_all


def second_seed_labels(images, k, run_cfg: dict, seed: int, apix: float):
    """CL-Clustering's train → embed → cluster once more with the master seed
    stream_seed([seed, SEED_ARI]) (training, K-means and refinement all draw from it; the
    cluster step's stability runs off: they do not change labels) -> (alignment-free labels,
    refined labels), to compare with the first run's (the seed ARI)."""
    cfg2 = {**run_cfg, "cluster": {**run_cfg["cluster"], "stability_runs": 0}}
    with tempfile.TemporaryDirectory() as d:
        res, _, t = cl_run(images, k, cfg2, stream_seed([seed, SEED_ARI]), Path(d), apix)
    log.info("  second seed of the CL pipeline: %.1f s", t)
    return res.kmeans_labels, res.labels


def refine_from_random(images, k, run_cfg: dict, seed: int):
    """The same refinement (`cluster.refine_chain`: annealed EM, split-and-merge, ML2D stage)
    from random partitions, all K classes compared in every pass (no embedding), the restart
    with the highest final log-likelihood kept, as the default keeps its restarts; one start
    and no split-and-merge above `cluster.refine_guards_max_k` classes, as the default."""
    from clcluster.em.align import PolarCache, PolarGrid
    from clcluster.em.restarts import best_restart, random_partition
    from clcluster.steps.cluster import ClusterConfig, chain_objective, refine_chain, refine_restarts

    cc = ClusterConfig.from_dict(run_cfg["cluster"])
    cache = PolarCache(images, PolarGrid(images.shape[-1], n_angles=cc.refine_angles, max_shift=cc.refine_max_shift_px))
    res, ml = best_restart(lambda r: refine_chain(cache, images, random_partition(seed, r, k, len(images)), None, k, cc,
                                                  seed, r),
                           refine_restarts(k, cc), lambda chain: chain_objective(*chain))
    return ml.labels if ml is not None else res.alignment.labels


def run_dataset(images, truth, refs, k, methods, run_cfg, seed, apix, ml2d_starts=3, seed_ari: bool = True) -> list[dict]:
    """Every method on one preprocessed stack; one result row per method (with seed_ari, the CL
    rows also get `seed_ari` against a run with a second master seed, `second_seed_labels`)."""
    from sklearn.metrics import adjusted_rand_score

    from clcluster.bench.baselines import invariant_kmeans, oracle_labels, pca_kmeans
    from clcluster.em.ml2d import ml2d

    rows = []

    def record(name, labels, seconds, **extra):
        r = {"method": name, "seconds": round(seconds, 2), **{k2: round(v, 4) for k2, v in scores(truth, labels).items()},
             **{k2: round(float(v), 4) for k2, v in extra.items() if v is not None}}
        log.info("  %-14s accuracy %.3f  ARI %.3f  NMI %.3f  %.1f s%s", name, r["accuracy"], r["ari"], r["nmi"], seconds,
                 f"  seed ARI {r['seed_ari']:.3f}" if "seed_ari" in r else "")
        rows.append(r)

    if "cl_kmeans" in methods or "cl_refined" in methods:
        with tempfile.TemporaryDirectory() as d:
            res, t_free, t_all = cl_run(images, k, run_cfg, seed, Path(d), apix)
        free2, refined2 = second_seed_labels(images, k, run_cfg, seed, apix) if seed_ari else (None, None)
        if "cl_kmeans" in methods:
            record("cl_kmeans", res.kmeans_labels, t_free,
                   seed_ari=None if free2 is None else adjusted_rand_score(res.kmeans_labels, free2))
        if "cl_refined" in methods:
            record("cl_refined", res.labels, t_all, stability_ari=res.seed_ari,
                   seed_ari=None if refined2 is None else adjusted_rand_score(res.labels, refined2))
    timed = {
        "refine_random": lambda: refine_from_random(images, k, run_cfg, seed),
        "ml2d": lambda: ml2d(images, k, n_starts=ml2d_starts, seed=seed).labels,
        "pca_kmeans": lambda: pca_kmeans(images, k, seed=seed),
        "invariant": lambda: invariant_kmeans(images, k, seed=seed),
        "oracle": lambda: oracle_labels(images, refs),
    }
    for name, fn in timed.items():
        if name in methods:
            t = time.time()
            record(name, fn(), time.time() - t)
    return rows


def run_benchmark(bc: BenchmarkConfig, run_cfg: dict, out_dir, ribosome_path: str | None = None) -> pd.DataFrame:
    """Simulate each volume once (clean), add noise per SNR, run every method; write
    results.csv, results.md and accuracy_vs_snr.png into out_dir."""
    from clcluster.image.imageops import fourier_crop, normalise_background
    from clcluster.steps.preprocess import PreprocessConfig
    from clcluster.steps.simulate import add_noise, simulate_clean

    out_dir = Path(out_dir)
    pp = PreprocessConfig.from_dict(run_cfg["preprocess"])
    rows = []
    for vol in bc.volumes:
        sc = stack_config(vol, bc.views, bc.images_per_view, bc.box, bc.seed, ribosome_path)
        clean = simulate_clean(sc)
        refs = normalise_background(fourier_crop(clean.projections, pp.box), pp.bg_radius())
        truth = clean.truth["class"].to_numpy()
        for snr in bc.snrs:
            log.info("volume %s, SNR %g: %d images, K=%d", vol, snr, len(truth), len(refs))
            sim = add_noise(clean, snr, bc.seed)
            images = prepare(sim.images, sim.ctf, sc.apix, pp)
            apix = sc.apix * sc.box / pp.box
            for r in run_dataset(images, truth, refs, len(refs), bc.methods, run_cfg, bc.seed, apix, bc.ml2d_starts,
                                 bc.seed_ari):
                rows.append({"volume": vol, "snr": snr, "k": len(refs), "n": len(truth), **r})
            write_results(pd.DataFrame(rows), out_dir)  # partial results survive an interruption
    df = pd.DataFrame(rows)
    write_results(df, out_dir)
    return df


def write_results(df: pd.DataFrame, out_dir: Path, markdown=None, with_plot: bool = True) -> None:
    """results.csv, results.md (tables by `markdown`, default the grid's) and, with_plot, the
    accuracy-vs-SNR plot into out_dir; each file written atomically."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_dir / "results.csv") as tmp:
        df.to_csv(tmp, index=False)
    write_text(out_dir / "results.md", (markdown or markdown_tables)(df))
    if with_plot:
        plot(df, out_dir / "accuracy_vs_snr.png")


def markdown_tables(df: pd.DataFrame) -> str:
    """Accuracy per method (rows) and SNR (columns) for each volume and K, plus mean and time."""
    parts = []
    for (vol, k), g in df.groupby(["volume", "k"], sort=False):
        acc = g.pivot_table(index="method", columns="snr", values="accuracy", sort=False)
        acc = acc[sorted(acc.columns, reverse=True)]
        acc["mean"] = acc.mean(axis=1)
        acc["seconds (mean)"] = g.groupby("method", sort=False)["seconds"].mean()
        header = "| method | " + " | ".join(f"SNR {c}" if not isinstance(c, str) else c for c in acc.columns) + " |"
        lines = [f"### {vol}, K={k}, {int(g['n'].iloc[0])} images (accuracy, Hungarian-matched)", "", header,
                 "|" + "---|" * (len(acc.columns) + 1)]
        for m, r in acc.iterrows():
            lines.append(f"| {m} | " + " | ".join(f"{v:.3f}" if c != "seconds (mean)" else f"{v:.1f}" for c, v in r.items()) + " |")
        parts.append("\n".join(lines))
        if "seed_ari" in g and g["seed_ari"].notna().any():
            parts.append(seed_ari_table(g))
    return "\n\n".join(parts) + "\n"


def seed_ari_table(g: pd.DataFrame) -> str:
    """The seed ARI (and the cluster step's subset stability ARI) of the methods that have one,
    per SNR, for one volume and K."""
    cols = [c for c in ("seed_ari", "stability_ari") if c in g]
    snrs = sorted(g["snr"].unique(), reverse=True)
    lines = ["seed ARI: agreement with a run from a second master seed (whole method); stability ARI: the cluster "
             "step's own runs with other seeds on a subset (cluster.stability_runs)", "",
             "| method | score | " + " | ".join(f"SNR {s}" for s in snrs) + " |", "|" + "---|" * (len(snrs) + 2)]
    for m, gm in g[g["seed_ari"].notna()].groupby("method", sort=False):
        for c in cols:
            v = gm.set_index("snr")[c]
            if v.notna().any():
                lines.append(f"| {m} | {c} | " + " | ".join(f"{v.get(s, float('nan')):.3f}" for s in snrs) + " |")
    return "\n".join(lines)


def plot(df: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(df.groupby(["volume", "k"], sort=False))
    fig, axes = plt.subplots(1, len(groups), figsize=(5.5 * len(groups), 4), squeeze=False)
    for ax, ((vol, k), g) in zip(axes[0], groups):
        for m, gm in g.groupby("method", sort=False):
            gm = gm.sort_values("snr")
            ax.plot(gm["snr"], gm["accuracy"], marker="o", label=m, lw=2 if m.startswith("cl_") else 1)
        ax.set_xscale("log")
        ax.set_xlabel("SNR")
        ax.set_ylabel("accuracy (Hungarian)")
        ax.set_ylim(0, 1.02)
        ax.set_title(f"{vol}, K={k}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)


# --- command line: `clcluster benchmark` ---------------------------------------------------------
def add_args(p: argparse.ArgumentParser) -> None:
    from clcluster.steps.simulate import add_realistic_options

    p.add_argument("--out-dir", required=True)
    p.add_argument("--snrs", type=float, nargs="+", help="default: 0.25 0.1 0.05 0.02 0.01 (grid), 0.05 (realistic)")
    p.add_argument("--volumes", nargs="+", help="builtin:N or 'ribosome' (default: both (grid), ribosome (realistic))")
    p.add_argument("--views", type=int, default=10, help="K views per volume")
    p.add_argument("--images-per-view", type=int, default=200)
    p.add_argument("--methods", nargs="+", help="subset of the methods (default: all)")
    p.add_argument("--ml2d-starts", type=int, help="ML2D random starts, best log-likelihood kept (default: 3 grid, 1 realistic)")
    p.add_argument("--ribosome", default=os.environ.get("CLCLUSTER_RIBOSOME_MAP"),
                   help="MRC map of the 70S ribosome for the 'ribosome' volume (default: $CLCLUSTER_RIBOSOME_MAP)")
    p.add_argument("--mode", choices=["grid", "realistic"], default="grid",
                   help="grid: K discrete views per volume, accuracy; realistic: one stack with continuous views, junk "
                        "and coloured noise (config simulate.realistic), scored by view coherence, junk selection "
                        "and class-average fidelity (docs/realistic.md)")
    p.add_argument("--classes", type=int, default=20, help="realistic mode: K classes")
    p.add_argument("--no-seed-ari", dest="seed_ari", action="store_false",
                   help="skip the second run of CL-Clustering with another master seed (the seed_ari column): "
                        "saves the time of one more train -> embed -> cluster per stack")
    add_realistic_options(p)
    add_config(p)


def main(args: argparse.Namespace) -> int:
    """Runs the grid (or, with --mode realistic, the realistic benchmark); prints its tables."""
    cfg = run_config(args)
    if args.mode == "realistic":
        from clcluster.bench.realistic_benchmark import main_realistic

        return main_realistic(args, cfg)
    bc = BenchmarkConfig(snrs=tuple(args.snrs or (0.25, 0.1, 0.05, 0.02, 0.01)),
                         volumes=tuple(args.volumes or ("builtin:0", "ribosome")), views=args.views,
                         images_per_view=args.images_per_view, methods=tuple(args.methods or METHODS), seed=cfg["seed"],
                         ml2d_starts=3 if args.ml2d_starts is None else args.ml2d_starts, seed_ari=args.seed_ari)
    print(markdown_tables(run_benchmark(bc, cfg, args.out_dir, args.ribosome)))
    return 0

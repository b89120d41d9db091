"""`clcluster` command line: one subcommand per pipeline step (the Snakemake rules call these).

Every step reads the run's YAML config (`--config`, same schema as config/config.yaml; defaults
filled in) and takes its inputs and outputs as arguments. Units: Å, degrees, pixels.
"""
from __future__ import annotations

import argparse
import errno
import json
import logging
import sys
from pathlib import Path

import numpy as np

log = logging.getLogger("clcluster")


def _config(args) -> dict:
    from clcluster.core.config import load_config, with_defaults

    cfg = load_config(args.config) if getattr(args, "config", None) else with_defaults({})
    return cfg


def _add_config(p):
    p.add_argument("--config", metavar="YAML", help="run configuration (config/config.yaml schema); defaults fill the rest")


def _read(path, root=None):
    from clcluster.io import read_particles

    return read_particles(path, root=root or None)


def _add_device(p, help=None):
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], help=help or "auto: the GPU where present (default: config device)")


# ---------------------------------------------------------------------------------------------
def cmd_simulate(args) -> int:
    from clcluster.steps.simulate import SimulationConfig, simulate, write_simulation

    cfg = _config(args)
    sim_cfg = dict(cfg["simulate"])
    for key in ("views", "images_per_view", "snr", "box", "apix", "max_shift_px"):
        if getattr(args, key) is not None:
            sim_cfg[key] = getattr(args, key)
    if args.volume:
        sim_cfg["volumes"] = args.volume
    sim_cfg["seed"] = cfg["seed"] if args.seed is None else args.seed
    if args.mode:
        sim_cfg["mode"] = args.mode
    sim_cfg["realistic"] = _realistic_overrides(dict(sim_cfg.get("realistic") or {}), args)
    sc = SimulationConfig.from_dict(sim_cfg)
    if sc.mode == "realistic":
        log.info("simulating a realistic stack of %d picks (%.0f %% junk, %s views), box %d px at %.2f Å/px, SNR %g",
                 sc.realistic["particles"], 100 * sc.realistic["junk_fraction"], sc.realistic["orientations"],
                 sc.box, sc.apix, sc.snr)
        star = write_simulation(simulate(sc), sc, args.out_dir, args.name)
        print(star)
        return 0
    log.info("simulating %d volume(s) x %d views x %d images, box %d px at %.2f Å/px, SNR %g",
             len(sc.volumes), sc.views, sc.images_per_view, sc.box, sc.apix, sc.snr)
    star = write_simulation(simulate(sc), sc, args.out_dir, args.name)
    print(star)
    return 0


def _realistic_overrides(rc: dict, args) -> dict:
    """simulate.realistic settings with the command line's realistic-mode options applied."""
    for key in ("particles", "junk_fraction", "orientations", "max_offset_fraction"):
        if getattr(args, key, None) is not None:
            rc[key] = getattr(args, key)
    return rc


def _add_realistic_options(s) -> None:
    s.add_argument("--particles", type=int, help="realistic mode: picks in the stack (particles and junk)")
    s.add_argument("--junk-fraction", type=float, help="realistic mode: fraction of junk picks (0-0.4 typical)")
    s.add_argument("--orientations", choices=["uniform", "preferred"], help="realistic mode: view distribution")
    s.add_argument("--max-offset-fraction", type=float, help="realistic mode: pick offset radius, fraction of the box")


def cmd_check(args) -> int:
    from clcluster.steps import check

    return check.main(args)


def cmd_shard(args) -> int:
    from clcluster.steps.shards import write_shards

    table = _read(args.particles, args.root)
    paths = write_shards(table, args.size, args.out_dir)
    log.info("%d particles in %d shards of at most %d", len(table), len(paths), args.size)
    return 0


def cmd_preprocess(args) -> int:
    from clcluster.io.star import read_star
    from clcluster.steps.preprocess import PreprocessConfig, preprocess_table

    cfg = _config(args)
    pc = PreprocessConfig.from_dict(cfg["preprocess"])
    if args.box:
        pc.box = args.box
    meta = preprocess_table(read_star(args.shard), args.out, pc, args.device or cfg["device"])
    log.info("wrote %s: %d particles, box %d px, %.3f Å/px", args.out, meta["particles"], meta["box"], meta["apix_A"])
    return 0


def cmd_train(args) -> int:
    from clcluster.steps.train import TrainConfig, train

    cfg = _config(args)
    tc = TrainConfig.from_dict(cfg["train"])
    if args.steps is not None:
        tc.steps = args.steps
    from clcluster.core import distributed

    rank, _ = distributed.init_from_env()
    if rank != 0:  # rank 0 alone logs progress; the others only warnings and errors
        logging.getLogger().setLevel(logging.WARNING)
    try:
        apix = None
        meta = Path(args.shards[0]).with_suffix(".json")
        if meta.exists():
            apix = json.loads(meta.read_text())["apix_A"]
        out = train(args.shards, args.out, tc, seed=cfg["seed"], device=args.device or cfg["device"], apix=apix)
    finally:
        distributed.shutdown()
    log.info("trained %d steps, final loss %.4f, %.1f images/s", out["steps"], out["final_loss"], out["images_per_s"])
    return 0


def cmd_embed(args) -> int:
    from clcluster.steps.embed import embed_shard

    cfg = _config(args)
    n = embed_shard(args.encoder, args.shard, args.out, cfg["embed"]["batch_size"], args.device or cfg["device"],
                    threads=args.threads)
    log.info("embedded %d particles into %s", n, args.out)
    return 0


def cmd_cluster(args) -> int:
    from clcluster.steps.cluster import ClusterConfig, cluster, merge_embeddings
    from clcluster.learn.data import ShardSet
    from clcluster.steps.export import check_complete
    from clcluster.io.atomic import atomic_path, save_npy
    from clcluster.io.star import read_star
    from clcluster.steps.shards import ROW_COLUMN

    cfg = _config(args)
    k = args.classes or cfg["classes"]
    if not (len(args.embeddings) == len(args.shard_stars) == len(args.preprocessed)):
        raise ValueError("give one embedding, one shard STAR and one preprocessed stack per shard, in the same order")
    rows = np.concatenate([read_star(s).particles[ROW_COLUMN].to_numpy() for s in args.shard_stars])
    n_input = int(rows.max()) + 1 if len(rows) else 0
    check_complete(n_input, rows, "shards")
    feats = merge_embeddings(args.embeddings)
    if len(feats) != len(rows):
        raise ValueError(f"{len(feats)} embeddings for {len(rows)} particles in the shards")
    images = ShardSet(args.preprocessed)
    res = cluster(feats, k, ClusterConfig.from_dict(cfg["cluster"]), seed=cfg["seed"], images=images,
                  device=args.device or cfg["device"])
    order = np.argsort(rows)  # back to input order
    arrays = {key: v[order] for key, v in res.arrays().items() if v.shape[0] == len(rows)}
    arrays["centroids"] = res.centroids
    out = Path(args.out_dir)
    save_npy(out / "labels.npy", arrays["labels"].astype(np.int32))
    with atomic_path(out / "assignments.npz") as tmp:
        np.savez(tmp, **arrays, objective=np.float64(res.objective if res.objective is not None else np.nan))
    log.info("clustered %d particles into %d classes (sizes %s)", len(rows), k, np.bincount(arrays["labels"], minlength=k).tolist())
    return 0


def cmd_export(args) -> int:
    from clcluster.learn.data import ShardSet
    from clcluster.steps.export import ExportConfig, export

    cfg = _config(args)
    ecfg = dict(cfg["export"])
    if args.select:
        ecfg["select"] = [int(c) for c in args.select.replace(",", " ").split()]
    if args.average_box:
        ecfg["average_box"] = args.average_box
    table = _read(args.particles, args.root or cfg.get("project_root"))
    a = dict(np.load(args.assignments))
    images = ShardSet(args.preprocessed)
    meta = json.loads(Path(args.preprocessed[0]).with_suffix(".json").read_text())
    feats = np.concatenate([np.load(e, mmap_mode="r") for e in args.embeddings]) if args.embeddings else None
    device = args.device or cfg["device"]
    from clcluster.core.backend import select_device

    export(table, a, images, meta, args.classes or cfg["classes"], args.out_dir, ExportConfig.from_dict(ecfg),
           embeddings=feats, device=str(select_device(device)), seed=cfg["seed"])
    return 0


def cmd_score(args) -> int:
    import pandas as pd

    from clcluster.core.metrics import scores

    truth = pd.read_csv(args.truth)["class"].to_numpy()
    a = np.load(args.assignments)
    result = {"particles": int(len(truth))}
    result.update({f"{k}": round(v, 4) for k, v in scores(truth, a["labels"]).items()})
    result.update({f"kmeans_{k}": round(v, 4) for k, v in scores(truth, a["kmeans_labels"]).items()})
    text = json.dumps(result, indent=2)
    print(f"clustering accuracy (Hungarian-matched) against the simulator's truth: {result['accuracy']:.3f} "
          f"(alignment-free stage alone: {result['kmeans_accuracy']:.3f}); ARI {result['ari']:.3f}, NMI {result['nmi']:.3f}")
    if args.out:
        from clcluster.io.atomic import write_text

        write_text(args.out, text)
    return 0


def cmd_benchmark(args) -> int:
    from clcluster.bench.benchmark import METHODS, BenchmarkConfig, run_benchmark

    cfg = _config(args)
    if args.mode == "realistic":
        return realistic_benchmark(args, cfg)
    args.snrs = args.snrs or [0.25, 0.1, 0.05, 0.02, 0.01]
    args.volumes = args.volumes or ["builtin:0", "ribosome"]
    args.ml2d_starts = 3 if args.ml2d_starts is None else args.ml2d_starts
    bc = BenchmarkConfig(snrs=tuple(args.snrs), volumes=tuple(args.volumes), views=args.views,
                         images_per_view=args.images_per_view, methods=tuple(args.methods or METHODS), seed=cfg["seed"],
                         ml2d_starts=args.ml2d_starts)
    ribosome = args.ribosome
    if ribosome is None:
        guess = Path(__file__).resolve().parents[3] / "shared/data/volumes/clean70SRibosome_vol_65p.mrc"
        ribosome = str(guess) if guess.exists() else None
    df = run_benchmark(bc, cfg, args.out_dir, ribosome)
    from clcluster.bench.benchmark import markdown_tables

    print(markdown_tables(df))
    return 0


def realistic_benchmark(args, cfg: dict) -> int:
    """`benchmark --mode realistic`: one realistic stack of the ribosome (or --volumes' first
    entry), every method scored by view coherence, selection and fidelity."""
    from clcluster.bench.realistic_benchmark import (REALISTIC_METHODS, RealisticBenchmarkConfig, realistic_markdown,
                                      run_realistic_benchmark)
    from clcluster.steps.simulate import SimulationConfig

    vol = args.volumes[0] if args.volumes and args.volumes[0] != "ribosome" else (args.ribosome or _ribosome_guess())
    if vol is None:
        raise ValueError("the realistic benchmark needs --ribosome PATH or --volumes builtin:N")
    sim = dict(cfg["simulate"], volumes=[vol], seed=cfg["seed"], mode="realistic",
               realistic=_realistic_overrides(dict(cfg["simulate"].get("realistic") or {}), args))
    if not vol.startswith("builtin:"):
        sim.update(apix=5.0, volume_apix=5.0)  # the ribosome map: 5 Å voxels, ~250 Å across a 64 px box
    bc = RealisticBenchmarkConfig(snrs=tuple(args.snrs or [0.05]), classes=args.classes, seed=cfg["seed"],
                                  methods=tuple(args.methods or REALISTIC_METHODS),
                                  ml2d_starts=1 if args.ml2d_starts is None else args.ml2d_starts)
    df = run_realistic_benchmark(bc, cfg, args.out_dir, SimulationConfig.from_dict(sim))
    print(realistic_markdown(df))
    return 0


def _ribosome_guess():
    guess = Path(__file__).resolve().parents[3] / "shared/data/volumes/clean70SRibosome_vol_65p.mrc"
    return str(guess) if guess.exists() else None


# ---------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="clcluster", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True, metavar="STEP")

    s = sub.add_parser("simulate", help="simulate a particle stack with known classes (demo and benchmarks)",
                       description="Project volumes along K well-separated views, random in-plane rotation in [0, 360) degrees "
                                   "and shift, per-image CTF, white noise at a given SNR. Writes NAME.star (RELION 3.1), "
                                   "Stacks/NAME_NNN.mrcs and NAME_truth.csv (never read by the clustering).")
    s.add_argument("--out-dir", required=True, help="output folder")
    s.add_argument("--name", default="particles", help="file name stem (default: particles)")
    s.add_argument("--views", type=int, help="viewing directions K per volume")
    s.add_argument("--images-per-view", type=int, help="images per view")
    s.add_argument("--snr", type=float, help="signal-to-noise ratio: var(clean CTF image) / var(noise), per image")
    s.add_argument("--box", type=int, help="box size (pixels)")
    s.add_argument("--apix", type=float, help="pixel size (Å/px)")
    s.add_argument("--max-shift-px", type=float, help="random shift uniform in [-max, max] pixels per axis")
    s.add_argument("--volume", action="append", help="builtin:N or an MRC map (repeat for several)")
    s.add_argument("--seed", type=int, help="random seed (default: config seed)")
    s.add_argument("--mode", choices=["grid", "realistic"], help="grid: discrete views, white noise; realistic: "
                   "continuous views, junk, coloured noise, off-centre picks (default: config simulate.mode)")
    _add_realistic_options(s)
    _add_config(s)
    s.set_defaults(func=cmd_simulate)

    s = sub.add_parser("check", help="validate particles and stacks before any work",
                       description="Check a STAR/.cs particle file and its stacks: missing/corrupt stacks, indices out of "
                                   "range, box/pixel-size mismatches, missing CTF columns, NaN pixels, duplicates. "
                                   "Prints every problem; exit code 1 if any (unless they are excluded explicitly).")
    from clcluster.steps import check as _check

    _check.add_args(s)
    s.set_defaults(func=cmd_check)

    s = sub.add_parser("shard", help="split the particles into STAR shards (no pixel copy)")
    s.add_argument("particles", help="RELION STAR (3.0 or 3.1+) or cryoSPARC .cs")
    s.add_argument("--size", type=int, required=True, help="particles per shard")
    s.add_argument("--out-dir", required=True, help="folder for shard_{i}.star")
    s.add_argument("--root", help="project root that relative stack paths are resolved against first")
    s.set_defaults(func=cmd_shard)

    s = sub.add_parser("preprocess", help="CTF-correct, Fourier-crop and normalise one shard",
                       description="CTF phase flip (or Wiener filter), Fourier crop to the working box (pixel size grows "
                                   "by input box / working box), background normalisation (mean 0, std 1 outside a "
                                   "radius in pixels) → float16 .npy + .json sidecar.")
    s.add_argument("shard", help="shard STAR file")
    s.add_argument("--out", required=True, help="output .npy (n, box, box) float16")
    s.add_argument("--box", type=int, help="working box in pixels (default: config preprocess.box)")
    _add_device(s, "auto: CuPy on a GPU if present, else NumPy")
    _add_config(s)
    s.set_defaults(func=cmd_preprocess)

    s = sub.add_parser("train", help="train the contrastive encoder on all preprocessed shards",
                       description="SimCLR NT-Xent on two augmented views of each image for a fixed number of steps; "
                                   "checkpoints on a timer and on SIGTERM/SIGUSR1 and resumes from it. Multi-rank when "
                                   "launched by torchrun or srun.")
    s.add_argument("--shards", nargs="+", required=True, help="preprocessed .npy shards")
    s.add_argument("--out", required=True, help="encoder file (.pt); loss curve written beside it")
    s.add_argument("--steps", type=int, help="optimiser steps (default: config train.steps)")
    _add_device(s)
    _add_config(s)
    s.set_defaults(func=cmd_train)

    s = sub.add_parser("embed", help="embed one preprocessed shard with the trained encoder")
    s.add_argument("--encoder", required=True, help="encoder .pt from train")
    s.add_argument("--shard", required=True, help="preprocessed .npy shard")
    s.add_argument("--out", required=True, help="output .npy (n, feature_dim) float32, L2-normalised")
    s.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0 = all this process may use)")
    _add_device(s)
    _add_config(s)
    s.set_defaults(func=cmd_embed)

    s = sub.add_parser("cluster", help="merge embeddings, K-means++, alignment refinement",
                       description="K-means++ on the merged embeddings, then (cluster.refine) an annealed EM refinement by "
                                   "in-plane alignment (rotations over 360 degrees, shifts in pixels of the working box) "
                                   "against the m nearest classes of each particle. Writes labels.npy and assignments.npz.")
    s.add_argument("--embeddings", nargs="+", required=True, help="per-shard embeddings, shard order")
    s.add_argument("--shard-stars", nargs="+", required=True, help="shard STAR files, same order")
    s.add_argument("--preprocessed", nargs="+", required=True, help="preprocessed shards, same order")
    s.add_argument("--classes", type=int, help="number of classes K (default: config classes)")
    s.add_argument("--out-dir", required=True)
    _add_device(s)
    _add_config(s)
    s.set_defaults(func=cmd_cluster)

    s = sub.add_parser("export", help="classified and selected STARs, aligned CTF-aware class averages, class quality, .cs, pictures")
    s.add_argument("particles", help="the input particle file (all its columns are kept)")
    s.add_argument("--assignments", required=True, help="assignments.npz from cluster")
    s.add_argument("--preprocessed", nargs="+", required=True, help="preprocessed shards, shard order")
    s.add_argument("--classes", type=int)
    s.add_argument("--out-dir", required=True)
    s.add_argument("--root", help="project root for relative stack paths")
    s.add_argument("--embeddings", nargs="+", help="embeddings/shard_{i}.npy in input order (for the t-SNE map)")
    s.add_argument("--select", help="classes to keep in particles_selected.star, e.g. '3,7' (default: config "
                                    "export.select, else the automatic good/junk suggestion)")
    s.add_argument("--average-box", choices=["input", "working"],
                   help="average the original images at the input box (CTF-aware) or the preprocessed ones")
    _add_device(s)
    _add_config(s)
    s.set_defaults(func=cmd_export)

    s = sub.add_parser("benchmark", help="accuracy of every method over an SNR grid on simulated data",
                       description="Simulate K views x N images per volume (box 64), add noise at each SNR, run "
                                   "CL-Clustering (alignment-free stage and full), the refinement from random starts, "
                                   "ML2D, PCA + K-means, invariant features + spectral clustering and the oracle on the "
                                   "same stacks; write results.csv, results.md and accuracy_vs_snr.png. The CL methods "
                                   "use the config's preprocess/train/cluster settings, i.e. the pipeline's defaults.")
    s.add_argument("--out-dir", required=True)
    s.add_argument("--snrs", type=float, nargs="+", help="default: 0.25 0.1 0.05 0.02 0.01 (grid), 0.05 (realistic)")
    s.add_argument("--volumes", nargs="+", help="builtin:N or 'ribosome' (default: both (grid), ribosome (realistic))")
    s.add_argument("--views", type=int, default=10, help="K views per volume")
    s.add_argument("--images-per-view", type=int, default=200)
    s.add_argument("--methods", nargs="+", help="subset of the methods (default: all)")
    s.add_argument("--ml2d-starts", type=int, help="ML2D random starts, best log-likelihood kept (default: 3 grid, 1 realistic)")
    s.add_argument("--ribosome", help="ribosome map (default: shared/data/volumes beside the repository)")
    s.add_argument("--mode", choices=["grid", "realistic"], default="grid",
                   help="grid: K discrete views per volume, accuracy; realistic: one stack with continuous views, junk "
                        "and coloured noise (config simulate.realistic), scored by view coherence, junk selection "
                        "and class-average fidelity (docs/realistic.md)")
    s.add_argument("--classes", type=int, default=20, help="realistic mode: K classes")
    _add_realistic_options(s)
    _add_config(s)
    s.set_defaults(func=cmd_benchmark)

    s = sub.add_parser("score", help="accuracy, ARI and NMI of a clustering against simulated truth")
    s.add_argument("--assignments", required=True)
    s.add_argument("--truth", required=True, help="NAME_truth.csv from simulate")
    s.add_argument("--out", help="write the scores as JSON")
    s.set_defaults(func=cmd_score)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from clcluster.steps.export import IntegrityError
    from clcluster.io.mrc import StackError
    from clcluster.io.star import ParticleFileError

    try:
        return int(args.func(args) or 0)
    except (ParticleFileError, StackError, IntegrityError, ValueError) as e:
        print(f"clcluster {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # cannot read or write a file: one line naming it and the cause
        print(f"clcluster {args.command}: error: {os_error_line(e)}", file=sys.stderr)
        return 2


OS_ERROR_HINTS = {
    errno.EFBIG: "the file size limit was reached (ulimit -f, or the file system's largest file)",
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is exhausted",
    errno.EACCES: "no permission",
    errno.EPERM: "no permission",
    errno.EROFS: "the file system is read-only",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
}


def os_error_line(e: OSError) -> str:
    """'PATH: cause (what it means)' for a failed read or write."""
    path = e.filename if e.filename is not None else "(file)"
    cause = e.strerror or str(e)
    hint = OS_ERROR_HINTS.get(e.errno)
    return f"{path}: {cause}" + (f" ({hint}); nothing was left half-written" if hint else "")


if __name__ == "__main__":
    sys.exit(main())

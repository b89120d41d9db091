"""The benchmark's realistic mode: every method on one realistic stack (continuous views, junk,
coloured noise, off-centre picks; `realistic.py`), scored as a cryo-EM user would judge the
result (`realistic_scores.py`): view coherence, the automatic selection's junk removal and good
particles kept, and the fidelity of the class averages to clean projections.

Methods: cl_kmeans (the alignment-free stage: contrastive encoder + K-means), cl_refined (the
default pipeline), ml2d, invariant (rotation-invariant features + spectral clustering),
random labels, truth_kmeans (K-means on the true directions; junk spread at random: the
perfect partition), truth_poses (the same partition, the export's
alignment started from the true poses: the ceiling of the averages) and template (template matching against projections of the true map over
a direction grid, matched directions clustered by K-means: a ceiling of what the images
carry). Every method's classes go through the same automatic selection as `export`'s
(reference-free alignment within each class, half-set FRC, `averages.class_quality`), at the
working box.
"""
from __future__ import annotations

import dataclasses
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from clcluster.bench.realistic_scores import (best_correlations, coherence_references, fibonacci_directions, good_class_weights,
                               median_view_angle, selection_scores, view_score, weighted_fidelity)

log = logging.getLogger(__name__)

REALISTIC_METHODS = ("cl_kmeans", "cl_refined", "ml2d", "invariant", "random", "truth_kmeans", "truth_poses", "template")


@dataclasses.dataclass
class RealisticBenchmarkConfig:
    """Units: Å, px. `classes` K; directions of the fidelity grid and of template matching."""

    snrs: tuple = (0.05,)
    classes: int = 20
    methods: tuple = REALISTIC_METHODS
    seed: int = 0
    ml2d_starts: int = 1
    fidelity_resolution_A: float = 20.0
    fidelity_directions: int = 1000
    template_directions: int = 300
    template_max_shift_px: int = 4
    fidelity_max_shift_px: int = 2
    # whitening (with run_cfg preprocess.whiten): "estimate" = the pipeline's estimate
    # (preprocess.whiten_estimate); "true" = the simulator's noise spectrum (an oracle bound)
    whiten_spectrum: str = "estimate"
    seed_ari: bool = True  # run the CL pipeline a second time with another master seed (benchmark.second_seed_labels)


# ---------------------------------------------------------------------------------------------
def automatic_selection(images, labels: np.ndarray, k: int, apix: float, export_cfg: dict, seed: int = 0,
                        angle_deg=None, shift_px=None, average_images=None, stability=None):
    """The export's automatic class selection (`steps.export`: class_poses -> make_averages ->
    select_particles) on preprocessed images (n, D, D) at `apix` Å/px, with the
    averages of the working box (the benchmark has no original stacks, so no pose refinement at
    the input pixel size). The poses come from `images` (starting from the classifier's poses
    angle_deg (n,) degrees and shift_px (n, 2) px where given); the averages are taken of
    `average_images` where given (the export averages the original images, not whitened ones);
    `stability` (k,): the cluster step's per-class seed stability.
    -> (kept (n,) bool, averages (k, D, D), quality DataFrame)."""
    from clcluster.em.averages import split_halves
    from clcluster.steps.export import ExportConfig, class_poses, make_averages, select_particles

    ec = ExportConfig.from_dict(export_cfg)
    assignments = {"angle_deg": angle_deg, "shift_px": shift_px, "stability": stability}
    poses = class_poses(images, labels, k, assignments, apix, ec, "cpu", seed)
    source = images if average_images is None else average_images
    averages = make_averages(None, source, labels, k, poses, split_halves(labels, seed), ec, "working", apix)
    quality = select_particles(images, labels, k, averages, poses, assignments, ec, apix, "cpu", seed)
    return quality.kept, averages.full, quality.table


def template_matching(images, references: np.ndarray, ref_dirs: np.ndarray, k: int, max_shift_px: int, seed: int = 0):
    """Labels (n,) from the true map: each image's best-matching reference (matched filter over
    rotations and shifts, `baselines.oracle_labels`), the matched directions clustered into k
    classes by K-means. -> (labels, matched directions (n, 3))."""
    from sklearn.cluster import KMeans

    from clcluster.bench.baselines import oracle_labels

    best = oracle_labels(images, references, n_rotations=64, max_shift=max_shift_px)
    dirs = ref_dirs[best]
    return KMeans(k, n_init=4, random_state=seed).fit_predict(dirs), dirs


def cl_pipeline(images, k: int, run_cfg: dict, seed: int, apix: float):
    """The default pipeline's train -> embed -> cluster. -> (ClusterResult (labels, K-means
    labels, poses), seconds of the alignment-free stage, total seconds)."""
    from clcluster.bench.benchmark import embed_stack
    from clcluster.steps.cluster import ClusterConfig, cluster

    t0 = time.time()
    with tempfile.TemporaryDirectory() as d:
        feats = embed_stack(images, run_cfg, seed, Path(d), apix)
    t_embed = time.time() - t0
    res = cluster(feats, k, ClusterConfig.from_dict(run_cfg["cluster"]), seed=seed, images=images, device="cpu")
    return res, t_embed + res.timings["kmeans_s"], time.time() - t0


def truth_partition(dirs: np.ndarray, good: np.ndarray, k: int, seed: int) -> np.ndarray:
    """K-means on the true directions of the good particles; junk spread at random."""
    from sklearn.cluster import KMeans

    labels = np.random.default_rng(seed).integers(0, k, len(good))
    labels[good] = KMeans(k, n_init=4, random_state=seed).fit_predict(dirs[good])
    return labels


# ---------------------------------------------------------------------------------------------
def score_labels(name, labels, seconds, ctx: dict) -> dict:
    """One result row: view coherence, selection and fidelity of a labelling."""
    k, good, dirs = ctx["k"], ctx["good"], ctx["dirs"]
    t = time.time()
    angle, shift = ctx.pop("poses", (None, None))
    stability = ctx.pop("stability", None)
    kept, avgs, q = automatic_selection(ctx["images"], labels, k, ctx["apix"], ctx["export_cfg"], ctx["seed"], angle, shift,
                                        ctx.get("average_images"), stability)
    if stability is not None:
        log_stability_and_junk(q, labels, good, k)
    w = good_class_weights(labels, good, k)
    deg = median_view_angle(dirs[good], labels[good])
    row = {"method": name, "seconds": round(seconds, 1), "view_median_deg": round(deg, 2),
           "view_score": round(view_score(deg, ctx["coherence"]), 3)}
    row.update({key: round(v, 3) for key, v in selection_scores(ctx["kinds"], kept).items()})
    for rot, col in ((True, "fidelity"), (False, "fidelity_with_rotavg")):
        corr = best_correlations(avgs, ctx["fid_refs"], ctx["apix"], ctx["fid_res"], remove_rotavg=rot,
                                 max_shift_px=ctx["fid_shift"])
        row[col] = round(weighted_fidelity(corr, w), 3)
    row["good_classes"] = int((w > 0).sum())
    row["classes_selected"] = int(q["selected"].sum())
    row["scoring_seconds"] = round(time.time() - t, 1)
    log.info("  %-13s view %.1f deg (score %.2f)  junk removed %.2f  good kept %.2f  fidelity %.2f  %.0f s", name,
             deg, row["view_score"], row["junk_removed"], row["good_kept"], row["fidelity"], seconds)
    return row


def log_stability_and_junk(q: pd.DataFrame, labels: np.ndarray, good: np.ndarray, k: int) -> None:
    """Per class: seed stability, junk fraction, FRC resolution and selection, least stable first
    (whether stability tells junk classes apart), and their rank correlation."""
    from scipy.stats import spearmanr

    counts = np.bincount(labels, minlength=k)
    junk = np.bincount(labels, weights=(~good).astype(float), minlength=k) / np.maximum(counts, 1)
    order = np.argsort(q["stability"].fillna(2).to_numpy())
    log.info("  class  stability  junk  resolution_A  selected\n%s", "\n".join(
        f"  {j + 1:5d}  {q['stability'][j]:9.2f}  {junk[j]:4.2f}  {q['resolution_A'][j]:12.1f}  {bool(q['selected'][j])}"
        for j in order if counts[j] > 0))
    ok = np.isfinite(q["stability"].to_numpy()) & (counts > 0)
    if ok.sum() > 2:
        log.info("  Spearman correlation of class stability with junk fraction: %.2f",
                 spearmanr(q["stability"].to_numpy()[ok], junk[ok]).statistic)


def method_labels(name: str, ctx: dict, run_cfg: dict, bc: RealisticBenchmarkConfig, cache: dict):
    """(labels, seconds) of one method; the CL pipeline runs once for both of its rows."""
    from clcluster.bench.baselines import invariant_kmeans
    from clcluster.em.ml2d import ml2d

    images, k, seed = ctx["images"], ctx["k"], bc.seed
    t = time.time()
    if name in ("cl_kmeans", "cl_refined"):
        if "cl" not in cache:
            cache["cl"] = cl_pipeline(images, k, run_cfg, seed, ctx["apix"])
        res, t_free, t_all = cache["cl"]
        if bc.seed_ari and "cl2" not in cache:
            from clcluster.bench.benchmark import second_seed_labels

            cache["cl2"] = second_seed_labels(images, k, run_cfg, seed, ctx["apix"])
        from sklearn.metrics import adjusted_rand_score

        other = cache["cl2"][0 if name == "cl_kmeans" else 1] if bc.seed_ari else None
        ctx["extra"] = {} if other is None else {"seed_ari": round(float(adjusted_rand_score(
            res.kmeans_labels if name == "cl_kmeans" else res.labels, other)), 3)}
        if name == "cl_kmeans":
            return res.kmeans_labels, t_free
        ctx["poses"] = (res.angle_deg, res.shift_px)
        ctx["stability"] = res.stability
        if res.seed_ari is not None:
            ctx["extra"]["stability_ari"] = round(float(res.seed_ari), 3)
        return res.labels, t_all
    if name == "ml2d":
        return ml2d(images, k, n_starts=bc.ml2d_starts, seed=seed).labels, time.time() - t
    if name == "invariant":
        return invariant_kmeans(images, k, seed=seed), time.time() - t
    if name == "random":
        return np.random.default_rng(seed + 1).integers(0, k, len(images)), 0.0
    if name in ("truth_kmeans", "truth_poses"):
        if name == "truth_poses":
            ctx["poses"] = ctx["true_poses"]
        return truth_partition(ctx["dirs"], ctx["good"], k, seed), 0.0
    if name == "template":
        labels, _ = template_matching(images, ctx["tm_refs"], ctx["tm_dirs"], k, bc.template_max_shift_px, seed)
        return labels, time.time() - t
    raise ValueError(f"unknown realistic benchmark method {name!r}; choose from {list(REALISTIC_METHODS)}")


def reference_sets(projector, box: int, work_box: int, bc: RealisticBenchmarkConfig):
    """Clean projections at the working box for the fidelity grid and the template grid."""
    from clcluster.image.imageops import fourier_crop
    from clcluster.sim.realistic import clean_projections

    fid_dirs = fibonacci_directions(bc.fidelity_directions)
    tm_dirs = fibonacci_directions(bc.template_directions)
    fid = fourier_crop(clean_projections(projector, fid_dirs, box), work_box)
    tm = fourier_crop(clean_projections(projector, tm_dirs, box), work_box)
    return fid.astype(np.float32), tm.astype(np.float32), tm_dirs


def true_working_spectrum(box: int, work_box: int, rc):
    """The simulator's noise power per radial shell of the working box, (work_box//2+1,): the
    Fourier crop keeps the input's low frequencies with their integer indices, phase flipping
    does not change the noise power and the background normalisation only scales it."""
    from clcluster.sim.realistic import noise_spectrum, radial_profile

    return radial_profile(noise_spectrum(box, rc))[: work_box // 2 + 1]


def run_realistic_benchmark(bc: RealisticBenchmarkConfig, run_cfg: dict, out_dir, sim_cfg) -> pd.DataFrame:
    """Simulate one realistic stack (clean once, noise per SNR), run and score every method;
    write results.csv and results.md into out_dir. sim_cfg: a SimulationConfig in mode realistic."""
    from clcluster.bench.benchmark import prepare
    from clcluster.steps.preprocess import PreprocessConfig
    from clcluster.sim.realistic import PARTICLE, RealisticConfig, add_coloured_noise, simulate_realistic_clean
    from clcluster.steps.simulate import load_volume

    out_dir = Path(out_dir)
    rc = RealisticConfig.from_dict(sim_cfg.realistic)
    pp = PreprocessConfig.from_dict(run_cfg["preprocess"])
    t = time.time()
    vol = load_volume(sim_cfg.volumes[0], sim_cfg.box, sim_cfg.apix, sim_cfg.volume_apix)
    clean, ctf, truth, projector = simulate_realistic_clean(sim_cfg, rc, vol)
    kinds = truth["kind"].to_numpy().astype(str)
    good = kinds == PARTICLE
    dirs = truth[["dir_x", "dir_y", "dir_z"]].to_numpy()
    apix = sim_cfg.apix * sim_cfg.box / pp.box
    fid_refs, tm_refs, tm_dirs = reference_sets(projector, sim_cfg.box, pp.box, bc)
    log.info("realistic stack: %d picks (%d junk), references ready in %.0f s", len(kinds), (~good).sum(), time.time() - t)
    coherence = coherence_references(dirs[good], bc.classes, bc.seed)
    rows = []
    for snr in bc.snrs:
        noisy, _ = add_coloured_noise(clean, good, snr, rc, sim_cfg.seed)
        spectrum = true_working_spectrum(sim_cfg.box, pp.box, rc) if bc.whiten_spectrum == "true" else None
        images = prepare(noisy, ctf, sim_cfg.apix, pp, spectrum=spectrum)
        plain = prepare(noisy, ctf, sim_cfg.apix, dataclasses.replace(pp, whiten=False)) if pp.whiten else None
        ctx = {"images": images, "average_images": plain, "k": bc.classes, "good": good, "dirs": dirs, "kinds": kinds, "apix": apix,
               "export_cfg": run_cfg.get("export", {}), "seed": bc.seed, "coherence": coherence,
               "fid_refs": fid_refs, "fid_res": bc.fidelity_resolution_A,
               "fid_shift": bc.fidelity_max_shift_px,
               # image = shift(rotate(projection, psi)) in imageops' convention; shifts in working px
               "true_poses": (truth["psi_deg"].to_numpy(),
                              truth[["shift_x_px", "shift_y_px"]].to_numpy() * pp.box / sim_cfg.box),
               "tm_refs": tm_refs, "tm_dirs": tm_dirs}
        log.info("SNR %g, K=%d: kmeans-on-truth %.1f deg, random %.1f deg", snr, bc.classes,
                 coherence["kmeans_truth_deg"], coherence["random_deg"])
        cache: dict = {}
        for name in bc.methods:
            labels, seconds = method_labels(name, ctx, run_cfg, bc, cache)
            rows.append({"snr": snr, "k": bc.classes, "n": len(kinds), "junk_fraction": rc.junk_fraction,
                         "orientations": rc.orientations, **coherence, **score_labels(name, np.asarray(labels), seconds, ctx),
                         **ctx.pop("extra", {})})
            write_realistic_results(pd.DataFrame(rows), out_dir)
    df = pd.DataFrame(rows)
    write_realistic_results(df, out_dir)
    return df


def write_realistic_results(df: pd.DataFrame, out_dir: Path) -> None:
    """results.csv and results.md (one table per SNR) into out_dir."""
    from clcluster.bench.benchmark import write_results

    write_results(df, out_dir, realistic_markdown, with_plot=False)


def realistic_markdown(df: pd.DataFrame) -> str:
    """One table per SNR: the main scores of every method."""
    cols = ["view_median_deg", "view_score", "junk_removed", "good_kept", "purity_kept", "fidelity",
            "fidelity_with_rotavg", "classes_selected", "seconds"]
    cols += [c for c in ("seed_ari", "stability_ari") if c in df.columns]
    cols += sorted(c for c in df.columns if c.startswith("removed_"))
    parts = []
    for snr, g in df.groupby("snr", sort=False):
        r0 = g.iloc[0]
        lines = [f"### realistic, SNR {snr}, K={r0['k']}, {r0['n']} picks, junk {r0['junk_fraction']:.0%}, "
                 f"{r0['orientations']} views (K-means on truth {r0['kmeans_truth_deg']:.1f} deg, random "
                 f"{r0['random_deg']:.1f} deg)", "",
                 "| method | " + " | ".join(cols) + " |", "|" + "---|" * (len(cols) + 1)]
        for _, r in g.iterrows():
            lines.append(f"| {r['method']} | " + " | ".join(str(r[c]) for c in cols) + " |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


def main_realistic(args, cfg: dict) -> int:
    """`clcluster benchmark --mode realistic`: one realistic stack of the ribosome (or --volumes'
    first entry), every method scored by view coherence, selection and fidelity; prints the table."""
    from clcluster.steps.simulate import SimulationConfig, realistic_overrides

    vol = args.volumes[0] if args.volumes and args.volumes[0] != "ribosome" else args.ribosome
    if vol is None:
        raise ValueError("the realistic benchmark needs --ribosome PATH (or $CLCLUSTER_RIBOSOME_MAP) or --volumes builtin:N")
    sim = dict(cfg["simulate"], volumes=[vol], seed=cfg["seed"], mode="realistic",
               realistic=realistic_overrides(dict(cfg["simulate"].get("realistic") or {}), args))
    if not vol.startswith("builtin:"):
        sim.update(apix=5.0, volume_apix=5.0)  # the ribosome map: 5 Å voxels, ~250 Å across a 64 px box
    bc = RealisticBenchmarkConfig(snrs=tuple(args.snrs or [0.05]), classes=args.classes, seed=cfg["seed"],
                                  methods=tuple(args.methods or REALISTIC_METHODS),
                                  ml2d_starts=1 if args.ml2d_starts is None else args.ml2d_starts,
                                  seed_ari=getattr(args, "seed_ari", True))
    print(realistic_markdown(run_realistic_benchmark(bc, cfg, args.out_dir, SimulationConfig.from_dict(sim))))
    return 0

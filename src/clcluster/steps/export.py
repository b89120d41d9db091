"""Exports: classified STAR (every input column and the optics block kept; class, in-plane pose and
per-particle certainty added), one STAR per class, the selected particles, CTF-aware aligned class
averages (.mrcs + a model STAR), per-class quality and ranking, a cryoSPARC .cs, pictures.

Columns written per particle (existing columns of the same name are replaced):
  _rlnClassNumber (1..K), _rlnAnglePsi (deg), _rlnOriginXAngst/_rlnOriginYAngst (Å; RELION 3.1+
  flavour) or _rlnOriginX/_rlnOriginY (px of the input images; 3.0 flavour, no optics block),
  _rlnClclusterDistance, _rlnClclusterMargin (embedding distance to the own centroid and margin to
  the second nearest; RELION 3.1+ keeps unknown labels with a warning), _rlnClclusterScore (NCC
  with the class average), _rlnClclusterClassProbability (the ML2D stage's posterior probability
  of the assigned class, summed over poses; written where that stage ran), _rlnClclusterPickContrast
  (log ratio of particle-band power inside the particle radius to around it; `image.pickscore`),
  _rlnClclusterSurroundZ (robust z of the band power around the particle that its class average does
  not explain; `em.surround`).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from clcluster.core.cli_args import add_config, add_device, run_config
from clcluster.core.config import dataclass_from_dict
from clcluster.core.integrity import IntegrityError
from clcluster.core.rng import CRYOSPARC_UID_SEED
from clcluster.em.averages import (
    aligned_means,
    class_quality,
    energy_concentration,
    half_set_resolution,
    refine_class_poses,
    relion_pose,
    rescue_particles,
    split_halves,
    wiener_class_averages,
)
from clcluster.em.poses import refine_array, refine_original
from clcluster.em.surround import surround_power, surround_z
from clcluster.image.imageops import BACKGROUND_RADIUS_FRACTION
from clcluster.image.pickscore import PickContrast, pick_contrast
from clcluster.io.atomic import atomic_path, write_text
from clcluster.io.mrc import StackError, write_stack
from clcluster.io.star import ParticleTable, write_star

log = logging.getLogger(__name__)

AVERAGES = "class_averages.mrcs"
TSNE_MIN_POINTS = 4


def class_averages(images, labels: np.ndarray, k: int, angle_deg=None, shift_px=None, batch: int = 1024) -> np.ndarray:
    """Plain (aligned when a pose is given) class means; see `averages.aligned_means`."""
    return aligned_means(images, labels, k, angle_deg, shift_px, batch)


@dataclasses.dataclass
class ExportConfig:
    """See config.schema.yaml `export:`."""

    gallery_columns: int = 10
    align_iterations: int = 4
    align_angles: int = 128
    align_max_shift_px: int = 2
    align_whiten: bool = False
    align_centre: bool = False
    align_mask_radius: float = 0.0
    align_starts: int = 1
    start_from_cluster_pose: bool = True
    average_box: str = "input"  # input | working
    wiener_snr: float = 1.0
    frc_threshold: float = 0.143
    junk_resolution_A: float = 0.0
    min_class_fraction: float = 0.01
    min_stability: float = 0.0
    min_coherence_z: float = -3.0
    max_concentration_z: float = 3.0
    rescue_quantile: float = 0.05
    pick_max_good_loss: float = 0.05
    max_surround_z: float = 2.5
    select: list = dataclasses.field(default_factory=list)
    write_poses: bool = True
    clcluster_columns: bool = True
    cryosparc: bool = True
    tsne_max_points: int = 2000
    batch_size: int = 256
    cache_mb: int = 1000
    refine_poses: bool = True
    refine_angle_samples: int = 9

    @classmethod
    def from_dict(cls, d):
        return dataclass_from_dict(cls, d)


# ---- pictures ------------------------------------------------------------------------------------
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def gallery(averages: np.ndarray, counts: np.ndarray, path, columns: int = 10, order=None, titles=None, junk=None) -> None:
    """A PNG of the class averages in `order`, each titled (class number, size, resolution)."""
    plt = _plt()
    k = len(averages)
    order = np.arange(k) if order is None else np.asarray(order)
    cols = max(1, min(columns, k))
    rows = -(-k // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols, 1.9 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for pos, j in enumerate(order):
        ax = axes.ravel()[pos]
        ax.imshow(averages[j], cmap="gray")
        ax.set_title(titles[j] if titles is not None else f"class {j + 1}\nn={counts[j]}", fontsize=7,
                     color="firebrick" if junk is not None and junk[j] else "black")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)


def frc_plot(curves: np.ndarray, box: int, apix: float, threshold: float, path, order=None) -> None:
    plt = _plt()
    freq = np.arange(curves.shape[-1]) / (box * apix)
    fig, ax = plt.subplots(figsize=(6, 4))
    for j in (order if order is not None else range(len(curves))):
        ax.plot(freq[1:], curves[j, 1:], lw=1, label=f"class {j + 1}")
    ax.axhline(threshold, color="k", ls="--", lw=0.8)
    ax.set_xlabel("spatial frequency (1/Å)")
    ax.set_ylabel("FRC of half-set averages")
    ax.set_ylim(-0.2, 1.02)
    if len(curves) <= 12:
        ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)


def embedding_map(features: np.ndarray, labels: np.ndarray, path, max_points: int = 2000, seed: int = 0) -> dict:
    """t-SNE (scikit-learn) of a random subsample of the embeddings, coloured by class."""
    from sklearn.manifold import TSNE

    plt = _plt()
    rng = np.random.default_rng(seed)
    n = len(features)
    rows = np.sort(rng.choice(n, size=min(n, max_points), replace=False))
    x = np.asarray(features[rows], dtype=np.float32)
    if len(rows) < TSNE_MIN_POINTS:  # too few for t-SNE: the first two feature coordinates
        log.warning("%d embeddings: too few for t-SNE (needs %d); plotting two feature coordinates", len(rows),
                    TSNE_MIN_POINTS)
        perplexity = None
        xy = np.pad(x[:, :2], ((0, 0), (0, max(0, 2 - x.shape[1]))))
    else:  # perplexity must stay below the number of points (scikit-learn refuses otherwise)
        perplexity = float(min(30.0, max(2.0, (len(rows) - 1) / 3.0), len(rows) - 1.0))
        xy = TSNE(n_components=2, perplexity=perplexity, init="pca", max_iter=500, random_state=seed).fit_transform(x)
    lab = np.asarray(labels)[rows]
    k = int(np.asarray(labels).max()) + 1
    fig, ax = plt.subplots(figsize=(6, 5.4))
    cmap = plt.get_cmap("tab20" if k > 10 else "tab10")
    ax.scatter(xy[:, 0], xy[:, 1], c=[cmap(j % cmap.N) for j in lab], s=4, linewidths=0)
    for j in np.unique(lab):
        c = np.median(xy[lab == j], axis=0)
        ax.text(c[0], c[1], str(j + 1), fontsize=8, weight="bold", ha="center", va="center")
    ax.set_title(f"{'t-SNE' if perplexity else 'two feature coordinates'} of {len(rows)} of {n} embeddings, "
                 "coloured by class", fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)
    return {"points": int(len(rows)), "perplexity": perplexity}


# ---- STAR / cryoSPARC writers -------------------------------------------------------------------------
def write_model_star(path, quality: pd.DataFrame, apix: float, box: int, criterion: float) -> None:
    """RELION-style model STAR: data_model_general + data_model_classes (one row per class)."""
    import starfile

    k = len(quality)
    general = {"rlnReferenceDimensionality": 2, "rlnNrClasses": k, "rlnPixelSize": float(apix),
               "rlnOriginalImageSize": int(box), "rlnClclusterFrcCriterion": float(criterion)}
    classes = pd.DataFrame({
        "rlnReferenceImage": [f"{j:06d}@{AVERAGES}" for j in range(1, k + 1)],
        "rlnClassDistribution": quality["fraction"].to_numpy(dtype=np.float64),
        "rlnEstimatedResolution": quality["resolution_A"].to_numpy(dtype=np.float64),
        "rlnClclusterClassSize": quality["particles"].to_numpy(dtype=np.int64),
        "rlnClclusterRank": quality["rank"].to_numpy(dtype=np.int64),
        "rlnClclusterSelected": quality["selected"].to_numpy().astype(np.int64),
        "rlnClclusterMeanDistance": quality["mean_distance"].to_numpy(dtype=np.float64),
    })
    if "stability" in quality:
        classes["rlnClclusterStability"] = quality["stability"].to_numpy(dtype=np.float64)
    with atomic_path(path) as tmp:
        starfile.write({"model_general": general, "model_classes": classes}, tmp, overwrite=True)


def _cs_dtype(path_width: int) -> list:
    """The fields of a cryoSPARC particle dataset, blob/path as bytes of `path_width`."""
    return [("uid", "<u8"), ("blob/path", f"S{path_width}"), ("blob/idx", "<u4"), ("blob/shape", "<u4", (2,)),
            ("blob/psize_A", "<f4"), ("blob/sign", "<f4"), ("blob/import_sig", "<u8"),
            ("ctf/type", "S8"), ("ctf/exp_group_id", "<u4"), ("ctf/accel_kv", "<f4"), ("ctf/cs_mm", "<f4"),
            ("ctf/amp_contrast", "<f4"), ("ctf/df1_A", "<f4"), ("ctf/df2_A", "<f4"), ("ctf/df_angle_rad", "<f4"),
            ("ctf/phase_shift_rad", "<f4"), ("ctf/scale", "<f4"), ("ctf/scale_const", "<f4"),
            ("ctf/shift_A", "<f4", (2,)), ("ctf/tilt_A", "<f4", (2,)), ("ctf/trefoil_A", "<f4", (2,)),
            ("ctf/tetra_A", "<f4", (4,)), ("ctf/anisomag", "<f4", (4,)), ("ctf/bfactor", "<f4"),
            ("alignments2D/split", "<u4"), ("alignments2D/shift", "<f4", (2,)), ("alignments2D/pose", "<f4"),
            ("alignments2D/psize_A", "<f4"), ("alignments2D/error", "<f4"), ("alignments2D/class_posterior", "<f4"),
            ("alignments2D/class", "<u4"), ("alignments2D/class_ess", "<f4")]


def _cs_ctf(cs: np.ndarray, table: ParticleTable) -> None:
    """Fill the ctf/* fields of `cs` from the table (defocus Å, angles in radians, voltage kV, Cs mm)."""
    from clcluster.em.averages import has_ctf
    from clcluster.image.ctf import CTFParams

    cs["ctf/type"] = b"imported"
    if "rlnOpticsGroup" in table.particles:
        cs["ctf/exp_group_id"] = table.particles["rlnOpticsGroup"].to_numpy()
    else:
        cs["ctf/exp_group_id"] = 1
    if has_ctf(table):
        p = CTFParams.from_table(table)
        cs["ctf/accel_kv"] = p.voltage
        cs["ctf/cs_mm"] = p.cs
        cs["ctf/amp_contrast"] = p.amplitude_contrast
        cs["ctf/df1_A"] = p.defocus_u
        cs["ctf/df2_A"] = p.defocus_v
        cs["ctf/df_angle_rad"] = np.deg2rad(p.defocus_angle)
        cs["ctf/phase_shift_rad"] = np.deg2rad(p.phase_shift)
        cs["ctf/bfactor"] = p.bfactor
    scale = table.column("rlnCtfScalefactor")
    cs["ctf/scale"] = 1.0 if scale is None else np.asarray(scale, dtype=np.float32)
    cs["ctf/scale_const"] = 0


def cs_array(table: ParticleTable, psi_deg, origin_A, classes0, align_apix: float | None = None) -> np.ndarray:
    """A cryoSPARC particle dataset (NumPy structured array, as `cryosparc-tools`' Dataset saves
    it): uid, blob/*, ctf/*, alignments2D/{class, pose, shift, psize_A}.

    blob/path is the resolved stack path; alignments2D/pose = psi in radians and
    alignments2D/shift = RELION's origin in px of the particle image, with
    alignments2D/psize_A = blob/psize_A (pyem's csparc2star reads the shift as pixels of the
    image). `align_apix` (the working pixel size the poses were found at) is not needed: the
    origins come in Å."""
    n = len(table)
    paths, idx = table.image_refs()
    apix = table.pixel_size().astype(np.float32)
    box = table.column("rlnImageSize")
    if box is None:
        from clcluster.io.mrc import stack_shape

        box = np.full(n, stack_shape(paths[0])[-1]) if n else np.zeros(0)
    spaths = np.array([str(p) for p in paths], dtype=object)
    width = max(8, max((len(s.encode()) for s in spaths), default=8))
    cs = np.zeros(n, dtype=_cs_dtype(width))
    rng = np.random.default_rng(CRYOSPARC_UID_SEED)
    cs["uid"] = rng.integers(1, 2 ** 63, size=n, dtype=np.uint64)
    cs["blob/path"] = np.char.encode(spaths.astype(str), "utf-8")
    cs["blob/idx"] = idx
    cs["blob/shape"] = np.stack([np.asarray(box), np.asarray(box)], axis=1)
    cs["blob/psize_A"] = apix
    cs["blob/sign"] = -1.0
    _cs_ctf(cs, table)
    cs["alignments2D/pose"] = np.deg2rad(np.asarray(psi_deg, dtype=np.float64))
    cs["alignments2D/shift"] = np.asarray(origin_A, dtype=np.float64).reshape(-1, 2) / apix.astype(np.float64)[:, None]
    cs["alignments2D/psize_A"] = apix
    cs["alignments2D/class_posterior"] = 1.0
    cs["alignments2D/class"] = np.asarray(classes0)
    cs["alignments2D/class_ess"] = 1.0
    return cs


def write_cs(path, cs: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:  # a file object: np.save would append .npy to a name
            np.save(f, cs)


# ---- the export step: poses -> averages -> quality -> writers -----------------------------------------
@dataclasses.dataclass
class Poses:
    """Per-particle in-plane poses: angle a (deg) and shift s (px at `apix` Å/px), NCC score."""

    angle_deg: np.ndarray
    shift_px: np.ndarray
    apix: float
    score: np.ndarray
    history: list
    refinement: dict | None = None

    def shift_at(self, apix: float) -> np.ndarray:
        """Shifts in px of images at `apix` Å/px."""
        return self.shift_px * (self.apix / apix)


@dataclasses.dataclass
class Averages:
    full: np.ndarray  # (k, box, box)
    halves: np.ndarray  # (2, k, box, box)
    apix: float
    source: str  # "input" (original images, CTF-aware) or "working" (preprocessed images)


def class_poses(images, labels, k: int, assignments: dict, work_apix: float, cfg: ExportConfig, device: str,
                seed: int) -> Poses:
    """Reference-free alignment within each class at the working box (`averages.refine_class_poses`)."""
    start = assignments.get("angle_deg") if cfg.start_from_cluster_pose else None
    cp = refine_class_poses(images, labels, k, start, assignments.get("shift_px") if start is not None else None,
                            iterations=cfg.align_iterations, n_angles=cfg.align_angles,
                            max_shift_px=cfg.align_max_shift_px, device=device, seed=seed,
                            batch_size=cfg.batch_size, cache_mb=cfg.cache_mb, whiten=cfg.align_whiten,
                            centre=cfg.align_centre, mask_radius=cfg.align_mask_radius,
                            starts=cfg.align_starts)
    return Poses(cp.angle_deg, cp.shift_px, work_apix, cp.score, cp.history)


def make_averages(table, images, labels, k: int, poses: Poses, halves, cfg: ExportConfig, where: str,
                  work_apix: float) -> Averages:
    """Class averages and half-set averages: CTF-aware from the original images at their box
    (where="input"; falls back to "working" when the originals cannot be read) or aligned means
    of the preprocessed images (where="working")."""
    if where == "input":
        in_apix = float(np.median(table.pixel_size()))
        try:
            wa = wiener_class_averages(table, labels, k, poses.angle_deg, poses.shift_at(in_apix),
                                       snr=cfg.wiener_snr, halves=halves, batch_size=cfg.batch_size)
            return Averages(wa.full, wa.halves, wa.apix, "input")
        except (StackError, FileNotFoundError, OSError) as e:
            log.warning("cannot read the original images (%s); averaging the preprocessed images instead", e)
    work = poses.shift_at(work_apix)  # px of the preprocessed images
    avgs = aligned_means(images, labels, k, poses.angle_deg, work)
    half_avgs = np.stack([aligned_means(images, np.where(halves == h, labels, k), k + 1, poses.angle_deg, work)[:k]
                          for h in (0, 1)])
    return Averages(avgs, half_avgs, work_apix, "working")


def refine_poses(table, images, labels, averages: Averages, poses: Poses, cfg: ExportConfig,
                 work_apix: float) -> Poses:
    """Local refinement of every particle's angle and shift against its class average, at the
    averages' pixel size (the input images' for "input" averages): angles within one working
    angle step of the class pose, shifts within half a working pixel + 1 px of it, sub-pixel."""
    angle_step = 360.0 / cfg.align_angles
    shift_range = 0.5 * work_apix / averages.apix + 1.0
    start = poses.shift_at(averages.apix)
    kw = dict(angle_range_deg=angle_step, shift_range_px=shift_range, n_angles=cfg.refine_angle_samples)
    if averages.source == "input":
        lp = refine_original(table, labels, averages.full, poses.angle_deg, start, batch_size=cfg.batch_size, **kw)
    else:
        lp = refine_array(images, labels, averages.full, poses.angle_deg, start, batch_size=cfg.batch_size, **kw)
    moved = np.linalg.norm(lp.shift_px - start, axis=1)
    turned = np.abs((lp.angle_deg - poses.angle_deg + 180.0) % 360.0 - 180.0)
    info = {"apix_A": averages.apix, "box": int(averages.full.shape[-1]), "angle_window_deg": angle_step,
            "angle_grid_deg": lp.angle_step_deg, "shift_window_px": shift_range,
            "mean_ncc_before": float(np.mean(lp.start_score)), "mean_ncc_after": float(np.mean(lp.score)),
            "median_shift_change_px": float(np.median(moved)), "median_angle_change_deg": float(np.median(turned)),
            "grid_before": {"angle_step_deg": angle_step, "shift_step_px": work_apix / averages.apix}}
    log.info("pose refinement at %.3f Å/px: mean NCC %.4f -> %.4f, median change %.2f px, %.2f deg",
             averages.apix, info["mean_ncc_before"], info["mean_ncc_after"], info["median_shift_change_px"],
             info["median_angle_change_deg"])
    return Poses(lp.angle_deg, lp.shift_px, averages.apix, poses.score, poses.history, info)


@dataclasses.dataclass
class Quality:
    table: pd.DataFrame  # one row per class (averages.class_quality)
    resolution_A: np.ndarray  # (k,), NaN for classes of fewer than 2 particles
    curves: np.ndarray  # (k, box//2+1) FRC of the half-set averages
    order: np.ndarray  # classes, best ranked first (0-based)
    kept: np.ndarray | None = None  # (n,) bool particles for particles_selected (selected classes + rescued - noise-like - surround)
    rescued: int = 0  # particles of junk-suggested classes kept (`rescue_particles`)
    picks: PickContrast | None = None  # per-pick contrast and noise-like flags (`screen_picks`)
    surround_z: np.ndarray | None = None  # (n,) robust z of the unexplained power around each pick (`screen_surround`)


def assess_quality(labels, k: int, averages: Averages, poses: Poses, assignments: dict, cfg: ExportConfig,
                   particle_radius_A: float | None = None, noise_like: np.ndarray | None = None) -> Quality:
    """Half-set FRC resolution, per-class quality, ranking and selection; the averages' energy
    concentration inside the particle radius (Å; None: BACKGROUND_RADIUS_FRACTION x box); with the
    picks' noise-like flags (n,) (the pick screen on), a class of low coherence is junk only where
    it also holds more noise-like picks than real particles would (`averages.class_quality`)."""
    counts = np.bincount(labels, minlength=k)
    res_A, curves = half_set_resolution(averages.halves, averages.apix, cfg.frc_threshold)
    res_A = np.where(counts >= 2, res_A, np.nan)
    box = averages.full.shape[-1]
    radius_px = particle_radius_A / averages.apix if particle_radius_A else BACKGROUND_RADIUS_FRACTION * box
    q = class_quality(labels, k, res_A, assignments.get("distance"), assignments.get("margin"), poses.score,
                      cfg.junk_resolution_A, cfg.min_class_fraction, cfg.select, cfg.min_coherence_z,
                      energy_concentration(averages.full, radius_px), cfg.max_concentration_z,
                      noise_like, cfg.pick_max_good_loss)
    q = add_stability(q, assignments.get("stability"), cfg.min_stability, bool(cfg.select))
    return Quality(q, res_A, curves, np.argsort(q["rank"].to_numpy()))


def rescue(images, labels, poses: Poses, quality: Quality, cfg: ExportConfig, work_apix: float, device: str) -> Quality:
    """The particles for particles_selected: the selected classes' members and, with the automatic
    selection and `cfg.rescue_quantile` > 0, the particles of junk-suggested classes that match a
    selected class's average as well as most of its members (`averages.rescue_particles`)."""
    selected = quality.table["selected"].to_numpy()
    if cfg.select or cfg.rescue_quantile <= 0:
        return dataclasses.replace(quality, kept=selected[labels])
    r = rescue_particles(images, labels, selected, poses.angle_deg, poses.shift_at(work_apix), cfg.rescue_quantile,
                         n_angles=cfg.align_angles, max_shift_px=cfg.align_max_shift_px, device=device,
                         batch_size=cfg.batch_size, cache_mb=cfg.cache_mb)
    return dataclasses.replace(quality, kept=r.kept, rescued=int((r.kept & ~selected[labels]).sum()))


def score_picks(images, cfg: ExportConfig, seed: int, particle_radius_px: float | None = None) -> PickContrast:
    """Every pick's contrast (`image.pickscore`; disc of particle_radius_px, None: 0.375 x box,
    RELION's background radius) and, with the automatic selection and `cfg.pick_max_good_loss` >
    0, its noise-like flag (the cut's loss bounded by the model of the particles' scores too)."""
    loss = 0.0 if cfg.select else cfg.pick_max_good_loss
    return pick_contrast(images, particle_radius_px, loss, seed, cfg.batch_size * 4, particle_model=True)


def screen_picks(labels, k: int, quality: Quality) -> Quality:
    """quality: as `rescue` returns it (kept set; `picks` from `score_picks`). Noise-like picks
    leave particles_selected. Adds each class's noise-like fraction to the quality table (`noise_like`)."""
    picks = quality.picks
    counts = np.bincount(labels, minlength=k)
    table = quality.table.copy()
    table["noise_like"] = np.bincount(labels, weights=picks.noise_like, minlength=k) / np.maximum(counts, 1)
    log.info("pick contrast: %d of %d picks noise-like (threshold %.3f, estimated noise-like fraction %.2f)",
             int(picks.noise_like.sum()), len(labels), picks.threshold, picks.noise_fraction)
    return dataclasses.replace(quality, table=table, kept=quality.kept & ~picks.noise_like, picks=picks)


def screen_surround(images, labels, k: int, poses: Poses, quality: Quality, cfg: ExportConfig, work_apix: float,
                    particle_radius_px: float | None = None) -> Quality:
    """quality: as `screen_picks` returns it. Score every pick's particle-band power around the
    particle that its class average does not explain (`em.surround`; working images, poses at
    work_apix Å/px, disc of particle_radius_px, None: 0.375 x box); with the automatic selection,
    picks above `cfg.max_surround_z` leave particles_selected. Adds each class's share of them to
    the quality table (`surround_flagged`)."""
    box = images.shape[-1]
    radius_px = particle_radius_px if particle_radius_px else BACKGROUND_RADIUS_FRACTION * box
    if quality.picks is None or not quality.picks.weights.any():
        return quality
    power = surround_power(images, labels, k, poses.angle_deg, poses.shift_at(work_apix), radius_px,
                           quality.picks.weights, cfg.batch_size * 4)
    z = surround_z(power)
    if not np.isfinite(z).any():
        log.warning("surround power: the particle radius (%.1f px) leaves too little of the %d px box around it; "
                    "no pick is screened for structure around it", radius_px, box)
        return quality
    flagged = np.zeros(len(z), dtype=bool) if cfg.select else z > cfg.max_surround_z
    table = quality.table.copy()
    counts = np.maximum(np.bincount(labels, minlength=k), 1)
    table["surround_flagged"] = np.bincount(labels, weights=flagged, minlength=k) / counts
    log.info("surround power: %d of %d picks above robust z %.2f (%d of them still selected)", int(flagged.sum()),
             len(z), cfg.max_surround_z, int((flagged & quality.kept).sum()))
    return dataclasses.replace(quality, table=table, kept=quality.kept & ~flagged, surround_z=z)


def select_particles(images, labels, k: int, averages: Averages, poses: Poses, assignments: dict, cfg: ExportConfig,
                     work_apix: float, device: str, seed: int, particle_radius_px: float | None = None) -> Quality:
    """The automatic selection (or the user's list): `score_picks` -> `assess_quality` -> `rescue` ->
    `screen_picks` -> `screen_surround`; particle_radius_px: at the working pixel size work_apix (Å/px)."""
    radius_A = particle_radius_px * work_apix if particle_radius_px else None
    picks = score_picks(images, cfg, seed, particle_radius_px)
    screen_on = bool(np.isfinite(picks.noise_fraction))  # the noise-like cut ran (pick_contrast: NaN when it did not)
    quality = assess_quality(labels, k, averages, poses, assignments, cfg, radius_A,
                             picks.noise_like if screen_on else None)
    quality = rescue(images, labels, poses, dataclasses.replace(quality, picks=picks), cfg, work_apix, device)
    quality = screen_picks(labels, k, quality)
    return screen_surround(images, labels, k, poses, quality, cfg, work_apix, particle_radius_px)


def add_stability(q: pd.DataFrame, stability, min_stability: float = 0.0, user_select: bool = False) -> pd.DataFrame:
    """The cluster step's per-class seed stability (k,) (fraction of a class's particles that stay
    together in runs with other seeds; NaN: not measured) as a `stability` column of the quality
    table q, when given. With min_stability > 0, classes below it are suggested as junk too (and
    dropped from the automatic selection unless the user chose the classes; at least the
    best-ranked class stays selected); unmeasured classes are not judged by it."""
    if stability is None:
        return q
    stability = np.asarray(stability, dtype=np.float64)
    if stability.shape != (len(q),):
        log.warning("seed stability for %d classes, %d in the export: not used", stability.size, len(q))
        return q
    q = q.copy()
    q["stability"] = stability
    if min_stability > 0:
        unstable = np.nan_to_num(stability, nan=1.0) < min_stability
        q.loc[unstable, "suggestion"] = "junk"
        if not user_select:
            q.loc[unstable, "selected"] = False
            if not q["selected"].any() and (q["particles"] > 0).any():
                q.loc[int(np.argmin(q["rank"].to_numpy())), "selected"] = True
    return q


def write_averages(out_dir: Path, labels, k: int, averages: Averages, quality: Quality, cfg: ExportConfig) -> None:
    """class_averages.mrcs/.star, class_quality.csv, the gallery and the FRC plot."""
    counts = np.bincount(labels, minlength=k)
    box, res_A, q = averages.full.shape[-1], quality.resolution_A, quality.table
    write_stack(out_dir / AVERAGES, averages.full, averages.apix)
    write_model_star(out_dir / "class_averages.star", q, averages.apix, box, cfg.frc_threshold)
    with atomic_path(out_dir / "class_quality.csv") as tmp:
        q.to_csv(tmp, index=False, float_format="%.4g")
    titles = [f"class {j + 1}  n={counts[j]}\n" + (f"{res_A[j]:.1f} Å" if np.isfinite(res_A[j]) else "–")
              + (f"  s={q['stability'][j]:.2f}" if "stability" in q and np.isfinite(q["stability"][j]) else "")
              + ("  junk" if q["suggestion"][j] == "junk" else "") for j in range(k)]
    gallery(averages.full, counts, out_dir / "class_averages.png", cfg.gallery_columns, quality.order, titles,
            junk=(q["suggestion"] == "junk").to_numpy())
    frc_plot(quality.curves, box, averages.apix, cfg.frc_threshold, out_dir / "frc.png", quality.order[: min(k, 12)])


def classified_table(table: ParticleTable, labels, poses: Poses, assignments: dict, cfg: ExportConfig,
                     picks: PickContrast | None = None, surround: np.ndarray | None = None):
    """The input table with class, pose (RELION convention, flavour's units) and clcluster
    columns added; also returns (psi [deg], origin [Å] (n, 2))."""
    psi, ox_A, oy_A = relion_pose(poses.angle_deg, poses.shift_px, poses.apix)
    parts = table.particles.copy()
    parts["rlnClassNumber"] = labels + 1
    if cfg.write_poses:
        parts["rlnAnglePsi"] = psi
        if table.optics is not None:
            parts["rlnOriginXAngst"], parts["rlnOriginYAngst"] = ox_A, oy_A
        else:  # RELION <= 3.0: origins in px of the particle images
            in_apix = table.pixel_size()
            parts["rlnOriginX"], parts["rlnOriginY"] = ox_A / in_apix, oy_A / in_apix
    if cfg.clcluster_columns:
        for col, key in (("rlnClclusterDistance", "distance"), ("rlnClclusterMargin", "margin"),
                         ("rlnClclusterClassProbability", "probability")):
            if assignments.get(key) is not None:
                parts[col] = np.asarray(assignments[key], dtype=np.float64)
        parts["rlnClclusterScore"] = np.asarray(poses.score, dtype=np.float64)
        if picks is not None:
            parts["rlnClclusterPickContrast"] = picks.scores
        if surround is not None:
            parts["rlnClclusterSurroundZ"] = surround
    return table.with_particles(parts), psi, np.stack([ox_A, oy_A], axis=1)


def _validate(table, labels, images, k: int) -> None:
    n = len(table)
    if len(labels) != n:
        raise IntegrityError(f"{len(labels)} labels for {n} input particles")
    if n == 0:
        raise IntegrityError("no particles to export")
    if labels.min() < 0 or labels.max() >= k:
        raise IntegrityError(f"labels outside 1..{k}")
    if len(images) != n:
        raise IntegrityError(f"{len(images)} preprocessed images for {n} input particles")


def export(table: ParticleTable, assignments: dict, images, meta, k: int, out_dir, cfg: ExportConfig | dict | None = None,
           embeddings=None, device: str = "cpu", seed: int = 0) -> dict:
    """Write the exports into `out_dir`: poses -> averages -> (pose refinement -> averages) ->
    quality -> writers.

    assignments: per-input-row arrays ("labels", optionally "angle_deg", "shift_px", "distance",
    "margin"); images: the preprocessed particles in input order (array-like (n, box, box));
    meta: the preprocessed shards' sidecar (apix_A of `images`, input_apix_A, ...) or just the
    working pixel size in Å/px; embeddings: (n, d) features in input order (for the t-SNE map)."""
    cfg = cfg if isinstance(cfg, ExportConfig) else ExportConfig.from_dict(cfg)
    meta = {"apix_A": float(meta)} if not isinstance(meta, dict) else dict(meta)
    out_dir = Path(out_dir)
    labels = np.asarray(assignments["labels"], dtype=np.int64)
    _validate(table, labels, images, k)
    work_apix = float(meta["apix_A"])
    poses = class_poses(images, labels, k, assignments, work_apix, cfg, device, seed)
    halves = split_halves(labels, seed)
    averages = make_averages(table, images, labels, k, poses, halves, cfg, cfg.average_box, work_apix)
    if cfg.refine_poses:
        poses = refine_poses(table, images, labels, averages, poses, cfg, work_apix)
        averages = make_averages(table, images, labels, k, poses, halves, cfg, averages.source, work_apix)
    quality = select_particles(images, labels, k, averages, poses, assignments, cfg, work_apix, device, seed,
                               meta.get("particle_radius_px"))
    write_averages(out_dir, labels, k, averages, quality, cfg)
    return write_particles(out_dir, table, labels, k, poses, averages, quality, assignments, cfg, embeddings, seed)


def _finite_or_none(x: float):
    return float(x) if np.isfinite(x) else None


def write_particles(out_dir: Path, table, labels, k: int, poses: Poses, averages: Averages, quality: Quality,
                    assignments: dict, cfg: ExportConfig, embeddings, seed: int) -> dict:
    """The embedding map, per-class / selected / classified STARs, the .cs files and summary.json
    (the classified STAR last: its presence means the export is complete). Returns the summary."""
    n, counts = len(table), np.bincount(labels, minlength=k)
    q = quality.table
    selected_classes = q.loc[q["selected"], "class"].to_numpy()
    tsne = None
    if embeddings is not None:
        if len(embeddings) != n:
            log.warning("%d embeddings for %d particles: no embedding map", len(embeddings), n)
        else:
            tsne = embedding_map(np.asarray(embeddings), labels, out_dir / "embedding_map.png", cfg.tsne_max_points, seed)
    classified, psi, origin_A = classified_table(table, labels, poses, assignments, cfg, quality.picks, quality.surround_z)
    for j in range(k):
        write_star(out_dir / "classes" / f"class_{j + 1:03d}.star", classified.subset(np.flatnonzero(labels == j)))
    sel_rows = np.flatnonzero(quality.kept if quality.kept is not None else np.isin(labels + 1, selected_classes))
    write_star(out_dir / "particles_selected.star", classified.subset(sel_rows))
    if cfg.cryosparc:
        cs = cs_array(table, psi, origin_A, labels)
        write_cs(out_dir / "particles_classified.cs", cs)
        write_cs(out_dir / "particles_selected.cs", cs[sel_rows])
    res_A = quality.resolution_A
    summary = {
        "particles": n, "classes": k, "class_sizes": counts.tolist(), "selected_classes": selected_classes.tolist(),
        "selected_particles": int(len(sel_rows)), "rescued_particles": quality.rescued, "selection": "user list export.select" if cfg.select else
        f"automatic: fraction >= {cfg.min_class_fraction}, coherence z >= {cfg.min_coherence_z}, "
        f"concentration z <= {cfg.max_concentration_z}"
        + (f", resolution <= {cfg.junk_resolution_A} Å" if cfg.junk_resolution_A > 0 else "")
        + (f", seed stability >= {cfg.min_stability}" if cfg.min_stability > 0 and "stability" in q else "")
        + f"; particles of other classes rescued at NCC quantile {cfg.rescue_quantile}"
        + (f"; noise-like picks removed (estimated loss of other picks <= {cfg.pick_max_good_loss})"
           if cfg.pick_max_good_loss > 0 and not cfg.select else "")
        + (f"; picks with surround power z > {cfg.max_surround_z} removed"
           if quality.surround_z is not None and not cfg.select else ""),
        "noise_like_picks": int(quality.picks.noise_like.sum()) if quality.picks is not None else 0,
        "pick_contrast_threshold": _finite_or_none(quality.picks.threshold) if quality.picks is not None else None,
        "surround_picks": int((quality.surround_z > cfg.max_surround_z).sum())
        if quality.surround_z is not None and not cfg.select else 0,
        "pick_loss_estimated": _finite_or_none(quality.picks.estimated_loss) if quality.picks is not None else None,
        "noise_like_fraction_estimated": _finite_or_none(quality.picks.noise_fraction) if quality.picks is not None else None,
        "seed_ari": float(assignments["seed_ari"]) if assignments.get("seed_ari") is not None else None,
        "averages": {"box": int(averages.full.shape[-1]), "apix_A": averages.apix,
                     "from": "original images, CTF-aware (Wiener)" if averages.source == "input"
                     else "preprocessed images (aligned means)", "wiener_snr": cfg.wiener_snr},
        "frc_criterion": cfg.frc_threshold, "resolution_A": [None if not np.isfinite(r) else round(float(r), 2) for r in res_A],
        "rank_order": (quality.order + 1).tolist(), "alignment_mean_ncc": poses.history,
        "pose_refinement": poses.refinement,
        "started_from_cluster_pose": bool(cfg.start_from_cluster_pose and assignments.get("angle_deg") is not None),
        "embedding_map": tsne,
    }
    write_text(out_dir / "summary.json", json.dumps(summary, indent=2))
    write_star(out_dir / "particles_classified.star", classified)
    log.info("exported %d particles in %d classes to %s; selected classes %s (%d particles)", n, k, out_dir,
             selected_classes.tolist(), len(sel_rows))
    return summary


# --- command line: `clcluster export` ------------------------------------------------------------
def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("particles", help="the input particle file (all its columns are kept)")
    p.add_argument("--assignments", required=True, help="assignments.npz from cluster")
    p.add_argument("--preprocessed", nargs="+", required=True, help="preprocessed shards, shard order")
    p.add_argument("--classes", type=int)
    p.add_argument("--out-dir", required=True)
    p.add_argument("--root", help="project root for relative stack paths")
    p.add_argument("--embeddings", nargs="+", help="embeddings/shard_{i}.npy in input order (for the t-SNE map)")
    p.add_argument("--select", help="classes to keep in particles_selected.star, e.g. '3,7' (default: config "
                                    "export.select, else the automatic good/junk suggestion)")
    p.add_argument("--average-box", choices=["input", "working"],
                   help="average the original images at the input box (CTF-aware) or the preprocessed ones")
    add_device(p)
    add_config(p)


def main(args: argparse.Namespace) -> int:
    from clcluster.core.backend import select_device
    from clcluster.io import read_particles
    from clcluster.learn.data import ShardSet

    cfg = run_config(args)
    ecfg = dict(cfg["export"])
    if args.select:
        ecfg["select"] = [int(c) for c in args.select.replace(",", " ").split()]
    if args.average_box:
        ecfg["average_box"] = args.average_box
    table = read_particles(args.particles, root=args.root or cfg.get("project_root") or None)
    meta = json.loads(Path(args.preprocessed[0]).with_suffix(".json").read_text())
    feats = np.concatenate([np.load(e, mmap_mode="r") for e in args.embeddings]) if args.embeddings else None
    export(table, dict(np.load(args.assignments)), ShardSet(args.preprocessed), meta, args.classes or cfg["classes"],
           args.out_dir, ExportConfig.from_dict(ecfg), embeddings=feats,
           device=str(select_device(args.device or cfg["device"])), seed=cfg["seed"])
    return 0

"""Exports: classified STAR (every input column and the optics block kept, _rlnClassNumber added),
one STAR per class, class averages (.mrcs) and a gallery PNG, a summary."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from .align import to_reference_frame
from .io.atomic import atomic_path, write_text
from .io.mrc import write_stack
from .io.star import ParticleTable, write_star

log = logging.getLogger(__name__)


class IntegrityError(RuntimeError):
    """An output would lose or duplicate a particle."""


def check_complete(n_input: int, rows: np.ndarray, what: str) -> None:
    """Every input row 0..n_input-1 exactly once in `rows`, else IntegrityError."""
    rows = np.asarray(rows)
    counts = np.bincount(rows[(rows >= 0) & (rows < n_input)], minlength=n_input) if len(rows) else np.zeros(n_input, int)
    missing, dup = np.flatnonzero(counts == 0), np.flatnonzero(counts > 1)
    extra = int(((rows < 0) | (rows >= n_input)).sum())
    if missing.size or dup.size or extra:
        raise IntegrityError(f"{what}: {missing.size} input particles missing (first rows {(missing[:5] + 1).tolist()}), "
                             f"{dup.size} duplicated (first rows {(dup[:5] + 1).tolist()}), {extra} unknown")


def class_averages(images, labels: np.ndarray, k: int, angle_deg=None, shift_px=None, batch: int = 1024) -> np.ndarray:
    """Class means (k, box, box) of images (n, box, box) (array-like, read in batches), each
    particle brought into its class's frame first when a pose is given."""
    box = images.shape[-1] if hasattr(images, "shape") else images.box
    sums = np.zeros((k, box, box), np.float64)
    for s in range(0, len(labels), batch):
        x = np.asarray(images[s:s + batch], dtype=np.float32)
        if angle_deg is not None:
            x = to_reference_frame(x, angle_deg[s:s + batch], shift_px[s:s + batch])
        np.add.at(sums, labels[s:s + batch], x)
    counts = np.bincount(labels, minlength=k)
    return (sums / np.maximum(counts, 1)[:, None, None]).astype(np.float32)


def gallery(averages: np.ndarray, counts: np.ndarray, path, columns: int = 10, order=None, titles=None) -> None:
    """A PNG of the class averages, labelled with class number and size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = len(averages)
    order = np.arange(k) if order is None else np.asarray(order)
    cols = min(columns, k)
    rows = -(-k // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols, 1.8 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for pos, j in enumerate(order):
        ax = axes.ravel()[pos]
        ax.imshow(averages[j], cmap="gray")
        ax.set_title(titles[j] if titles is not None else f"class {j + 1}\nn={counts[j]}", fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)


def export(table: ParticleTable, assignments: dict, images, apix: float, k: int, out_dir, gallery_columns: int = 10) -> dict:
    """Write the exports into `out_dir`. `assignments` holds per-input-row arrays ("labels",
    optionally "angle_deg", "shift_px", "distance", "margin"); `images` are the preprocessed
    particles in input order (array-like (n, box, box)) at `apix` Å/px."""
    out_dir = Path(out_dir)
    labels = np.asarray(assignments["labels"], dtype=np.int64)
    n = len(table)
    if len(labels) != n:
        raise IntegrityError(f"{len(labels)} labels for {n} input particles")
    if labels.min() < 0 or labels.max() >= k:
        raise IntegrityError(f"labels outside 1..{k}")
    parts = table.particles.copy()
    parts["rlnClassNumber"] = labels + 1
    classified = table.with_particles(parts)
    counts = np.bincount(labels, minlength=k)
    for j in range(k):
        write_star(out_dir / "classes" / f"class_{j + 1:03d}.star", classified.subset(np.flatnonzero(labels == j)))
    pose = assignments.get("angle_deg")
    avgs = class_averages(images, labels, k, pose, assignments.get("shift_px") if pose is not None else None)
    write_stack(out_dir / "class_averages.mrcs", avgs, apix)
    order = np.argsort(-counts)
    gallery(avgs, counts, out_dir / "class_averages.png", gallery_columns, order)
    summary = {"particles": n, "classes": k, "class_sizes": counts.tolist(), "aligned_averages": pose is not None,
               "average_apix_A": apix}
    write_text(out_dir / "summary.json", json.dumps(summary, indent=2))
    # the classified STAR last: its presence means the export is complete
    write_star(out_dir / "particles_classified.star", classified)
    log.info("exported %d particles in %d classes to %s", n, k, out_dir)
    return summary

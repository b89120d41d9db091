"""Per-shard preprocessing: CTF correction, Fourier crop to the working box, optional low-pass,
background normalisation, noise whitening and an optional soft mask → float16 (n, box, box) .npy
(memory-mappable) with a JSON sidecar. NumPy or CuPy, same code; one batch of raw images in
memory at a time.

Whitening divides every image by the square root of one radial noise spectrum, estimated once
for the whole particle set (`clcluster preprocess PARTICLES --spectrum-out S.json`, the
workflow's `noise_spectrum` rule) from evenly spaced particles, so that the result does not
depend on how the set is sharded."""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import time
from pathlib import Path

import numpy as np

from clcluster.core.backend import asnumpy, choose_array_module, get_array_module
from clcluster.core.cli_args import add_config, add_device, run_config
from clcluster.core.config import dataclass_from_dict
from clcluster.image.ctf import (
    PHASE_FLIPPED,
    PREMULTIPLIED,
    RAW,
    CTFParams,
    correction_filter,
    ctf_states,
    state_counts,
)
from clcluster.image.imageops import (
    BACKGROUND_RADIUS_FRACTION,
    circular_mask,
    fourier_crop_filtered,
    fourier_filter,
    lowpass,
    normalise_background,
    radial_shells,
)
from clcluster.io.atomic import atomic_path, write_text
from clcluster.io.mrc import read_images
from clcluster.io.star import ParticleTable

log = logging.getLogger(__name__)


@dataclasses.dataclass
class PreprocessConfig:
    """See config.schema.yaml `preprocess:`; sizes in pixels of the working box, resolution in Å."""

    box: int = 32
    ctf: str = "phase_flip"
    wiener_snr: float = 0.1
    bg_radius_px: float = -1
    bg_radius_A: float = -1.0  # > 0: background radius in Å (of the working pixel size), overrides bg_radius_px
    lowpass_A: float = 0.0
    mask_radius_px: float = -1
    whiten: bool = True
    whiten_estimate: str = "images"  # images | background: where the noise spectrum is measured
    batch_size: int = 512

    @classmethod
    def from_dict(cls, d):
        return dataclass_from_dict(cls, d)

    def bg_radius(self, apix: float | None = None) -> float:
        """Background radius in working px: bg_radius_A / apix (apix = working pixel size in Å)
        when set, else bg_radius_px, else RELION's default 0.375 x box."""
        if self.bg_radius_A > 0:
            if apix is None:
                raise ValueError("preprocess.bg_radius_A needs the working pixel size")
            return self.bg_radius_A / apix
        return self.bg_radius_px if self.bg_radius_px > 0 else BACKGROUND_RADIUS_FRACTION * self.box


def preprocess_batch(images, ctf: CTFParams | None, apix: float, cfg: PreprocessConfig, mask: bool = True,
                     states=None):
    """images (n, D, D) at `apix` Å/px → (n, box, box) float32 at apix * D / box, NumPy or CuPy
    (the result lives on the input's device; CTF parameters stay host arrays).

    Steps: CTF correction (cfg.ctf: phase_flip | wiener | none) at the input pixel size and
    Fourier crop/pad to cfg.box (one rFFT of the input, one inverse rFFT at the working box), optional low-pass to cfg.lowpass_A Å, background
    normalisation (mean 0, std 1 outside cfg.bg_radius() working px), and, if `mask` and
    cfg.mask_radius_px > 0, a soft circular mask (3 px raised-cosine edge). Whitening needs the
    set's noise spectrum and is done by `whiten_batch` (callers pass mask=False first).
    `states` (n,): what each image already is (`ctf.ctf_states`: raw, phase_flipped or
    premultiplied); already corrected images are not corrected twice (see `correction_filter`)."""
    box_in = images.shape[-1]
    filt = None
    if ctf is not None and cfg.ctf != "none":
        filt = correction_filter(ctf, box_in, apix, cfg.ctf, cfg.wiener_snr, get_array_module(images), states)
    x = fourier_crop_filtered(images, cfg.box, filt)  # CTF correction and crop in one Fourier pass
    new_apix = apix * box_in / cfg.box
    if cfg.lowpass_A > 0:
        x = lowpass(x, cfg.lowpass_A, new_apix)
    x = normalise_background(x, cfg.bg_radius(new_apix))
    if mask:
        x = apply_mask(x, cfg)
    return x


def apply_mask(images, cfg: PreprocessConfig):
    """Soft circular mask of cfg.mask_radius_px working px (no-op when <= 0)."""
    if cfg.mask_radius_px <= 0:
        return images
    return images * circular_mask(images.shape[-1], cfg.mask_radius_px, soft_edge=3.0, xp=get_array_module(images))


def radial_power_sums(images):
    """(sum of |F|^2 per radial shell, number of coefficients per shell) over images (n, box, box);
    both (box//2+1,) float64 on the images' device. Sums over batches combine by addition."""
    xp = get_array_module(images)
    box = images.shape[-1]
    shell = radial_shells(box, xp).ravel()
    p = (xp.abs(xp.fft.rfft2(images)) ** 2).astype(xp.float64).sum(axis=0).ravel()  # float64: batch sizes agree
    nb = box // 2 + 1
    return (xp.bincount(shell, weights=p, minlength=nb),
            xp.bincount(shell, minlength=nb).astype(xp.float64) * images.shape[0])


def radial_noise_spectrum(images):
    """Radially averaged power spectrum (box//2+1,) of images (n, box, box), NumPy or CuPy
    (same module as the input). Shell k holds the rFFT coefficients with round(|f| box) = k,
    frequencies beyond Nyquist in the corners folded into the last shell."""
    xp = get_array_module(images)
    s, c = radial_power_sums(images)
    return s / xp.maximum(c, 1)


def background_window(box: int, radius: float, xp=np):
    """(box, box) float32 window that keeps the background: 0 inside `radius` px, rising over a
    3 px raised-cosine edge to 1 outside (the complement of `circular_mask`)."""
    return (1.0 - circular_mask(box, radius, soft_edge=3.0, xp=xp)).astype(xp.float32)


def background_power_sums(images, radius: float):
    """`radial_power_sums` of the images' background only: each image (n, box, box) times
    `background_window(box, radius)`, the power divided by the window's mean square (so that
    white noise of variance v gives v per shell, as `radial_power_sums` of the whole image
    does). The particle (inside `radius` px) is left out, so the sums estimate the noise power
    per shell rather than noise plus signal; the window's own spectrum blurs them by about
    box / (2 pi (box / 2 - radius)) shells. -> (sums, counts), (box//2+1,) float64 each."""
    xp = get_array_module(images)
    win = background_window(images.shape[-1], radius, xp)
    s, c = radial_power_sums(images * win)
    return s / float((win.astype(xp.float64) ** 2).mean()), c


def estimate_noise_spectrum(images, cfg: PreprocessConfig, apix: float | None = None):
    """Radial noise power spectrum (box//2+1,) of preprocessed, unmasked images (n, box, box):
    cfg.whiten_estimate "images": the whole images' power (noise plus the particles' signal);
    "background": the power outside cfg.bg_radius(apix) working px (`background_power_sums`)."""
    xp = get_array_module(images)
    s, c = _spectrum_sums(images, cfg, apix)
    return s / xp.maximum(c, 1)


def _spectrum_sums(images, cfg: PreprocessConfig, apix: float | None):
    if cfg.whiten_estimate == "background":
        return background_power_sums(images, cfg.bg_radius(apix))
    if cfg.whiten_estimate == "images":
        return radial_power_sums(images)
    raise ValueError(f"preprocess.whiten_estimate must be images or background, not {cfg.whiten_estimate!r}")


def whiten(images, spectrum):
    """Divide each image's Fourier transform by sqrt of the radial noise spectrum (the mean is
    set to 0); renormalise afterwards. `spectrum` (box//2+1,) may be NumPy or CuPy; the filter is
    built on the images' device."""
    xp = get_array_module(images)
    box = images.shape[-1]
    spec = xp.asarray(asnumpy(spectrum) if xp is np else spectrum, dtype=xp.float64)
    filt = 1.0 / xp.sqrt(xp.maximum(spec[radial_shells(box, xp)], 1e-12))
    filt[0, 0] = 0.0
    return fourier_filter(images, filt.astype(xp.float32))


def whiten_batch(images, spectrum, cfg: PreprocessConfig, work_apix: float):
    """Whiten preprocessed, unmasked images (n, box, box) by `spectrum` (box//2+1,), then
    normalise their background again and apply cfg's mask (float32, the images' device)."""
    x = whiten(images, spectrum)
    return apply_mask(normalise_background(x, cfg.bg_radius(work_apix)), cfg)


def _table_pixel_size(table: ParticleTable) -> float:
    """The one pixel size (Å/px) of the table's particles; refuses a mix."""
    apix_all = table.pixel_size()
    if len(np.unique(np.round(apix_all, 4))) > 1:
        raise ValueError(f"{table.path}: the particles have different pixel sizes {np.unique(apix_all)}; "
                         "preprocess optics groups separately")
    return float(apix_all[0])


def _read_batch(table: ParticleTable, refs: tuple, rows: np.ndarray) -> np.ndarray:
    """Raw images (b, D, D) of the table rows `rows`; refuses non-finite pixels, naming the particle.
    refs: (stack paths, 0-based indices, image names, whole-file flags) of every row."""
    paths, indices, names, whole = refs
    raw = read_images([paths[i] for i in rows], indices[rows], [names[i] for i in rows], whole[rows])
    if not np.isfinite(raw).all():
        bad = rows[np.flatnonzero(~np.isfinite(raw).reshape(len(rows), -1).all(1))[0]]
        raise ValueError(f"{paths[bad]}: particle row {bad + 1} ({names[bad]}) has non-finite pixels (NaN/inf)")
    return raw


class _TableSource:
    """A particle table's rows as preprocessed images: stack references, CTF parameters, CTF
    states and the pixel size (Å/px; one for the whole table), read once."""

    def __init__(self, table: ParticleTable, cfg: PreprocessConfig):
        paths, indices = table.image_refs()
        self.refs = (paths, indices, table.particles["rlnImageName"].astype(str).tolist(), table.whole_file_rows())
        self.table, self.cfg = table, cfg
        self.apix = _table_pixel_size(table)
        self.ctf = CTFParams.from_table(table) if cfg.ctf != "none" else None
        self.states = ctf_states(table)

    def preprocessed(self, rows: np.ndarray, xp, mask: bool):
        """(images (b, box, box) float32 on xp's device, input box in px) of the table rows `rows`."""
        raw = _read_batch(self.table, self.refs, rows)
        x = preprocess_batch(xp.asarray(raw), self.ctf.subset(rows) if self.ctf is not None else None, self.apix,
                             self.cfg, mask=mask, states=self.states[rows])
        return x, raw.shape[-1]


# Particles whose preprocessed images estimate the noise spectrum: evenly spaced over the whole
# set (at low SNR their power is the noise's). 2000 images give each shell of a 32 px box
# thousands of Fourier coefficients, a relative error under 1 %.
SPECTRUM_PARTICLES = 2000


def spectrum_rows(n: int, count: int = SPECTRUM_PARTICLES) -> np.ndarray:
    """Rows (m,) of a set of n particles that estimate its noise spectrum: min(n, count) evenly
    spaced ones, the first and the last included."""
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    return np.unique(np.linspace(0, n - 1, min(n, count)).round().astype(np.int64))


def table_noise_spectrum(table: ParticleTable, cfg: PreprocessConfig, device: str = "auto",
                         count: int = SPECTRUM_PARTICLES) -> np.ndarray:
    """Radial noise power spectrum (box//2+1,) float64 of the set: `estimate_noise_spectrum` of the
    preprocessed, unmasked images of `spectrum_rows(len(table), count)`, read batch by batch."""
    if len(table) == 0:
        raise ValueError(f"{table.path}: no particles to estimate the noise spectrum from")
    xp = choose_array_module(device)
    source = _TableSource(table, cfg)
    rows_all = spectrum_rows(len(table), count)
    sums = counts = None
    for rows in np.array_split(rows_all, -(-rows_all.size // cfg.batch_size)):
        x, box_in = source.preprocessed(rows, xp, mask=False)
        s, c = _spectrum_sums(x, cfg, source.apix * box_in / cfg.box)
        sums, counts = (s, c) if sums is None else (sums + s, counts + c)
    return asnumpy(sums / xp.maximum(counts, 1)).astype(np.float64)


def write_spectrum(path, spectrum: np.ndarray, table: ParticleTable, cfg: PreprocessConfig) -> None:
    """The set's noise spectrum as JSON: per working-box shell power, and how it was measured."""
    meta = {"noise_spectrum": [float(v) for v in spectrum], "box": cfg.box, "estimate": cfg.whiten_estimate,
            "particles_used": int(spectrum_rows(len(table)).size), "particles": len(table),
            "particles_file": str(table.path)}
    write_text(path, json.dumps(meta, indent=2))


def read_spectrum(path, box: int) -> np.ndarray:
    """The noise spectrum (box//2+1,) of a `write_spectrum` file; refuses one of another box or
    with non-finite or non-positive power, naming the file."""
    try:
        meta = json.loads(Path(path).read_text())
        spectrum = np.asarray(meta["noise_spectrum"], dtype=np.float64)
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: not a noise spectrum file ({e})") from None
    if meta.get("box") != box or spectrum.shape != (box // 2 + 1,):
        raise ValueError(f"{path}: the noise spectrum is for a {meta.get('box')} px box, the working box is {box} px")
    if not np.isfinite(spectrum).all() or (spectrum[1:] <= 0).any():
        raise ValueError(f"{path}: the noise spectrum has non-finite or non-positive power")
    return spectrum


def _preprocess_pass(source: _TableSource, out, xp, spectrum):
    """Read, preprocess (and whiten by `spectrum` when cfg.whiten) every particle into `out`
    (n, box, box) float16, batch by batch. Returns the input box in px (None without particles)."""
    cfg, n = source.cfg, len(source.table)
    t0 = time.time()
    box_in = None
    for s in range(0, n, cfg.batch_size):
        rows = np.arange(s, min(n, s + cfg.batch_size))
        x, box_in = source.preprocessed(rows, xp, mask=not cfg.whiten)
        if cfg.whiten:
            x = whiten_batch(x, spectrum, cfg, source.apix * box_in / cfg.box)
        out[rows] = asnumpy(x).astype(np.float16)
        del x
        log.info("preprocessed %d/%d particles (%.0f img/s)", rows[-1] + 1, n, (rows[-1] + 1) / max(time.time() - t0, 1e-9))
    return box_in


def preprocess_table(table: ParticleTable, out_path, cfg: PreprocessConfig, device: str = "auto",
                     spectrum: np.ndarray | None = None) -> dict:
    """Preprocess every particle of `table` into `out_path` (.npy float16, (n, box, box),
    memory-mappable) plus `out_path` with suffix .json (box, pixel size, what was applied).
    Returns the sidecar dict.

    With cfg.whiten, images are whitened by `spectrum` ((box//2+1,), the whole set's, from
    `table_noise_spectrum`); without one, the table's own spectrum is estimated first (the same
    as the whole set's when the table is the whole set).

    Memory: raw images are read `cfg.batch_size` at a time (one batch of raw images, its
    working copies on the device, then written into the memory-mapped output), so memory does
    not grow with the shard."""
    from numpy.lib.format import open_memmap

    out_path = Path(out_path)
    xp = choose_array_module(device)
    n = len(table)
    source = _TableSource(table, cfg)
    if cfg.whiten and spectrum is None and n > 0:
        spectrum = table_noise_spectrum(table, cfg, device)
    with atomic_path(out_path) as tmp:
        out = open_memmap(tmp, mode="w+", dtype=np.float16, shape=(n, cfg.box, cfg.box))
        box_in = _preprocess_pass(source, out, xp, spectrum)
        work_apix = source.apix * (box_in or cfg.box) / cfg.box
        out.flush()
        del out
    meta = _sidecar(n, cfg, box_in, source.apix, work_apix, source.ctf is not None, source.states,
                    spectrum if cfg.whiten else None, xp)
    try:
        write_text(out_path.with_suffix(".json"), json.dumps(meta, indent=2))
    except BaseException:
        out_path.unlink(missing_ok=True)  # no array without its sidecar: nothing half-written
        raise
    return meta


CTF_DONE = {  # what preprocessing does to images in each input state, per correction mode
    "phase_flip": {RAW: "phase flipped", PHASE_FLIPPED: "nothing (already phase flipped)",
                   PREMULTIPLIED: "nothing (premultiplied by the CTF: phases already right)"},
    "wiener": {RAW: "Wiener filtered: CTF / (CTF^2 + 1/snr)", PHASE_FLIPPED: "Wiener filtered: |CTF| / (CTF^2 + 1/snr)",
               PREMULTIPLIED: "Wiener filtered: 1 / (CTF^2 + 1/snr) (already multiplied by the CTF)"},
}


def ctf_record(cfg: PreprocessConfig, has_ctf: bool, states) -> dict:
    """Per input state (raw / phase_flipped / premultiplied, from the optics groups' RELION
    flags): how many particles, and what was done to them."""
    counts = state_counts(states)
    done = CTF_DONE.get(cfg.ctf) if has_ctf else None
    return {state: {"particles": c, "applied": done[state] if done else "nothing (CTF correction off)"}
            for state, c in counts.items()}


def _sidecar(n, cfg, box_in, apix, work_apix, has_ctf, states, spectrum, xp) -> dict:
    """The JSON sidecar of a preprocessed shard: sizes, pixel sizes and every step applied."""
    counts = state_counts(states)
    corrected_raw = has_ctf and counts.get(RAW, 0) > 0
    phases_right = n > 0 and (has_ctf or counts.get(RAW, 0) == 0)
    return {"particles": n, "box": cfg.box, "input_box": box_in, "input_apix_A": apix,
            "apix_A": work_apix, "particle_radius_px": cfg.bg_radius(work_apix), "ctf_correction": cfg.ctf,
            "wiener_snr": cfg.wiener_snr if cfg.ctf == "wiener" else None,
            "ctf_input": ctf_record(cfg, has_ctf, states),
            # what the particles' STAR rows would say about the pixels of this array (RELION's
            # optics label; a Wiener filter also corrects the phases). The export does not add it:
            # these arrays are the working copy, the exported STAR points at the original stacks.
            "star_labels": {"rlnCtfDataArePhaseFlipped": int(phases_right), "rlnImagePixelSize": work_apix,
                            "rlnImageSize": cfg.box},
            "steps": [step for step, on in (
                (f"ctf_{cfg.ctf}", corrected_raw or (has_ctf and cfg.ctf == "wiener")),
                (f"fourier_crop_{box_in}_to_{cfg.box}", True),
                (f"lowpass_{cfg.lowpass_A}A", cfg.lowpass_A > 0),
                (f"normalise_background_r{cfg.bg_radius(work_apix):g}px", True),
                ("whiten", cfg.whiten), (f"soft_mask_r{cfg.mask_radius_px:g}px", cfg.mask_radius_px > 0)) if on],
            "bg_radius_px": cfg.bg_radius(work_apix), "lowpass_A": cfg.lowpass_A or None,
            "mask_radius_px": cfg.mask_radius_px if cfg.mask_radius_px > 0 else None,
            "whitened": cfg.whiten,
            "noise_spectrum": [float(v) for v in asnumpy(spectrum)] if spectrum is not None else None,
            "batch_size": cfg.batch_size, "array_module": xp.__name__, "dtype": "float16"}


# --- command line: `clcluster preprocess` --------------------------------------------------------
def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("particles", help="shard STAR file; with --spectrum-out, the whole particle file (STAR or .cs)")
    p.add_argument("--out", help="output .npy (n, box, box) float16")
    p.add_argument("--noise-spectrum", help="whiten by this set's noise spectrum (JSON from --spectrum-out) "
                                            "instead of the shard's own")
    p.add_argument("--spectrum-out", help="only estimate the set's noise spectrum for whitening, into this JSON")
    p.add_argument("--root", help="project root that relative stack paths are resolved against first")
    p.add_argument("--box", type=int, help="working box in pixels (default: config preprocess.box)")
    add_device(p, "auto: CuPy on a GPU if present, else NumPy")
    add_config(p)


def main(args: argparse.Namespace) -> int:
    from clcluster.io import read_particles

    cfg = run_config(args)
    pc = PreprocessConfig.from_dict(cfg["preprocess"])
    if args.box:
        pc.box = args.box
    if bool(args.out) == bool(args.spectrum_out):
        raise ValueError("give exactly one of --out (preprocess the particles) and --spectrum-out (estimate the noise spectrum)")
    table = read_particles(args.particles, root=args.root or None)
    device = args.device or cfg["device"]
    if args.spectrum_out:
        write_spectrum(args.spectrum_out, table_noise_spectrum(table, pc, device), table, pc)
        log.info("wrote %s: noise spectrum of %d of %d particles", args.spectrum_out, spectrum_rows(len(table)).size, len(table))
        return 0
    spectrum = read_spectrum(args.noise_spectrum, pc.box) if args.noise_spectrum and pc.whiten else None
    meta = preprocess_table(table, args.out, pc, device, spectrum=spectrum)
    log.info("wrote %s: %d particles, box %d px, %.3f Å/px", args.out, meta["particles"], meta["box"], meta["apix_A"])
    return 0

"""Per-shard preprocessing: CTF correction, Fourier crop to the working box, optional low-pass,
background normalisation, optional soft mask and noise whitening → float16 (n, box, box) .npy
(memory-mappable) with a JSON sidecar. NumPy or CuPy, same code; one batch of raw images in
memory at a time."""
from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path

import numpy as np

from .backend import asnumpy, choose_array_module, get_array_module
from .ctf import CTFParams, phase_flip, wiener_filter
from .imageops import circular_mask, fourier_crop, fourier_filter, freq_grid, lowpass, normalise_background
from .io.atomic import atomic_path, write_text
from .io.mrc import read_images
from .io.star import ParticleTable

log = logging.getLogger(__name__)


@dataclasses.dataclass
class PreprocessConfig:
    """See config.schema.yaml `preprocess:`; sizes in pixels of the working box, resolution in Å."""

    box: int = 32
    ctf: str = "phase_flip"
    wiener_snr: float = 0.1
    bg_radius_px: float = -1
    lowpass_A: float = 0.0
    mask_radius_px: float = -1
    whiten: bool = False
    batch_size: int = 512

    @classmethod
    def from_dict(cls, d):
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in (d or {}).items() if k in names})

    def bg_radius(self) -> float:
        return self.bg_radius_px if self.bg_radius_px > 0 else 0.375 * self.box


def preprocess_batch(images, ctf: CTFParams | None, apix: float, cfg: PreprocessConfig):
    """images (n, D, D) at `apix` Å/px → (n, box, box) float32 at apix * D / box, NumPy or CuPy."""
    box_in = images.shape[-1]
    if ctf is not None and cfg.ctf == "phase_flip":
        images = phase_flip(images, ctf, apix)
    elif ctf is not None and cfg.ctf == "wiener":
        images = wiener_filter(images, ctf, apix, cfg.wiener_snr)
    x = fourier_crop(images, cfg.box)
    new_apix = apix * box_in / cfg.box
    if cfg.lowpass_A > 0:
        x = lowpass(x, cfg.lowpass_A, new_apix)
    x = normalise_background(x, cfg.bg_radius())
    if cfg.mask_radius_px > 0:
        x = x * circular_mask(cfg.box, cfg.mask_radius_px, soft_edge=3.0, xp=get_array_module(x))
    return x


def radial_noise_spectrum(images) -> np.ndarray:
    """Radially averaged power spectrum (box//2+1,) of images (n, box, box)."""
    box = images.shape[-1]
    p = (np.abs(np.fft.rfft2(images)) ** 2).mean(axis=0)
    fy, fx = freq_grid(box, 1.0, np)
    shell = np.minimum(np.round(np.sqrt(fx ** 2 + fy ** 2) * box).astype(int), box // 2)
    return np.bincount(shell.ravel(), p.ravel(), minlength=box // 2 + 1) / np.maximum(np.bincount(shell.ravel(), minlength=box // 2 + 1), 1)


def whiten(images, spectrum: np.ndarray):
    """Divide each image's Fourier transform by sqrt of the radial noise spectrum (then renormalise)."""
    box = images.shape[-1]
    fy, fx = freq_grid(box, 1.0, np)
    shell = np.minimum(np.round(np.sqrt(fx ** 2 + fy ** 2) * box).astype(int), box // 2)
    filt = 1.0 / np.sqrt(np.maximum(spectrum[shell], 1e-12))
    filt[0, 0] = 0.0
    return fourier_filter(images, filt.astype(np.float32))


def preprocess_table(table: ParticleTable, out_path, cfg: PreprocessConfig, device: str = "auto") -> dict:
    """Preprocess every particle of `table` into `out_path` (.npy float16, (n, box, box)) plus
    `out_path` with suffix .json (box, pixel size, what was applied). Returns the sidecar dict."""
    out_path = Path(out_path)
    xp = choose_array_module(device)
    n = len(table)
    paths, indices = table.image_refs()
    names = table.particles["rlnImageName"].astype(str).tolist()
    apix_all = table.pixel_size()
    if len(np.unique(np.round(apix_all, 4))) > 1:
        raise ValueError(f"{table.path}: particles of one shard have different pixel sizes {np.unique(apix_all)}; "
                         "preprocess optics groups separately")
    apix = float(apix_all[0])
    ctf_all = CTFParams.from_table(table) if cfg.ctf != "none" else None
    t0 = time.time()
    from numpy.lib.format import open_memmap

    with atomic_path(out_path) as tmp:
        out = open_memmap(tmp, mode="w+", dtype=np.float16, shape=(n, cfg.box, cfg.box))
        box_in = None
        for s in range(0, n, cfg.batch_size):
            rows = np.arange(s, min(n, s + cfg.batch_size))
            raw = read_images([paths[i] for i in rows], indices[rows], [names[i] for i in rows])
            if not np.isfinite(raw).all():
                bad = rows[np.flatnonzero(~np.isfinite(raw).reshape(len(rows), -1).all(1))[0]]
                raise ValueError(f"{paths[bad]}: particle row {bad + 1} ({names[bad]}) has non-finite pixels (NaN/inf)")
            box_in = raw.shape[-1]
            x = preprocess_batch(xp.asarray(raw), ctf_all.subset(rows) if ctf_all is not None else None, apix, cfg)
            out[rows] = asnumpy(x).astype(np.float16)
            log.info("preprocessed %d/%d particles (%.0f img/s)", rows[-1] + 1, n, (rows[-1] + 1) / max(time.time() - t0, 1e-9))
        if cfg.whiten:
            spec = radial_noise_spectrum(np.asarray(out[: min(n, 2000)], dtype=np.float32))
            for s in range(0, n, cfg.batch_size):
                x = whiten(np.asarray(out[s:s + cfg.batch_size], dtype=np.float32), spec)
                out[s:s + cfg.batch_size] = normalise_background(x, cfg.bg_radius()).astype(np.float16)
        out.flush()
        del out
    meta = {"particles": n, "box": cfg.box, "input_box": box_in, "input_apix_A": apix,
            "apix_A": apix * (box_in or cfg.box) / cfg.box, "ctf_correction": cfg.ctf,
            "wiener_snr": cfg.wiener_snr if cfg.ctf == "wiener" else None,
            "bg_radius_px": cfg.bg_radius(), "lowpass_A": cfg.lowpass_A or None,
            "mask_radius_px": cfg.mask_radius_px if cfg.mask_radius_px > 0 else None,
            "whitened": cfg.whiten, "array_module": xp.__name__, "dtype": "float16"}
    write_text(out_path.with_suffix(".json"), json.dumps(meta, indent=2))
    return meta

"""Simulated particle stacks: K well-separated views of a volume, random in-plane rotation and
shift, per-image CTF, white Gaussian noise at a given SNR, with the ground truth kept apart.

SNR of an image = variance of its clean CTF-modulated projection over the whole box divided by
the variance of the added white Gaussian noise.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import re
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import ndimage

from clcluster.core.cli_args import add_config, run_config
from clcluster.core.config import dataclass_from_dict
from clcluster.core.rng import NOISE_OFFSET, VOLUME_OFFSET
from clcluster.image.ctf import CTFParams, apply_ctf
from clcluster.image.imageops import fourier_shift, rotate
from clcluster.io.atomic import atomic_path
from clcluster.io.mrc import read_volume, write_stack
from clcluster.io.star import ParticleTable, write_star
from clcluster.sim.realistic import rotation_matrices

BUILTIN_PREFIX = "builtin:"


# ---------------------------------------------------------------------------------------------
# volumes
def procedural_volume(seed: int, box: int = 64, apix: float = 2.5, n_atoms: int = 420,
                      diameter_A: float | None = None, atom_sigma_A: float = 3.0) -> np.ndarray:
    """A protein-like asymmetric density (box, box, box): Gaussian pseudo-atoms placed along
    random-walk chains (3.8 Å steps) that fill 3-5 compact domains of different sizes, so that
    every seed gives a distinct shape with no symmetry. Deterministic by `seed`."""
    rng = np.random.default_rng(VOLUME_OFFSET + seed)
    diameter_A = 0.4 * box * apix if diameter_A is None else diameter_A
    n_domains = int(rng.integers(3, 6))
    sizes = rng.dirichlet(np.full(n_domains, 2.0)) * n_atoms
    sizes = np.maximum(sizes.astype(int), 20)
    centres = rng.normal(size=(n_domains, 3)) * diameter_A / 5
    centres -= centres.mean(0)
    atoms = []
    for c, m in zip(centres, sizes):
        r_dom = (m / n_atoms) ** (1 / 3) * diameter_A / 2.6
        pos = c.copy()
        for _ in range(m):
            step = rng.normal(size=3)
            pos = pos + 3.8 * step / np.linalg.norm(step)
            d = pos - c
            if np.linalg.norm(d) > r_dom:  # fold the chain back into its domain
                pos = c + d * (r_dom / np.linalg.norm(d)) * 0.9
            atoms.append(pos.copy())
    atoms = np.asarray(atoms) / apix + box // 2
    vol = np.zeros((box, box, box), np.float32)
    idx = np.round(atoms).astype(int)
    keep = np.all((idx >= 0) & (idx < box), axis=1)
    np.add.at(vol, (idx[keep, 2], idx[keep, 1], idx[keep, 0]), 1.0)
    return ndimage.gaussian_filter(vol, atom_sigma_A / apix).astype(np.float32)


log = logging.getLogger(__name__)

def fit_box(volume: np.ndarray, box: int) -> np.ndarray:
    """Crop or zero-pad a volume (centred) to (box, box, box)."""
    out = np.zeros((box,) * 3, np.float32)
    n = volume.shape[0]
    m = min(n, box)
    s, d = n // 2 - m // 2, box // 2 - m // 2
    out[d:d + m, d:d + m, d:d + m] = volume[s:s + m, s:s + m, s:s + m]
    return out


def load_volume(spec: str, box: int, apix: float, volume_apix: float | None = None) -> np.ndarray:
    """A volume (box,)*3 at `apix` Å/px from `builtin:N` or an MRC path (rescaled from its own
    voxel size, or `volume_apix` where the header has none, then cropped/padded to the box)."""
    if spec.startswith(BUILTIN_PREFIX):
        return procedural_volume(int(spec[len(BUILTIN_PREFIX):]), box, apix)
    vol, vs = read_volume(spec)
    vs = volume_apix or vs
    if vs is None:
        raise ValueError(f"{spec}: the map header has no voxel size; give simulate.volume_apix (Å)")
    if vol.ndim != 3 or len(set(vol.shape)) != 1:
        raise ValueError(f"{spec}: expected a cubic 3D map, got shape {vol.shape}")
    if abs(vs - apix) > 1e-3:
        vol = ndimage.zoom(vol, vs / apix, order=1)
    return fit_box(vol, box)


# ---------------------------------------------------------------------------------------------
# views
def euler_to_matrix(rot, tilt, psi) -> np.ndarray:
    """RELION/Xmipp ZYZ Euler angles (degrees) to a 3x3 rotation matrix (Euler_angles2matrix);
    the scalar case of `sim.realistic.rotation_matrices`."""
    return rotation_matrices(rot, tilt, psi)


def view_directions(k: int, min_separation_deg: float, seed: int) -> np.ndarray:
    """K unit viewing directions, each at least `min_separation_deg` from every other one and
    from every other one's antipode (a view and its antipode give mirror-image projections).

    Greedy farthest-point selection among 4000 random candidates; raises if the asked
    separation cannot be met (e.g. K=10 allows about 35 degrees, K=50 about 15)."""
    rng = np.random.default_rng(seed)
    cand = rng.normal(size=(4000, 3))
    cand /= np.linalg.norm(cand, axis=1, keepdims=True)
    chosen = [0]
    sep = np.full(len(cand), np.inf)
    for _ in range(k - 1):
        cosang = np.abs(cand @ cand[chosen[-1]])  # |cos| folds in the antipode
        sep = np.minimum(sep, np.degrees(np.arccos(np.clip(cosang, 0, 1))))
        chosen.append(int(np.argmax(sep)))
    dirs = cand[chosen]
    got = min_pairwise_separation(dirs)
    if k > 1 and got < min_separation_deg:
        raise ValueError(f"cannot place {k} views at least {min_separation_deg} deg apart (best found {got:.1f} deg); "
                         "lower simulate.min_separation_deg or the number of views")
    return dirs


def min_pairwise_separation(dirs: np.ndarray) -> float:
    """Smallest angle (degrees) between two directions or a direction and another's antipode."""
    c = np.abs(dirs @ dirs.T)
    np.fill_diagonal(c, 0)
    return float(np.degrees(np.arccos(np.clip(c.max(), 0, 1)))) if len(dirs) > 1 else 180.0


def direction_to_euler(d: np.ndarray) -> tuple[float, float]:
    """(rot, tilt) in degrees of a unit viewing direction (psi is the in-plane angle)."""
    tilt = np.degrees(np.arccos(np.clip(d[2], -1, 1)))
    rot = np.degrees(np.arctan2(d[1], d[0]))
    return float(rot), float(tilt)


def project(volume: np.ndarray, rot: float, tilt: float) -> np.ndarray:
    """Projection (box, box) of a volume (z, y, x) along the direction given by (rot, tilt):
    the volume is rotated by the Euler matrix (psi = 0) and summed along z."""
    box = volume.shape[0]
    c = box // 2
    g = np.arange(box) - c
    z, y, x = np.meshgrid(g, g, g, indexing="ij")
    pts = np.stack([x.ravel(), y.ravel(), z.ravel()])  # rotated frame (x, y, z)
    src = euler_to_matrix(rot, tilt, 0.0).T @ pts  # back to the volume frame
    vals = ndimage.map_coordinates(volume, [src[2] + c, src[1] + c, src[0] + c], order=1, mode="constant")
    return vals.reshape(box, box, box).sum(axis=0).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# stacks
@dataclasses.dataclass
class SimulationConfig:
    """What to simulate. Units: Å, degrees, kV, mm, pixels."""

    volumes: tuple[str, ...] = ("builtin:0",)
    views: int = 10
    images_per_view: int = 150
    box: int = 64
    apix: float = 2.5
    snr: float = 0.05
    max_shift_px: float = 3.0
    min_separation_deg: float = 30.0
    defocus_min_A: float = 10000.0
    defocus_max_A: float = 25000.0
    astigmatism_max_A: float = 500.0
    voltage_kv: float = 300.0
    cs_mm: float = 2.7
    amplitude_contrast: float = 0.1
    bfactor: float = 0.0
    volume_apix: float | None = None
    stack_size: int = 500
    seed: int = 0
    mode: str = "grid"  # grid (K discrete views, white noise) | realistic (see realistic.py)
    realistic: dict = dataclasses.field(default_factory=dict)  # realistic.RealisticConfig keys

    @classmethod
    def from_dict(cls, d: dict) -> "SimulationConfig":
        d = dict(d)
        if "volumes" in d:
            d["volumes"] = tuple(d["volumes"])
        return dataclass_from_dict(cls, d)


@dataclasses.dataclass
class Simulation:
    images: np.ndarray  # (n, box, box) float32 noisy
    clean: np.ndarray  # (n, box, box) float32, CTF-modulated, before noise
    ctf: CTFParams
    truth: pd.DataFrame  # one row per image: class, volume, view, rot, tilt, psi, shifts
    noise_sigma: np.ndarray  # (n,)
    projections: np.ndarray  # (classes, box, box) centred clean projections (no CTF)


def simulate_clean(cfg: SimulationConfig) -> Simulation:
    """Everything but the noise (clean, CTF-modulated images; noise added by `add_noise`)."""
    rng = np.random.default_rng(cfg.seed)
    dirs = view_directions(cfg.views, cfg.min_separation_deg, cfg.seed)
    projs, rows = [], []
    for v, spec in enumerate(cfg.volumes):
        vol = load_volume(spec, cfg.box, cfg.apix, cfg.volume_apix)
        for k, d in enumerate(dirs):
            rot, tilt = direction_to_euler(d)
            projs.append(project(vol, rot, tilt))
            rows.append((v, k, rot, tilt))
    projs = np.stack(projs)
    projs /= projs.std(axis=(1, 2)).mean()
    n_cls, m = len(projs), cfg.images_per_view
    cls = np.repeat(np.arange(n_cls), m)
    n = cls.size
    psi = rng.uniform(0, 360, n)
    shifts = rng.uniform(-cfg.max_shift_px, cfg.max_shift_px, (n, 2))
    du = rng.uniform(cfg.defocus_min_A, cfg.defocus_max_A, n)
    dv = du - rng.uniform(0, cfg.astigmatism_max_A, n)
    ang = rng.uniform(0, 180, n)
    ctf = CTFParams(du, dv, ang, np.full(n, cfg.voltage_kv), np.full(n, cfg.cs_mm),
                    np.full(n, cfg.amplitude_contrast), np.zeros(n), np.full(n, cfg.bfactor))
    clean = np.empty((n, cfg.box, cfg.box), np.float32)
    for s in range(0, n, 500):
        b = slice(s, min(n, s + 500))
        img = rotate(projs[cls[b]], psi[b])
        img = fourier_shift(img, shifts[b])
        clean[b] = apply_ctf(img, ctf.subset(np.arange(b.start, b.stop)), cfg.apix)
    meta = np.asarray(rows)
    truth = pd.DataFrame({
        "class": cls, "volume": meta[cls, 0].astype(int), "view": meta[cls, 1].astype(int),
        "rot_deg": meta[cls, 2], "tilt_deg": meta[cls, 3], "psi_deg": psi,
        "shift_x_px": shifts[:, 0], "shift_y_px": shifts[:, 1], "defocus_u_A": du,
    })
    return Simulation(clean, clean, ctf, truth, np.zeros(n), projs)


def add_noise(sim: Simulation, snr: float, seed: int) -> Simulation:
    """A copy of `sim` with white Gaussian noise of variance var(clean image)/snr per image."""
    rng = np.random.default_rng(seed + NOISE_OFFSET)
    sigma = np.sqrt(sim.clean.var(axis=(1, 2)) / snr).astype(np.float32)
    noisy = sim.clean + rng.standard_normal(sim.clean.shape, dtype=np.float32) * sigma[:, None, None]
    return dataclasses.replace(sim, images=noisy.astype(np.float32), noise_sigma=sigma)


def simulate(cfg: SimulationConfig) -> Simulation:
    """The stack of `cfg.mode`: grid (discrete views, white noise) or realistic."""
    if cfg.mode == "realistic":
        from clcluster.sim.realistic import simulate_realistic

        vol = load_volume(cfg.volumes[0], cfg.box, cfg.apix, cfg.volume_apix)
        noisy, clean, ctf, truth, sigma = simulate_realistic(cfg, cfg.realistic, vol)
        return Simulation(noisy, clean, ctf, truth, sigma, np.zeros((0, cfg.box, cfg.box), np.float32))
    if cfg.mode != "grid":
        raise ValueError(f"simulate.mode must be grid or realistic, not {cfg.mode!r}")
    return add_noise(simulate_clean(cfg), cfg.snr, cfg.seed)


def particle_table(sim: Simulation, cfg: SimulationConfig, stack_names: list[str]) -> ParticleTable:
    """RELION 3.1 optics + particles for a simulation whose stacks are `stack_names`."""
    n = len(sim.images)
    optics = pd.DataFrame({
        "rlnOpticsGroup": [1], "rlnOpticsGroupName": ["opticsGroup1"],
        "rlnAmplitudeContrast": [cfg.amplitude_contrast], "rlnSphericalAberration": [cfg.cs_mm],
        "rlnVoltage": [cfg.voltage_kv], "rlnImagePixelSize": [cfg.apix], "rlnImageSize": [cfg.box],
        "rlnImageDimensionality": [2],
    })
    names, mics = [], []
    for i in range(n):
        s, j = divmod(i, cfg.stack_size)
        names.append(f"{j + 1:06d}@{stack_names[s]}")
        mics.append(f"sim_micrograph_{s:04d}.mrc")
    particles = pd.DataFrame({
        "rlnImageName": names, "rlnMicrographName": mics,
        "rlnDefocusU": sim.ctf.defocus_u, "rlnDefocusV": sim.ctf.defocus_v,
        "rlnDefocusAngle": sim.ctf.defocus_angle, "rlnPhaseShift": np.zeros(n),
        "rlnCtfBfactor": np.full(n, cfg.bfactor), "rlnOpticsGroup": np.ones(n, dtype=int),
    })
    return ParticleTable(particles=particles, optics=optics)


def write_simulation(sim: Simulation, cfg: SimulationConfig, out_dir, name: str = "particles") -> Path:
    """Write `out_dir/{name}.star`, stacks `out_dir/Stacks/{name}_NNN.mrcs` and the truth
    `out_dir/{name}_truth.csv`. Returns the STAR path."""
    out_dir = Path(out_dir)
    n = len(sim.images)
    stack_names = []
    for s in range(0, n, cfg.stack_size):
        rel = f"Stacks/{name}_{s // cfg.stack_size:03d}.mrcs"
        write_stack(out_dir / rel, sim.images[s:s + cfg.stack_size], cfg.apix)
        stack_names.append(rel)
    table = particle_table(sim, cfg, stack_names)
    truth = sim.truth.copy()
    truth.insert(0, "rlnImageName", table.particles["rlnImageName"])
    truth["snr"] = cfg.snr
    truth["noise_sigma"] = sim.noise_sigma
    with atomic_path(out_dir / f"{name}_truth.csv") as tmp:
        truth.to_csv(tmp, index=False)
    star = out_dir / f"{name}.star"
    write_star(star, table)
    return star


def truth_path(star_path) -> Path:
    """Where `write_simulation` put the truth for a STAR file."""
    p = Path(star_path)
    return p.with_name(re.sub(r"\.star$", "", p.name) + "_truth.csv")


# --- command line: `clcluster simulate` ---------------------------------------------------------
def add_realistic_options(p: argparse.ArgumentParser) -> None:
    """The realistic mode's command-line options (also `clcluster benchmark --mode realistic`)."""
    p.add_argument("--particles", type=int, help="realistic mode: picks in the stack (particles and junk)")
    p.add_argument("--junk-fraction", type=float, help="realistic mode: fraction of junk picks (0-0.4 typical)")
    p.add_argument("--orientations", choices=["uniform", "preferred"], help="realistic mode: view distribution")
    p.add_argument("--max-offset-fraction", type=float, help="realistic mode: pick offset radius, fraction of the box")


def realistic_overrides(rc: dict, args: argparse.Namespace) -> dict:
    """simulate.realistic settings with the command line's realistic-mode options applied."""
    for key in ("particles", "junk_fraction", "orientations", "max_offset_fraction"):
        if getattr(args, key, None) is not None:
            rc[key] = getattr(args, key)
    return rc


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out-dir", required=True, help="output folder")
    p.add_argument("--name", default="particles", help="file name stem (default: particles)")
    p.add_argument("--views", type=int, help="viewing directions K per volume")
    p.add_argument("--images-per-view", type=int, help="images per view")
    p.add_argument("--snr", type=float, help="signal-to-noise ratio: var(clean CTF image) / var(noise), per image")
    p.add_argument("--box", type=int, help="box size (pixels)")
    p.add_argument("--apix", type=float, help="pixel size (Å/px)")
    p.add_argument("--max-shift-px", type=float, help="random shift uniform in [-max, max] pixels per axis")
    p.add_argument("--volume", action="append", help="builtin:N or an MRC map (repeat for several)")
    p.add_argument("--seed", type=int, help="random seed (default: config seed)")
    p.add_argument("--mode", choices=["grid", "realistic"], help="grid: discrete views, white noise; realistic: "
                   "continuous views, junk, coloured noise, off-centre picks (default: config simulate.mode)")
    add_realistic_options(p)
    add_config(p)


def main(args: argparse.Namespace) -> int:
    """Writes NAME.star (RELION 3.1), Stacks/NAME_NNN.mrcs and NAME_truth.csv; prints the STAR path."""
    cfg = run_config(args)
    sim_cfg = dict(cfg["simulate"])
    for key in ("views", "images_per_view", "snr", "box", "apix", "max_shift_px"):
        if getattr(args, key) is not None:
            sim_cfg[key] = getattr(args, key)
    if args.volume:
        sim_cfg["volumes"] = args.volume
    sim_cfg["seed"] = cfg["seed"] if args.seed is None else args.seed
    if args.mode:
        sim_cfg["mode"] = args.mode
    sim_cfg["realistic"] = realistic_overrides(dict(sim_cfg.get("realistic") or {}), args)
    sc = SimulationConfig.from_dict(sim_cfg)
    if sc.mode == "realistic":
        log.info("simulating a realistic stack of %d picks (%.0f %% junk, %s views), box %d px at %.2f Å/px, SNR %g",
                 sc.realistic["particles"], 100 * sc.realistic["junk_fraction"], sc.realistic["orientations"],
                 sc.box, sc.apix, sc.snr)
    else:
        log.info("simulating %d volume(s) x %d views x %d images, box %d px at %.2f Å/px, SNR %g",
                 len(sc.volumes), sc.views, sc.images_per_view, sc.box, sc.apix, sc.snr)
    print(write_simulation(simulate(sc), sc, args.out_dir, args.name))
    return 0

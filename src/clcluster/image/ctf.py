"""The contrast transfer function as RELION computes it, batched, NumPy or CuPy.

Units: defocus U/V in Å (positive = underfocus), astigmatism angle in degrees, voltage in kV,
spherical aberration Cs in mm, amplitude contrast as a fraction, phase shift in degrees,
B-factor in Å². Values live on the rFFT grid (box, box//2+1), unshifted layout.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from clcluster.core.backend import asnumpy, get_array_module
from clcluster.image.imageops import fourier_filter, freq_grid

CTF_LABELS = ("rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle", "rlnVoltage",
              "rlnSphericalAberration", "rlnAmplitudeContrast")

# What the particle images already are, from RELION's per-optics-group flags:
#   "raw": as recorded (image = CTF * signal + noise);
#   "phase_flipped" (_rlnCtfDataArePhaseFlipped 1): image = sign(CTF) * raw;
#   "premultiplied" (_rlnCtfDataAreCtfPremultiplied 1, written by RELION 4/5 and WarpTools):
#       image = CTF * raw, so its phases are already right and it carries CTF^2 * signal.
RAW, PHASE_FLIPPED, PREMULTIPLIED = "raw", "phase_flipped", "premultiplied"
CTF_STATE_LABELS = {PHASE_FLIPPED: "rlnCtfDataArePhaseFlipped", PREMULTIPLIED: "rlnCtfDataAreCtfPremultiplied"}


SIGN_CONVENTION = ("defocus in Å, positive = underfocus (RELION's convention, also CTFFIND's, Gctf's and "
                   "cryoSPARC's)")


def negative_defocus_message(table, defocus_u, defocus_v) -> str | None:
    """Why negative defocus values cannot be used (None when all are >= 0)."""
    with np.errstate(invalid="ignore"):
        neg = np.flatnonzero((np.asarray(defocus_u) < 0) | (np.asarray(defocus_v) < 0))
    if not neg.size:
        return None
    i = int(neg[0])
    return (f"{neg.size} of {len(defocus_u)} particles have negative defocus (e.g. row {i + 1}, {table.image_name(i)}: "
            f"_rlnDefocusU {defocus_u[i]:g} Å, _rlnDefocusV {defocus_v[i]:g} Å). clcluster assumes {SIGN_CONVENTION}; "
            "with negative values the CTF correction would invert the images' contrast. If the tool that wrote "
            "them uses the opposite sign, negate both columns; if these particles are really overfocus, exclude them")


def electron_wavelength(voltage_kv):
    """Relativistic electron wavelength in Å for an acceleration voltage in kV."""
    v = np.asarray(voltage_kv, dtype=np.float64) * 1e3
    return 12.2643247 / np.sqrt(v * (1.0 + v * 0.978466e-6))


@dataclasses.dataclass
class CTFParams:
    """Per-particle CTF parameters; every field is an array of length n (or a scalar).

    The parameters are small and live on the host: NumPy arrays (CuPy arrays are accepted and
    copied to the host with `asnumpy`); `ctf_2d` builds the CTF itself on the images' device."""

    defocus_u: np.ndarray
    defocus_v: np.ndarray
    defocus_angle: np.ndarray
    voltage: np.ndarray = 300.0
    cs: np.ndarray = 2.7
    amplitude_contrast: np.ndarray = 0.1
    phase_shift: np.ndarray = 0.0
    bfactor: np.ndarray = 0.0

    def __len__(self):
        return np.atleast_1d(asnumpy(self.defocus_u)).shape[0]

    def subset(self, rows) -> "CTFParams":
        return CTFParams(**{f.name: np.broadcast_to(np.asarray(asnumpy(getattr(self, f.name)), dtype=np.float64),
                                                          (len(self),))[np.asarray(asnumpy(rows))]
                            for f in dataclasses.fields(self)})

    @classmethod
    def from_table(cls, table) -> "CTFParams":
        """CTF parameters of each particle of a ParticleTable (optics values merged in).

        Raises ParticleFileError naming the missing columns."""
        from clcluster.io.star import ParticleFileError

        missing = [c for c in CTF_LABELS if table.column(c) is None]
        if missing:
            raise ParticleFileError(
                f"{table.path}: CTF correction is on but the particles lack {', '.join('_' + m for m in missing)}; "
                "add them or set preprocess.ctf: none")
        n = len(table)
        get = lambda label, default: np.asarray(table.column(label, default), dtype=np.float64).reshape(n)
        message = negative_defocus_message(table, get("rlnDefocusU", None), get("rlnDefocusV", None))
        if message:
            raise ParticleFileError(f"{table.path}: {message}")
        return cls(get("rlnDefocusU", None), get("rlnDefocusV", None), get("rlnDefocusAngle", None),
                   get("rlnVoltage", None), get("rlnSphericalAberration", None), get("rlnAmplitudeContrast", None),
                   get("rlnPhaseShift", 0.0), get("rlnCtfBfactor", 0.0))


def _flag(table, label) -> np.ndarray:
    v = table.column(label)
    if v is None:
        return np.zeros(len(table), bool)
    num = np.asarray([str(x).strip().strip("\"'").lower() for x in v], dtype=object)
    return np.isin(num, ["1", "1.0", "true", "yes"])


def ctf_states(table) -> np.ndarray:
    """(n,) str: RAW, PHASE_FLIPPED or PREMULTIPLIED for each particle of a ParticleTable, from
    the flags of its optics group (or its own row in RELION 3.0 files). Premultiplied wins where
    both flags are set (its phases are corrected as well)."""
    states = np.full(len(table), RAW, dtype=object)
    states[_flag(table, CTF_STATE_LABELS[PHASE_FLIPPED])] = PHASE_FLIPPED
    states[_flag(table, CTF_STATE_LABELS[PREMULTIPLIED])] = PREMULTIPLIED
    return states


def state_counts(states) -> dict:
    """{state: number of particles} for the states present."""
    values, counts = np.unique(np.asarray(states, dtype=object).astype(str), return_counts=True)
    return {str(v): int(c) for v, c in zip(values, counts)}


def to_ctf_weighted(ctf, states, xp=np):
    """The Fourier factor (n, ...) that turns each image into CTF * raw image: CTF for raw
    images, |CTF| for phase-flipped ones, 1 for premultiplied ones (they already are)."""
    st = np.asarray(states, dtype=object) if states is not None else np.full(ctf.shape[0], RAW, dtype=object)
    shape = (ctf.shape[0],) + (1,) * (ctf.ndim - 1)
    flipped = xp.asarray((st == PHASE_FLIPPED).reshape(shape))
    premult = xp.asarray((st == PREMULTIPLIED).reshape(shape))
    out = xp.where(flipped, xp.abs(ctf), ctf)
    return xp.where(premult, xp.ones_like(ctf), out)


def ctf_2d(params: CTFParams, box: int, apix: float, xp=np, rfft: bool = True):
    """CTF values (n, box, box//2+1) (or (n, box, box) with rfft=False) for n particles.

    RELION's definition (ctf.h): CTF = -sin(chi) * exp(-B s^2 / 4) with
    chi = pi*lambda*df*s^2 + pi/2*Cs*lambda^3*s^4 - phase_shift - atan(Q0/sqrt(1-Q0^2)),
    where df = -(U+V)/2 - (U-V)/2*cos(2(azimuth - angle)) (negative for underfocus), so the
    CTF equals Q0 at s = 0 and is positive at low frequency."""
    n = len(params)
    host = lambda v: np.broadcast_to(np.asarray(asnumpy(v), dtype=np.float64), (n,))
    as_col = lambda v: xp.asarray(host(v).astype(np.float32)).reshape(n, 1, 1)  # one small host→device copy
    lam = as_col(electron_wavelength(host(params.voltage)))
    cs = as_col(host(params.cs) * 1e7)
    q0 = np.clip(host(params.amplitude_contrast), 0, 0.999999)
    k3 = as_col(np.arctan(q0 / np.sqrt(1 - q0 ** 2)))
    k5 = as_col(np.deg2rad(host(params.phase_shift)))
    du, dv = as_col(params.defocus_u), as_col(params.defocus_v)
    ang = as_col(np.deg2rad(host(params.defocus_angle)))
    bfactor = host(params.bfactor)
    bf = as_col(bfactor)
    fy, fx = freq_grid(box, apix, xp, rfft=rfft)
    s2 = (fx ** 2 + fy ** 2)[None]
    azimuth = xp.arctan2(fy, fx)[None]
    # RELION: deltaf = -(avg + dev*cos(2(azimuth - angle))) with U/V positive for underfocus
    deltaf = -(0.5 * (du + dv) + 0.5 * (du - dv) * xp.cos(2 * (azimuth - ang)))
    arg = np.pi * lam * deltaf * s2 + (np.pi / 2) * cs * lam ** 3 * s2 ** 2 - k5 - k3
    ctf = -xp.sin(arg)
    if np.any(bfactor != 0):
        ctf = ctf * xp.exp(-bf / 4.0 * s2)
    return ctf.astype(xp.float32)


def apply_ctf(images, params: CTFParams, apix: float):
    """Convolve images (n, D, D) with their CTF (multiply in Fourier space)."""
    xp = get_array_module(images)
    return fourier_filter(images, ctf_2d(params, images.shape[-1], apix, xp))


def correction_filter(params: CTFParams, box: int, apix: float, mode: str = "phase_flip", snr: float = 0.1, xp=np,
                      states=None):
    """The Fourier-space CTF correction (n, box, box//2+1) on `xp`.

    Raw images: sign(CTF) for "phase_flip", CTF / (CTF^2 + 1/snr) for "wiener". `states` (n,)
    (see `ctf_states`) keeps already corrected images from being corrected twice: phase-flipped
    and premultiplied images get 1 for "phase_flip" (their phases are right), and for "wiener"
    |CTF| / (CTF^2 + 1/snr) (phase-flipped) or 1 / (CTF^2 + 1/snr) (premultiplied), so every
    image ends up as the same Wiener estimate."""
    c = ctf_2d(params, box, apix, xp)
    if mode == "phase_flip":
        f = xp.sign(c)
        if states is not None:
            done = xp.asarray((np.asarray(states, dtype=object) != RAW).reshape(-1, 1, 1))
            f = xp.where(done, xp.ones_like(f), f)
        return f
    if mode == "wiener":
        return to_ctf_weighted(c, states, xp) / (c * c + 1.0 / snr)
    raise ValueError(f"unknown CTF correction {mode!r} (phase_flip | wiener | none)")


def phase_flip(images, params: CTFParams, apix: float):
    """Multiply each image's Fourier transform by the sign of its CTF."""
    xp = get_array_module(images)
    return fourier_filter(images, correction_filter(params, images.shape[-1], apix, "phase_flip", xp=xp))


def wiener_filter(images, params: CTFParams, apix: float, snr: float = 0.1):
    """Per-image Wiener filter CTF / (CTF^2 + 1/snr): corrects phases and boosts, with damping
    set by the assumed spectral SNR, the attenuated amplitudes. Its sign is the CTF's, so it
    corrects phases exactly as `phase_flip` does. A low `snr` (<< 1) makes it close to a
    multiplication by the CTF (damps the zeros' neighbourhoods, no amplitude boost); a high one
    approaches 1/CTF (boosts noise near the zeros)."""
    xp = get_array_module(images)
    return fourier_filter(images, correction_filter(params, images.shape[-1], apix, "wiener", snr, xp))

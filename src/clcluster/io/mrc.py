"""MRC stacks through `mrcfile`: memory-mapped batched reads grouped by stack, atomic writes.

What a stack file may be:
- an MRC stack or single image (read through a memory map);
- a stack whose header claims more images than the file holds (WarpTools/M write such files
  when a job is cut short): the complete images at the start of the file are readable, a
  particle asking for one past them is refused with the readable range;
- refused with a `StackError` that says what the file is and how to fix it: a gzip or bzip2
  compressed file (whatever its name), a file that is not MRC, and, where `_rlnImageName`
  names the file without an `index@` (the whole file is one particle), a file of several
  images or a 3D volume (subtomograms, tilt series: clcluster classifies 2D particle images).
"""
from __future__ import annotations

import warnings
from collections import defaultdict
from pathlib import Path

import mrcfile
import numpy as np
from mrcfile.utils import data_dtype_from_header

from clcluster.io.atomic import atomic_path


class StackError(ValueError):
    """A stack that cannot be read; the message names the file, the particle and the problem."""


MRC_HEADER_BYTES = 1024
COMPRESSED_MAGIC = {b"\x1f\x8b": ("gzip", "gunzip -k"), b"BZ": ("bzip2", "bunzip2 -k")}


def compression(path) -> tuple[str, str] | None:
    """(format, decompress command) when the file starts with gzip/bzip2 magic bytes, else None
    (the name does not matter: gzip data named .mrcs is found too)."""
    try:
        with open(path, "rb") as f:
            head = f.read(3)
    except OSError:
        return None
    if head[:2] == b"\x1f\x8b":
        return COMPRESSED_MAGIC[b"\x1f\x8b"]
    if head == b"BZh":
        return COMPRESSED_MAGIC[b"BZ"]
    return None


def compressed_message(path, kind: tuple[str, str]) -> str:
    fmt, cmd = kind
    p = Path(path)
    plain = p.with_suffix("") if p.suffix.lower() in (".gz", ".bz2") else p.with_name(p.name + ".decompressed.mrcs")
    return (f"{p}: {fmt}-compressed file, not a plain MRC stack (stacks are read through a memory map, which "
            f"needs the uncompressed file); decompress it ({cmd} {p.name}, or {cmd.split()[0]} -c {p.name} > "
            f"{plain.name}) and name the decompressed file in _rlnImageName")


class PartialStack:
    """A stack whose file holds fewer complete images than its header claims: the readable
    images (n_readable, ny, nx) as a read-only memory map, the header as mrcfile read it.

    Used like an open mrcfile object (`.data`, `.header`, context manager)."""

    def __init__(self, path: Path, header, n_claimed: int, n_readable: int, ny: int, nx: int, dtype):
        self.path, self.header = path, header
        self.n_claimed, self.n_readable = n_claimed, n_readable
        offset = MRC_HEADER_BYTES + int(header.nsymbt)
        self.data = (np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=(n_readable, ny, nx))
                     if n_readable > 0 else np.empty((0, ny, nx), dtype=dtype))

    def close(self):
        self.data = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _partial(path: Path, mrc) -> PartialStack | None:
    """The readable start of a stack whose data are shorter than its header says, or None."""
    h = mrc.header
    try:
        nx, ny, nz = int(h.nx), int(h.ny), int(h.nz)
        dtype = data_dtype_from_header(h)
    except (ValueError, TypeError):
        return None
    per_image = nx * ny * dtype.itemsize
    if nx <= 0 or ny <= 0 or nz <= 0 or per_image == 0:
        return None
    body = path.stat().st_size - MRC_HEADER_BYTES - int(h.nsymbt)
    if body < 0:
        return None
    return PartialStack(path, h, nz, min(nz, body // per_image), ny, nx, dtype)


def open_stack(path):
    """Memory-map an MRC stack read-only. Data shape (n, ny, nx) (a single 2D image gives n=1).

    Headers written by other tools (no `MAP ` word, stack flagged as a volume, no pixel size)
    are accepted; a file shorter than its header says gives a `PartialStack` of the complete
    images it holds (`n_readable` of `n_claimed`); compressed files are refused."""
    path = Path(path)
    if not path.exists():
        raise StackError(f"{path}: stack file not found")
    kind = compression(path)
    if kind is not None:
        raise StackError(compressed_message(path, kind))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            mrc = mrcfile.mmap(path, mode="r", permissive=True)
    except Exception as e:
        raise StackError(f"{path}: not a readable MRC file ({type(e).__name__}: {e})") from None
    if mrc.data is None:
        part = _partial(path, mrc)
        mrc.close()
        if part is None or part.n_readable == 0:
            raise StackError(f"{path}: corrupt MRC header or data shorter than the header says (truncated file?)")
        return part
    return mrc


def readable_images(mrc) -> tuple[int, int]:
    """(images the file holds completely, images its header claims) of an open stack."""
    n = stack_data(mrc).shape[0]
    return (mrc.n_readable, mrc.n_claimed) if isinstance(mrc, PartialStack) else (n, n)


def stack_data(mrc) -> np.ndarray:
    """The (n, ny, nx) view of an open stack."""
    data = mrc.data
    return data[None] if data.ndim == 2 else data


def stack_shape(path) -> tuple[int, int, int]:
    """(n, ny, nx) of a stack without reading its pixels."""
    with open_stack(path) as mrc:
        return tuple(stack_data(mrc).shape)


WHOLE_FILE_FIX = ("name one image per particle as index@stack (1-based), or, for subtomograms, extract 2D "
                  "particles (or project the subtomograms) and classify those: clcluster classifies 2D particle images")


def whole_file_problem(mrc) -> str | None:
    """What a file named without `index@` (the whole file as one particle image) is when it is
    not one 2D image ("a 3D volume of ...", "a stack of N images ..."), or None when it is one."""
    data = mrc.data
    if data.ndim == 2 or data.shape[0] == 1:
        return None
    n, ny, nx = data.shape
    if not isinstance(mrc, PartialStack) and mrc.is_volume():
        return f"a 3D volume of {nx}×{ny}×{n} voxels (a subtomogram or map; or a stack flagged as a volume)"
    return f"a stack of {n} images of {nx}×{ny} px (e.g. the tilt images of one subtomogram)"


def read_images(paths, indices, names=None, whole=None) -> np.ndarray:
    """Images (n, ny, nx) float32 for particle i = image `indices[i]` (0-based) of `paths[i]`.

    Stacks are opened once each (grouped), read through a memory map, in the order given.
    `names` (e.g. the `_rlnImageName` values) only improve error messages. `whole` (n,) bool:
    particles whose name has no `index@`, i.e. the file must be a single 2D image (a stack of
    several images or a volume is refused, never read as its first image)."""
    groups: dict[Path, list[int]] = defaultdict(list)
    for i, p in enumerate(paths):
        groups[Path(p)].append(i)
    whole = np.zeros(len(paths), bool) if whole is None else np.asarray(whole, bool)
    out = None
    for path, rows in groups.items():
        with open_stack(path) as mrc:
            who = lambda r: f" ({names[r]})" if names is not None else ""
            if whole[rows].any():
                what = whole_file_problem(mrc)
                if what is not None:
                    r = rows[int(np.flatnonzero(whole[rows])[0])]
                    raise StackError(f"{path}: particle {r + 1}{who(r)}: the file is {what}, but _rlnImageName "
                                     f"names the whole file (no index@) as one particle; {WHOLE_FILE_FIX}")
            data = stack_data(mrc)
            idx = np.asarray(indices)[rows]
            bad = np.flatnonzero((idx < 0) | (idx >= data.shape[0]))
            if bad.size:
                r = rows[bad[0]]
                n_ok, n_claimed = readable_images(mrc)
                held = (f"the stack holds {data.shape[0]} images" if n_ok == n_claimed else
                        f"the file holds only images 1-{n_ok} of the {n_claimed} its header claims (truncated)")
                raise StackError(f"{path}: particle {r + 1}{who(r)} asks for image {idx[bad[0]] + 1} but {held}")
            if out is None:
                out = np.empty((len(paths),) + data.shape[1:], dtype=np.float32)
            elif data.shape[1:] != out.shape[1:]:
                raise StackError(f"{path}: box {data.shape[1:]} differs from {out.shape[1:]} of the other stacks")
            order = np.argsort(idx, kind="stable")  # sequential access within the file
            out[np.asarray(rows)[order]] = data[idx[order]]
    if out is None:
        out = np.empty((0, 0, 0), dtype=np.float32)
    return out


def write_stack(path, images, apix: float | None = None) -> None:
    """Write images (n, ny, nx) as an MRC stack (.mrcs) atomically; `apix` in Å/px."""
    images = np.asarray(images, dtype=np.float32)
    with atomic_path(path) as tmp:
        with mrcfile.new(tmp, overwrite=True) as mrc:
            mrc.set_data(images)
            mrc.set_image_stack()
            if apix is not None:
                mrc.voxel_size = (apix, apix, apix)
            mrc.update_header_stats()


def read_volume(path) -> tuple[np.ndarray, float | None]:
    """A 3D map (nz, ny, nx) float32 and its voxel size in Å (None where the header has none)."""
    with mrcfile.open(path, permissive=True) as mrc:
        vol = np.asarray(mrc.data, dtype=np.float32).copy()
        vs = float(mrc.voxel_size.x)
    return vol, (vs if vs > 0 else None)


def write_volume(path, volume, apix: float) -> None:
    with atomic_path(path) as tmp:
        with mrcfile.new(tmp, overwrite=True) as mrc:
            mrc.set_data(np.asarray(volume, dtype=np.float32))
            mrc.voxel_size = (apix, apix, apix)

"""MRC stacks through `mrcfile`: memory-mapped batched reads grouped by stack, atomic writes."""
from __future__ import annotations

import warnings
from collections import defaultdict
from pathlib import Path

import mrcfile
import numpy as np

from .atomic import atomic_path


class StackError(ValueError):
    """A stack that cannot be read; the message names the file, the particle and the problem."""


def open_stack(path):
    """Memory-map an MRC stack read-only. Data shape (n, ny, nx) (a single 2D image gives n=1).

    Headers written by other tools (no `MAP ` word, stack flagged as a volume, no pixel size)
    are accepted; a file shorter than its header says is refused."""
    path = Path(path)
    if not path.exists():
        raise StackError(f"{path}: stack file not found")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            mrc = mrcfile.mmap(path, mode="r", permissive=True)
    except Exception as e:
        raise StackError(f"{path}: not a readable MRC file ({type(e).__name__}: {e})") from None
    if mrc.data is None:
        mrc.close()
        raise StackError(f"{path}: corrupt MRC header or data shorter than the header says (truncated file?)")
    return mrc


def stack_data(mrc) -> np.ndarray:
    """The (n, ny, nx) view of an open stack."""
    data = mrc.data
    return data[None] if data.ndim == 2 else data


def stack_shape(path) -> tuple[int, int, int]:
    """(n, ny, nx) of a stack without reading its pixels."""
    with open_stack(path) as mrc:
        return tuple(stack_data(mrc).shape)


def read_images(paths, indices, names=None) -> np.ndarray:
    """Images (n, ny, nx) float32 for particle i = image `indices[i]` (0-based) of `paths[i]`.

    Stacks are opened once each (grouped), read through a memory map, in the order given.
    `names` (e.g. the `_rlnImageName` values) only improve error messages."""
    groups: dict[Path, list[int]] = defaultdict(list)
    for i, p in enumerate(paths):
        groups[Path(p)].append(i)
    out = None
    for path, rows in groups.items():
        with open_stack(path) as mrc:
            data = stack_data(mrc)
            idx = np.asarray(indices)[rows]
            bad = np.flatnonzero((idx < 0) | (idx >= data.shape[0]))
            if bad.size:
                r = rows[bad[0]]
                who = f" ({names[r]})" if names is not None else ""
                raise StackError(f"{path}: particle {r + 1}{who} asks for image {idx[bad[0]] + 1} "
                                 f"but the stack holds {data.shape[0]} images")
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

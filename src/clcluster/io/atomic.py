"""Atomic file writes: write under a temporary name in the same folder, rename when complete.

An interrupted step therefore never leaves a file that looks finished; an OSError while writing
(permissions, full disk, file size limit) is re-raised naming the target path.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path, suffix: str | None = None):
    """Yield a temporary path next to `path`; rename it onto `path` if the block succeeds.

    `suffix` defaults to the target's own suffix so that writers that infer the format
    from the extension (mrcfile, matplotlib, numpy) keep working.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = path.suffix if suffix is None else suffix
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".part" + suffix, dir=path.parent)
    os.close(fd)
    os.unlink(tmp)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.errno is not None and e.filename in (None, tmp, str(tmp)):
            # name the file the user asked for, not the temporary one (write errors often carry no name)
            raise type(e)(e.errno, e.strerror or str(e), str(path)) from e
        raise


def write_text(path, text: str) -> None:
    """Write a text file atomically."""
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text)


def save_npy(path, array) -> None:
    """np.save atomically (the temporary name keeps the .npy suffix)."""
    import numpy as np

    with atomic_path(path) as tmp:
        np.save(tmp, array)

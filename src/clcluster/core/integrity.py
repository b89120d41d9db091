"""The integrity invariant of every output: each input particle exactly once."""
from __future__ import annotations

import numpy as np


class IntegrityError(RuntimeError):
    """An output would lose or duplicate a particle."""


def check_complete(n_input: int, rows: np.ndarray, what: str) -> None:
    """Every input row 0..n_input-1 exactly once in `rows` (n,), else IntegrityError naming
    `what` and the first missing and duplicated rows (1-based)."""
    rows = np.asarray(rows)
    counts = np.bincount(rows[(rows >= 0) & (rows < n_input)], minlength=n_input) if len(rows) else np.zeros(n_input, int)
    missing, dup = np.flatnonzero(counts == 0), np.flatnonzero(counts > 1)
    extra = int(((rows < 0) | (rows >= n_input)).sum())
    if missing.size or dup.size or extra:
        raise IntegrityError(f"{what}: {missing.size} input particles missing (first rows {(missing[:5] + 1).tolist()}), "
                             f"{dup.size} duplicated (first rows {(dup[:5] + 1).tolist()}), {extra} unknown")

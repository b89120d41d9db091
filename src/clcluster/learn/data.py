"""Batches from memory-mapped preprocessed shards (float16 (n, box, box) .npy files)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from clcluster.core.rng import TRAIN_EPOCH, TRAIN_SUBSET


class ShardSet:
    """Several preprocessed shards seen as one array of particles, memory-mapped (nothing is
    loaded until indexed). Indexing with a slice or an index array returns float32 (b, box, box)."""

    def __init__(self, paths):
        self.paths = [Path(p) for p in paths]
        self.arrays = [np.load(p, mmap_mode="r") for p in self.paths]
        sizes = [a.shape[0] for a in self.arrays]
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        boxes = {a.shape[1:] for a in self.arrays}
        if len(boxes) > 1:
            raise ValueError(f"preprocessed shards have different boxes {boxes}: {self.paths}")
        self.box = self.arrays[0].shape[-1] if self.arrays else 0

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def shape(self) -> tuple:
        """(n, box, box), as for a NumPy stack."""
        return (len(self), self.box, self.box)

    def take(self, indices) -> np.ndarray:
        """float32 images for global particle indices (any order), reading each shard once."""
        indices = np.asarray(indices, dtype=np.int64)
        out = np.empty((len(indices), self.box, self.box), np.float32)
        shard = np.searchsorted(self.offsets, indices, side="right") - 1
        for s in np.unique(shard):
            sel = np.flatnonzero(shard == s)
            local = indices[sel] - self.offsets[s]
            order = np.argsort(local)
            out[sel[order]] = self.arrays[s][local[order]]
        return out

    def __getitem__(self, item) -> np.ndarray:
        if isinstance(item, slice):
            return self.take(np.arange(len(self))[item])
        return self.take(item)


def random_rows(n: int, size: int, key) -> np.ndarray:
    """Sorted rows of a seeded random subset of `size` of n particles (all n when size <= 0 or
    size >= n); `key` seeds NumPy's generator, e.g. [seed, stream]."""
    if size <= 0 or n <= size:
        return np.arange(n)
    return np.sort(np.random.default_rng(key).choice(n, size, replace=False))


class RowView:
    """A subset of an image array-like (NumPy array, memory map or ShardSet) seen as an array:
    view[i] is images[rows[i]]; slicing reads only the rows it names."""

    def __init__(self, images, rows):
        self.images, self.rows = images, np.asarray(rows, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def shape(self) -> tuple:
        return (len(self.rows), *self.images.shape[1:])

    def __getitem__(self, item) -> np.ndarray:
        return np.asarray(self.images[self.rows[item]], dtype=np.float32)


class BatchPlan:
    """Which particles each training step sees: epochs of a seeded permutation (optionally of a
    random subset), cut into global batches; rank r of w takes the r-th of w equal parts.
    Deterministic from (seed, step), so a resumed run sees the same batches."""

    def __init__(self, n: int, batch_size: int, seed: int, subset: int | None = None, rank: int = 0, world: int = 1):
        if batch_size % world:
            raise ValueError(f"global batch {batch_size} is not divisible by {world} ranks")
        self.n, self.bs, self.seed, self.rank, self.world = n, batch_size, seed, rank, world
        self.pool = random_rows(n, subset or 0, [seed, TRAIN_SUBSET])
        self.steps_per_epoch = max(1, len(self.pool) // batch_size)
        self._epoch, self._perm = None, None

    def batch(self, step: int) -> np.ndarray:
        epoch, i = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            self._perm = self.pool[np.random.default_rng([self.seed, TRAIN_EPOCH, epoch]).permutation(len(self.pool))]
            self._epoch = epoch
        bs = min(self.bs, len(self.pool))
        glob = self._perm[i * bs:(i + 1) * bs]
        part = len(glob) // self.world
        return glob[self.rank * part:(self.rank + 1) * part]

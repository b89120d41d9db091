"""Restarts of a refinement: random starting partitions and the best of several runs.

The cluster step and the benchmark's refinement from random partitions both run a refinement
from several starts and keep the one with the highest objective; this module is that loop.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import numpy as np

from clcluster.core.rng import restart_key

Result = TypeVar("Result")


def random_partition(seed: int, restart: int, k: int, n: int) -> np.ndarray:
    """Labels (n,) in [0, k) of restart `restart`'s random starting partition (stream `restart_key`)."""
    return np.random.default_rng(restart_key(seed, restart)).integers(0, k, n)


def best_restart(run: Callable[[int], Result], restarts: int, objective: Callable[[Result], float],
                 log: Callable[[int, float, Result], None] | None = None) -> Result:
    """run(r) for r = 0 .. restarts-1; the result with the highest objective(result) (the first
    on ties). log(r, objective, result), when given, is called after each run."""
    best = None
    for r in range(restarts):
        result = run(r)
        key = objective(result)
        if log is not None:
            log(r, key, result)
        if best is None or key > objective(best):
            best = result
    return best

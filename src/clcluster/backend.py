"""Array-module and device choice: NumPy on CPU, CuPy on a GPU, one code path.

Every image operation in the package takes arrays of either module and looks up
`xp = get_array_module(x)`; this module owns the optional CuPy import.
"""
from __future__ import annotations

import numpy as np

try:  # CuPy is an optional extra (pip install .[gpu])
    import cupy as cp  # type: ignore
except Exception:  # ModuleNotFoundError, or a CuPy without a usable CUDA runtime
    cp = None


def gpu_available() -> bool:
    """True when CuPy imports and sees at least one CUDA device."""
    if cp is None:
        return False
    try:
        return cp.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


def get_array_module(x=None):
    """Return `cupy` for CuPy arrays (or the strings "gpu"/"cuda"), else `numpy`."""
    if isinstance(x, str):
        if x in ("gpu", "cuda", "cupy"):
            if not gpu_available():
                raise RuntimeError("a GPU array module was asked for, but CuPy or a CUDA device is missing")
            return cp
        return np
    if cp is not None and isinstance(x, cp.ndarray):
        return cp
    return np


def choose_array_module(device: str = "auto"):
    """Array module for a step: "auto" picks CuPy when a GPU is usable, "cpu" forces NumPy."""
    if device == "cpu":
        return np
    if device == "auto":
        return cp if gpu_available() else np
    return get_array_module("gpu")


def asnumpy(x) -> np.ndarray:
    """Host copy of a NumPy or CuPy array (no copy for NumPy)."""
    if cp is not None and isinstance(x, cp.ndarray):
        return cp.asnumpy(x)
    return np.asarray(x)


def to_torch(x):
    """Hand an array to PyTorch without a copy (DLPack for CuPy, from_numpy for NumPy)."""
    import torch

    if cp is not None and isinstance(x, cp.ndarray):
        return torch.from_dlpack(x)
    return torch.from_numpy(np.ascontiguousarray(x))


def torch_device(device: str = "auto"):
    """torch.device for "auto" (CUDA when available), "cpu" or "cuda[:i]"."""
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def make_rng(xp, seed):
    """A seeded Generator of the array module (numpy.random or cupy.random)."""
    return xp.random.default_rng(seed)

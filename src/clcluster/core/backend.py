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
    """Array module for a step: "auto" picks CuPy when a GPU is usable, "cpu" forces NumPy.
    With CuPy, this rank's GPU (`local_rank() % visible`, as `rank_device`) becomes CuPy's
    current device."""
    if device == "cpu":
        return np
    xp = (cp if gpu_available() else np) if device == "auto" else get_array_module("gpu")
    if xp is not np:
        cp.cuda.Device(local_rank() % cp.cuda.runtime.getDeviceCount()).use()
    return xp


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


def local_rank(env=None) -> int:
    """This process's index among the ranks of its node: LOCAL_RANK (torchrun, or exported by
    `distributed.init_from_env`), else SLURM_LOCALID inside an srun step, else 0."""
    import os

    env = os.environ if env is None else env
    for key in ("LOCAL_RANK", "SLURM_LOCALID"):
        value = env.get(key, "")
        if value.isdigit():
            return int(value)
    return 0


def rank_device(device: str = "auto", env=None):
    """The torch.device this process (one rank, or the only process) computes on.

    "cpu" → CPU; "auto" → CPU without CUDA; "auto"/"cuda" with CUDA → GPU
    `local_rank % visible`, where visible is torch.cuda.device_count() (which honours
    CUDA_VISIBLE_DEVICES): with one GPU bound per task (srun --gpus-per-task, or a site's
    per-task CUDA_VISIBLE_DEVICES) every rank uses cuda:0; with all of a node's N GPUs visible
    to each rank, rank i of the node uses cuda:i%N. An explicit "cuda:i" (or "meta") is kept.
    The one place where a rank's device is chosen (train, embed, cluster, export)."""
    import torch

    if device not in ("auto", "cuda"):
        return torch.device(device)
    if not torch.cuda.is_available():
        if device == "cuda":
            raise RuntimeError("device cuda was asked for, but torch sees no CUDA device")
        return torch.device("cpu")
    visible = max(1, torch.cuda.device_count())
    return torch.device("cuda", local_rank(env) % visible)


def use_device(tdev) -> None:
    """Make `tdev` the current CUDA device of torch and of CuPy (no-op for CPU), so that
    tensors and CuPy arrays created without an explicit device land on this rank's GPU."""
    import torch

    if getattr(tdev, "type", "cpu") != "cuda":
        return
    index = tdev.index or 0
    torch.cuda.set_device(index)
    if cp is not None:
        cp.cuda.Device(index).use()


def select_device(device: str = "auto"):
    """`rank_device(device)`, made current for torch and CuPy (`use_device`). Returns it."""
    tdev = rank_device(device)
    use_device(tdev)
    return tdev


def torch_device(device: str = "auto"):
    """torch.device for "auto", "cpu" or "cuda[:i]": this rank's device (`rank_device`)."""
    return rank_device(device)


def make_rng(xp, seed):
    """A seeded Generator of the array module (numpy.random or cupy.random)."""
    return xp.random.default_rng(seed)

"""Array-module choice and zero-copy hand-over to PyTorch. The CuPy cases run only on a GPU
machine (skipped with "CuPy/GPU not available" elsewhere)."""
import numpy as np
import pytest

from clcluster.core import backend
from clcluster.core.backend import asnumpy, choose_array_module, get_array_module, gpu_available, make_rng, to_torch


def test_numpy_dispatch():
    assert get_array_module(np.zeros(3)) is np
    assert get_array_module([1, 2]) is np and get_array_module(None) is np
    assert get_array_module("cpu") is np and choose_array_module("cpu") is np
    a = np.arange(4.0)
    assert asnumpy(a) is a  # no copy for NumPy


def test_auto_and_gpu_requests_follow_availability():
    if gpu_available():
        assert choose_array_module("auto") is backend.cp and get_array_module("cuda") is backend.cp
    else:
        assert choose_array_module("auto") is np
        with pytest.raises(RuntimeError, match="CuPy or a CUDA device is missing"):
            get_array_module("gpu")
        with pytest.raises(RuntimeError):
            choose_array_module("cuda")


def test_to_torch_shares_numpy_memory():
    a = np.zeros((2, 3), np.float32)
    t = to_torch(a)
    a[0, 0] = 5.0
    assert t[0, 0].item() == 5.0 and t.dtype.is_floating_point


def test_make_rng_is_seeded(xp):
    a, b = make_rng(xp, 7).uniform(0, 1, 5), make_rng(xp, 7).uniform(0, 1, 5)
    assert get_array_module(a) is xp and np.array_equal(asnumpy(a), asnumpy(b))


def test_to_torch_of_cupy_is_zero_copy_on_the_gpu(xp):
    if xp is np:
        pytest.skip("CuPy-only: DLPack hand-over")
    a = xp.zeros((2, 3), dtype=xp.float32)
    t = to_torch(a)
    assert t.is_cuda and t.data_ptr() == a.data.ptr
    a[0, 0] = 3.0
    assert t[0, 0].item() == 3.0

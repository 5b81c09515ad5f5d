"""Shared fixtures: the devices a test runs on, and the GPU skip."""
import numpy as np
import pytest

import minidl


def gpu_available():
    return minidl.gpu_count() > 0


def pytest_collection_modifyitems(config, items):
    if gpu_available():
        return
    skip = pytest.mark.skip(reason="needs CuPy and a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(params=["cpu", pytest.param("cuda:0", marks=pytest.mark.gpu)])
def dev(request):
    """Run a test once on the CPU and, where there is a GPU, once on CUDA."""
    return minidl.device(request.param)


@pytest.fixture
def rng():
    return np.random.default_rng(12345)

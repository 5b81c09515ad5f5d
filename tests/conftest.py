"""Shared fixtures: the devices a test runs on, the GPU skip, and emulated GPUs.

`pytest --emulate-gpus 2` runs the GPU tests on two emulated GPUs (minidl_emulator),
so they run on any machine; every test there also fails on a stream hazard.
Without the option (and without MINIDL_EMULATE_GPUS) they run on real GPUs, or
are skipped where there are none.
"""
import os
import sys

import numpy as np
import pytest

import minidl


def pytest_addoption(parser):
    parser.addoption("--emulate-gpus", type=int, metavar="N",
                     help="run the GPU tests on N emulated GPUs (sets MINIDL_EMULATE_GPUS=N)")


# The tests run this checkout's emulator (emulator/), also in subprocesses, rather than the copy that
# `pip install -e '.[test]'` put in site-packages, which does not follow edits
EMULATOR_SOURCE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "emulator")
sys.path.insert(0, EMULATOR_SOURCE)
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [EMULATOR_SOURCE, os.environ.get("PYTHONPATH")]))


def pytest_configure(config):
    gpus = config.getoption("--emulate-gpus")
    if gpus is not None:
        os.environ["MINIDL_EMULATE_GPUS"] = str(gpus)  # subprocesses (the CLI tests) inherit it


def emulated():
    return bool(os.environ.get("MINIDL_EMULATE_GPUS"))


def gpu_available():
    return minidl.gpu_count() > 0


def pytest_report_header(config):
    if emulated():
        return f"GPUs: {os.environ['MINIDL_EMULATE_GPUS']} emulated (minidl_emulator)"
    return f"GPUs: {minidl.gpu_count()} real"


def pytest_collection_modifyitems(config, items):
    if not gpu_available():
        skip = pytest.mark.skip(reason="needs CuPy and a CUDA GPU (or --emulate-gpus 2)")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)
        return
    if emulated():
        from minidl_emulator.cuda import memory_limit
        for item in items:
            marker = item.get_closest_marker("gpu_memory")
            if marker is not None and marker.args[0] * 2 ** 30 > memory_limit():
                item.add_marker(pytest.mark.skip(
                    reason=f"needs {marker.args[0]} GiB of GPU memory; an emulated GPU has "
                           f"{memory_limit() / 2 ** 30:g} (MINIDL_EMULATE_GPU_MEMORY); runs on a real GPU"))


@pytest.fixture(autouse=True)
def no_stream_hazards():
    """On emulated GPUs, a test fails on any stream hazard, even one its code caught or found at free."""
    yield
    if emulated():
        import gc

        from minidl_emulator import streams
        gc.collect()  # frees found unreachable now are checked now, in this test
        found = streams.take_hazards()
        if found:
            pytest.fail("stream hazards on the emulated GPUs:\n" + "\n".join(f"- {m} (at {w})" for m, w in found),
                        pytrace=False)


@pytest.fixture(params=["cpu", pytest.param("cuda:0", marks=pytest.mark.gpu)])
def dev(request):
    """Run a test once on the CPU and, where there is a GPU, once on CUDA."""
    return minidl.device(request.param)


@pytest.fixture
def rng():
    return np.random.default_rng(12345)


@pytest.fixture
def exact_fp32():
    """GPU GEMMs in exact FP32 for the test (the default is TF32), for comparisons with the CPU's float32."""
    from minidl.precision import DEFAULT_PRECISION, set_precision
    set_precision("fp32")
    yield
    set_precision(DEFAULT_PRECISION)


@pytest.fixture
def at_precision():
    """at_precision(name) sets the process's precision for the test; the default is restored after."""
    from minidl.precision import DEFAULT_PRECISION, set_precision
    yield set_precision
    set_precision(DEFAULT_PRECISION)


@pytest.fixture
def charged():
    """charged() -> the emulated GPUs' ledger entries since the test's start (run with --emulate-gpus 2)."""
    from minidl_emulator.ledger import LEDGER
    mark = LEDGER.mark()
    return lambda: LEDGER.since(mark)


@pytest.fixture
def fresh_peer_access(monkeypatch):
    """The emulated GPUs with no peer access enabled yet, and minidl's record of it cleared (restored after)."""
    from minidl.functions import transfer
    from minidl_emulator import cuda
    monkeypatch.setattr(cuda, "_peer_enabled", set())
    monkeypatch.setattr(transfer, "_peer_pairs", {})


@pytest.fixture
def no_peer_access(fresh_peer_access, monkeypatch):
    """Emulated GPUs that cannot reach each other's memory (a PCIe board without peer access)."""
    monkeypatch.setenv("MINIDL_EMULATE_PEER_ACCESS", "0")

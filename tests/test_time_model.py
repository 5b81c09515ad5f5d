"""The emulated GPUs' cost ledger charges operations as CuPy runs them, and the roofline reproduces its anchors.

Run with `pytest --emulate-gpus 2` (the ledger is the emulator's).
"""
import os

import numpy as np
import pytest

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not os.environ.get("MINIDL_EMULATE_GPUS"),
                                 reason="checks the GPU emulator's ledger: run with --emulate-gpus 2")]


@pytest.fixture
def cp():
    from minidl.device import cupy
    return cupy()


def _device(cp, *shape, dtype=np.float32):
    return cp.asarray(np.arange(np.prod(shape), dtype=dtype).reshape(shape) / 7)


def test_batched_matmul_is_fp32_with_its_copies_whatever_cupy_tf32_says(cp, charged, monkeypatch):
    monkeypatch.setenv("CUPY_TF32", "1")
    a, b = _device(cp, 2, 3, 4), _device(cp, 2, 5, 4)
    start = len(charged())
    result = a @ b.swapaxes(-1, -2)  # CuPy's matmul: ascontiguousarray(b), then gemmStridedBatchedEx in FP32
    entries = charged()[start:]
    assert [(e.kind, e.unit, e.hidden) for e in entries] == [("copy", "d2d", True), ("gemm", "fp32-simt", False)]
    assert entries[0].nbytes == 2 * b.nbytes  # read and written
    assert entries[1].flops == 2 * 2 * 3 * 5 * 4
    np.testing.assert_allclose(result.get(), a.get() @ b.get().swapaxes(-1, -2), rtol=1e-6)


def test_batched_float16_is_upcast_and_copied_back(cp, charged):
    a, b = _device(cp, 2, 3, 4, dtype=np.float16), _device(cp, 2, 4, 5, dtype=np.float16)
    start = len(charged())
    a @ b
    entries = charged()[start:]
    assert [(e.kind, e.unit) for e in entries] == [("copy", "d2d"), ("copy", "d2d"), ("gemm", "fp32-simt"),
                                                   ("copy", "d2d")]
    assert entries[0].nbytes == a.nbytes + a.size * 4  # float16 read, float32 written


@pytest.fixture
def compute_type(cp):
    """compute_type(t) sets CuPy's compute type of float32 for the test (COMPUTE_TYPE_TBD: CUPY_TF32 decides);
    the one before is restored after (minidl sets it at each GEMM)."""
    before = cp._core.get_compute_type(cp.float32)
    yield lambda t: cp._core.set_compute_type(cp.float32, t)
    cp._core.set_compute_type(cp.float32, before)


@pytest.mark.parametrize("tf32, unit", [("0", "fp32-simt"), ("1", "tf32")])
def test_2d_matmul_and_dot_use_tf32_only_with_cupy_tf32(cp, charged, monkeypatch, compute_type, tf32, unit):
    compute_type(cp._core._routines_linalg.COMPUTE_TYPE_TBD)
    monkeypatch.setenv("CUPY_TF32", tf32)
    x, w = _device(cp, 3, 4), _device(cp, 5, 4)
    start = len(charged())
    x @ w.T, cp.dot(x, w.T), x.dot(w.T), cp.matmul(x, w.T)
    assert [(e.kind, e.unit) for e in charged()[start:]] == [("gemm", unit)] * 4


@pytest.mark.parametrize("name, unit", [("COMPUTE_TYPE_TF32", "tf32"), ("COMPUTE_TYPE_DEFAULT", "fp32-simt"),
                                        ("COMPUTE_TYPE_PEDANTIC", "fp32-simt")])
def test_the_compute_type_set_decides_2d_float32_gemms_and_tf32_rounds_their_inputs(cp, charged, monkeypatch,
                                                                                     compute_type, name, unit):
    monkeypatch.setenv("CUPY_TF32", "0")  # a compute type set wins over the variable, as in CuPy
    compute_type(getattr(cp._core._routines_linalg, name))
    x = cp.asarray(np.full((2, 3), 1 + 2 ** -11 + 2 ** -13, np.float32))  # 1.0 + 1.5 TF32 half-ulps
    w = cp.asarray(np.ones((3, 2), np.float32))
    start = len(charged())
    product = (x @ w).get()
    assert [(e.kind, e.unit) for e in charged()[start:] if e.kind == "gemm"] == [("gemm", unit)]
    expected = 3 * (1 + 2 ** -10) if unit == "tf32" else 3 * (1 + 2 ** -11 + 2 ** -13)
    np.testing.assert_allclose(product, expected, rtol=1e-7)
    start = len(charged())
    x[None] @ w[None]  # batched: the data type as compute type, whatever is set
    assert [e.unit for e in charged()[start:] if e.kind == "gemm"] == ["fp32-simt"]


def test_2d_float16_runs_on_tensor_cores(cp, charged):
    x, w = _device(cp, 3, 4, dtype=np.float16), _device(cp, 4, 5, dtype=np.float16)
    start = len(charged())
    x @ w
    assert [(e.kind, e.unit) for e in charged()[start:]] == [("gemm", "fp16")]


def test_transposed_2d_operand_is_not_copied_but_a_strided_one_is(cp, charged):
    x, w = _device(cp, 3, 8), _device(cp, 5, 4)
    start = len(charged())
    x[:, :4] @ w.T  # a column slice is neither C- nor F-contiguous: _mat_to_cublas_contiguous copies it
    x.T.T[:, :4].T.T  # views: nothing
    kinds = [(e.kind, e.hidden) for e in charged()[start:]]
    assert kinds == [("copy", True), ("gemm", False)]
    start = len(charged())
    w.T.T @ w.T, w.T @ w  # transposes are cuBLAS flags
    assert [e.kind for e in charged()[start:]] == ["gemm", "gemm"]


def test_bytes_and_flops_of_known_small_ops_are_exact(cp, charged):
    a, b = _device(cp, 3, 4), _device(cp, 4, 5)
    start = len(charged())
    total = a + a  # reads 2 x 48 bytes, writes 48
    a @ b  # (3x4) @ (4x5): 2*3*4*5 FLOPs; 12 + 20 + 15 floats
    total.sum()
    total.get()
    entries = charged()[start:]
    assert [(e.kind, e.flops, e.nbytes) for e in entries[:3]] == [("elementwise", 12, 144), ("gemm", 120, 188),
                                                                  ("reduction", 12, 52)]
    assert [(e.kind, e.unit, e.nbytes) for e in entries[3:]] == [("copy", "d2h", 48), ("sync", "", 0)]


def test_peer_copy_is_charged_to_the_link(cp, charged):
    a = _device(cp, 16)
    written = cp.cuda.Event()
    written.record()
    with cp.cuda.Device(1):
        b = cp.empty(16, np.float32)
        cp.cuda.get_current_stream().wait_event(written)
        start = len(charged())
        b.data.copy_from_device_async(a.data, a.nbytes)
        cp.cuda.get_current_stream().synchronize()  # before a goes back to GPU 0's pool
    assert [(e.kind, e.unit, e.device) for e in charged()[start:]] == [("copy", "peer", 1), ("sync", "", 1)]


def test_roofline_of_one_operation():
    from minidl_emulator import roofline
    from minidl_emulator.ledger import Entry
    h100 = roofline.GPUS["h100"]
    gemm = Entry("gemm", "tf32", "g", flops=10 ** 12, nbytes=10 ** 6, device=0, stream=0)
    expected = roofline.LAUNCH_S + 1e12 / (494.7e12 * roofline.GEMM_EFFICIENCY["tf32"])
    assert roofline.op_seconds(gemm, h100) == pytest.approx(expected)
    copy = Entry("copy", "d2d", "c", flops=0, nbytes=2 * 10 ** 9, device=0, stream=0)
    assert roofline.op_seconds(copy, h100) == pytest.approx(roofline.LAUNCH_S + 2e9 / (3.35e12 * 0.8))


@pytest.mark.parametrize("unit, anchor_ms", [("tf32", 3.82), ("fp16", 2.07)])
def test_roofline_reproduces_the_gemm_anchors(unit, anchor_ms):
    from minidl_emulator import roofline
    predicted = roofline.gemm_seconds(roofline.CALIBRATION_GEMMS, roofline.GPUS["h100"], unit)
    assert predicted * 1e3 == pytest.approx(anchor_ms, rel=0.03)


def test_ledger_keeps_a_bounded_window():
    from minidl_emulator.ledger import Entry, Ledger
    ledger = Ledger(keep=3)
    mark = ledger.mark()
    entries = [Entry("copy", "d2d", str(i), 0, 8, 0, 0) for i in range(4)]
    for entry in entries[:2]:
        ledger.add(entry)
    assert ledger.since(mark) == entries[:2]
    later = ledger.mark()
    for entry in entries[2:]:
        ledger.add(entry)
    assert ledger.since(later) == entries[2:]
    with pytest.raises(ValueError, match="keeps the last 3"):
        ledger.since(mark)

"""minidl/cpu/openblas.py: the transpose by OpenBLAS's omatcopy against NumPy's, and NumPy's where it cannot
serve; the Winograd layouts built on it the same either way."""
import numpy as np
import pytest

from minidl.cpu import openblas
from minidl.functions import winograd


def without_omatcopy(monkeypatch):
    monkeypatch.setattr(openblas, "_OMATCOPY", {np.dtype(np.float32): None, np.dtype(np.float64): None})


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("rows, cols", [(1, 1), (7, 3), (48, 729), (129, 5)])
def test_transpose_matches_numpy(rng, dtype, rows, cols):
    a = rng.standard_normal((rows, cols)).astype(dtype)
    out = np.full((cols, rows), np.nan, dtype=dtype)
    openblas.transpose(a, out)
    np.testing.assert_array_equal(out, a.T)


def test_transpose_reads_and_writes_rows_with_gaps(rng):
    """Rows of a wider array (a leading dimension larger than the row) on both sides."""
    a = rng.standard_normal((6, 10)).astype(np.float32)
    out = np.zeros((9, 8), dtype=np.float32)
    openblas.transpose(a[:, 2:7], out[2:7, 1:7])
    expected = np.zeros((9, 8), dtype=np.float32)
    expected[2:7, 1:7] = a[:, 2:7].T
    np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize("a, out", [
    (np.arange(12, dtype=np.int64).reshape(3, 4), np.zeros((4, 3), dtype=np.int64)),  # no omatcopy for it
    (np.arange(24, dtype=np.float32).reshape(3, 8)[:, ::2], np.zeros((4, 3), dtype=np.float32)),  # strided row
    (np.arange(12, dtype=np.float32).reshape(3, 4), np.zeros((4, 3), dtype=np.float64)),  # another dtype
    (np.broadcast_to(np.arange(4, dtype=np.float32), (3, 4)), np.zeros((4, 3), dtype=np.float32)),  # rows at 0
    (np.arange(12, dtype=np.float32).reshape(3, 4)[::-1], np.zeros((4, 3), dtype=np.float32)),  # reversed rows
    (np.arange(12, dtype=np.float32).reshape(3, 4), np.zeros((3, 4), dtype=np.float32).T[::-1]),  # out reversed
    (np.arange(12, dtype=np.float32).reshape(1, 12)[:, :4], np.zeros((4, 1), dtype=np.float32)),  # one row
])
def test_what_omatcopy_cannot_take_numpy_copies(a, out):
    """omatcopy needs rows that are contiguous and apart; given others it refuses and copies nothing (the
    output would be left as it was), so those go to NumPy."""
    openblas.transpose(a, out)
    np.testing.assert_array_equal(out, a.T)


def test_a_read_only_output_is_refused():
    out = np.zeros((4, 3), dtype=np.float32)
    out.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        openblas.transpose(np.ones((3, 4), dtype=np.float32), out)


def test_omatcopy_is_found_with_numpys_openblas():
    """NumPy's wheels carry OpenBLAS (CI installs them): where it is there, the fast path must be found."""
    try:
        blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"]["name"]
    except (TypeError, KeyError):  # NumPy before 1.25 has no such report
        pytest.skip("this NumPy does not say which BLAS it was built on")
    if "openblas" not in blas:
        pytest.skip(f"this NumPy is built on {blas}")
    openblas.transpose(np.ones((2, 3), dtype=np.float32), np.empty((3, 2), dtype=np.float32))
    assert openblas._OMATCOPY[np.dtype(np.float32)] is not None


@pytest.mark.parametrize("pad, rows, cols", [(0, 7, 6), (1, 9, 8), (2, 12, 11), (0, 9, 6)])
def test_channels_last_layouts_are_the_same_with_and_without_omatcopy(rng, monkeypatch, pad, rows, cols):
    x = rng.standard_normal((3, 5, 7, 6)).astype(np.float32)
    b = rng.standard_normal(5).astype(np.float32)

    def both_ways():
        x_last = winograd.to_channels_last(x, pad, rows, cols)
        return x_last, winograd.from_channels_last(x_last, pad, 7, 6, np.empty_like(x), b)
    fast = both_ways()
    without_omatcopy(monkeypatch)
    for got, want in zip(fast, both_ways()):
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(fast[1], x + b.reshape(5, 1, 1))  # and the round trip is x, plus b

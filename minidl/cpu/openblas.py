"""The OpenBLAS that NumPy loaded, for two things NumPy does not offer: its thread count
(cpu.threads holds it to one thread inside side_by_side's calls) and omatcopy, an out-of-place
transpose faster than NumPy's strided copy (the Winograd tiles' change of layout).

The library is found among those mapped into the process (/proc/self/maps) and called through
ctypes, as threadpoolctl does; where there is none (another BLAS, not Linux) function() gives None.
Library users on the CPU should set OPENBLAS_THREAD_TIMEOUT=4 before NumPy is imported, as the
`minidl` command does: OpenBLAS's idle workers otherwise spin on the cores that cpu.threads needs.
"""
import ctypes
from typing import Any, Callable, List, Optional

import numpy as np

_library = []  # [] until looked up, then [(library, integer type, spelling)] or [None]


def _find():
    try:
        with open("/proc/self/maps") as maps:
            paths = sorted({line.split()[-1] for line in maps if "openblas" in line.rsplit("/", 1)[-1]})
    except OSError:
        return None
    for path in paths:
        try:
            library = ctypes.CDLL(path)
        except OSError:
            continue
        # NumPy's wheels carry scipy-openblas, its names prefixed and (with 64-bit integers) suffixed 64_; a
        # system OpenBLAS has neither, or only the suffix
        for spelling in ("scipy_{}64_", "scipy_{}", "{}64_", "{}"):
            config = getattr(library, spelling.format("openblas_get_config"), None)
            if config is not None and hasattr(library, spelling.format("openblas_get_num_threads")):
                config.restype, config.argtypes = ctypes.c_char_p, []
                # the integer width is the build's, which the spelling does not always tell
                integer = ctypes.c_int64 if b"USE64BITINT" in (config() or b"") else ctypes.c_int
                return library, integer, spelling
    return None


def function(name: str, restype: Any, argtypes: List[Any]) -> Optional[Callable[..., Any]]:
    """OpenBLAS's function `name` (as a plain OpenBLAS spells it) with its types, or None. In argtypes, `int`
    stands for the library's integer type. Looked up on first use (NumPy has loaded OpenBLAS by then)."""
    if not _library:
        _library.append(_find())
    if _library[0] is None:
        return None
    library, integer, spelling = _library[0]
    found = getattr(library, spelling.format(name), None)
    if found is not None:
        found.restype = restype
        found.argtypes = [integer if kind is int else kind for kind in argtypes]
    return found


_ROW_MAJOR, _TRANSPOSE = 101, 112  # CBLAS's enum values
_OMATCOPY = {}  # dtype -> the function, or None


def transpose(a: np.ndarray, out: np.ndarray) -> None:
    """out[...] = a.T for 2-D float32 or float64 arrays whose rows are contiguous, by omatcopy; else by NumPy."""
    if a.dtype not in _OMATCOPY:
        letter = {np.dtype(np.float32): "s", np.dtype(np.float64): "d"}.get(a.dtype)
        scalar = ctypes.c_float if letter == "s" else ctypes.c_double
        _OMATCOPY[a.dtype] = letter and function(f"cblas_{letter}omatcopy", None, [
            ctypes.c_int, ctypes.c_int, int, int, scalar, ctypes.c_void_p, int, ctypes.c_void_p, int])
    omatcopy = _OMATCOPY[a.dtype]
    rows, cols = a.shape if a.ndim == 2 else (0, 0)
    if (omatcopy is None or out.dtype != a.dtype or a.ndim != 2 or out.shape != (cols, rows) or rows == 0 or cols == 0
            or not out.flags.writeable or not _rows_apart(a, cols) or not _rows_apart(out, rows)):
        out[...] = a.T  # NumPy's copy, which also refuses what cannot be written
        return
    omatcopy(_ROW_MAJOR, _TRANSPOSE, rows, cols, 1.0, a.ctypes.data, a.strides[0] // a.itemsize,
             out.ctypes.data, out.strides[0] // out.itemsize)


def _rows_apart(a, length):
    """Whether a's rows are contiguous and do not overlap: what omatcopy's leading dimension must be (a
    broadcast, reversed or interleaved array is not)."""
    return a.strides[1] == a.itemsize and a.strides[0] % a.itemsize == 0 and a.strides[0] >= length * a.itemsize

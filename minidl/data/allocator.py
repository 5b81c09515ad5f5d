"""glibc's allocator told to keep the memory a process frees, for image decoding loops.

Decoding an image allocates and frees buffers of 0.2-2 MB (the JPEG's pixels, the resized
square, its float64 statistics). glibc by default gives such memory back to the kernel (munmap,
or trimming the heap's top) and, for the next image, faults it back in, zeroed page by page:
measured on prepare-data, a third of its CPU time was the kernel's (benchmarks/NOTES.md).
Keeping it makes the next image reuse the same pages; what is kept is bounded by the largest
set of buffers one image needs, so memory stays flat.
"""
from __future__ import annotations

import ctypes

# malloc.h's parameters for mallopt
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 2 ** 20  # glibc's largest (64-bit): blocks up to this come from the heap, reused
TRIM_THRESHOLD = 256 * 2 ** 20  # free memory at the heap's top kept up to this


def keep_freed_memory() -> bool:
    """Set this process's glibc allocator to keep freed memory (see above); False where the C library is not
    glibc (no mallopt) or refuses, which changes nothing but speed."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))

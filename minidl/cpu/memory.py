"""The host allocator's settings for the CPU path."""
import ctypes


def keep_freed_host_memory() -> None:
    """Let glibc reuse freed host memory rather than hand it back to the kernel, for the whole process.

    A training step allocates and frees the same large arrays every time; glibc's
    default maps each fresh and unmaps it on free, so every step pays page faults
    again (the host's counterpart of CuPy's memory pool). It also keeps every
    thread on the one heap (M_ARENA_MAX=1). The application calls it (train and
    bench do); importing minidl does not. A no-op where the C library is not glibc.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(_M_MMAP_MAX, 0)  # every allocation from the heap, which is reused
        libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30)  # and never shrunk back below 1 GiB of free space
        # one heap for all threads: a thread's own arena (as side_by_side's threads in cpu.threads
        # would get) grows in 64 MB pieces mapped and unmapped as it goes, page faults every few steps
        libc.mallopt(_M_ARENA_MAX, 1)
    except (OSError, AttributeError):
        pass


_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8  # glibc's mallopt parameter numbers

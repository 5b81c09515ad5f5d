"""Compile a kernel source with NVRTC exactly as CuPy's RawModule would, without a GPU.

`compile_like_cupy(source, name_expressions, extra_options)` passes NVRTC CuPy's options in
CuPy's order (-ftz=true, -arch=sm_XX, --device-as-default-execution-space, ...; the list,
and where in CuPy's source each comes from, is in emulator/README.md). libnvrtc comes
from the PyPI wheel nvidia-cuda-nvrtc-cu12 (the `test` extra); it needs no GPU.

CuPy 14 also passes `-I` the CUDA runtime headers (cuda.pathfinder finds the folder
nvidia/cuda_runtime/include of the nvidia-cuda-runtime-cu12 wheel), where cuda_fp16.h and
cuda_bf16.h are: NVRTC has no built-in copy of them. compile_like_cupy adds that folder
where the wheel is installed (`cuda_include_dir`), after the caller's own -I folders.
"""
import ctypes
import functools
import glob
import os

from minidl.errors import MinidlError

# minidl's options for cupy.RawModule (kernels.compile_options) less the -I of its own folder
CUPY_USER_OPTIONS = ("--std=c++14",)
CUPY_ADDED_OPTIONS = ("-ftz=true",)
CUPY_AFTER_ARCH_OPTIONS = ("--device-as-default-execution-space",)


class NvrtcUnavailable(MinidlError):
    """The NVRTC wheel is not installed."""


class NvrtcCompileError(MinidlError):
    """NVRTC rejected a source; the message holds its program log."""


class CudaHeadersUnavailable(MinidlError):
    """The CUDA runtime headers (cuda_fp16.h, cuda_bf16.h) are not installed."""


def find_libnvrtc():
    """The path of libnvrtc.so from the installed `nvidia` wheel (cu12 or cu13 layout)."""
    try:
        import nvidia
    except ImportError:
        raise NvrtcUnavailable("no NVRTC: pip install nvidia-cuda-nvrtc-cu12 (or pip install -e '.[test]')") \
            from None
    for root in nvidia.__path__:  # a namespace package: one entry per site-packages
        # nvidia/cuda_nvrtc/lib/libnvrtc.so.12 (CUDA 12), nvidia/cu13/lib/libnvrtc.so.13 (CUDA 13)
        found = sorted(glob.glob(os.path.join(root, "*", "lib", "libnvrtc.so.*")))
        if found:
            return found[-1]
    raise NvrtcUnavailable(f"no libnvrtc.so.* under {list(nvidia.__path__)}: "
                           "pip install nvidia-cuda-nvrtc-cu12")


def cuda_include_dir():
    """The folder of the CUDA runtime headers that CuPy 14 passes to NVRTC: nvidia/cuda_runtime/include of
    the nvidia-cuda-runtime-cu12 wheel (or nvidia/cu13/include of CUDA 13's); CudaHeadersUnavailable if none."""
    try:
        import nvidia
    except ImportError:
        nvidia = None
    for root in getattr(nvidia, "__path__", ()):  # a namespace package: one entry per site-packages
        for layout in ("cuda_runtime", "cu13"):
            folder = os.path.join(root, layout, "include")
            if all(os.path.isfile(os.path.join(folder, h)) for h in ("cuda_fp16.h", "cuda_bf16.h")):
                return folder
    raise CudaHeadersUnavailable("no CUDA runtime headers (cuda_fp16.h, cuda_bf16.h): "
                                 "pip install nvidia-cuda-runtime-cu12 (or pip install -e '.[test]')")


def cuda_header_options():
    """(-I the CUDA runtime headers,) as CuPy 14 adds it, or () where they are not installed."""
    try:
        return (f"-I{cuda_include_dir()}",)
    except CudaHeadersUnavailable:
        return ()


@functools.lru_cache(maxsize=None)
def _lib():
    lib = ctypes.CDLL(find_libnvrtc())
    # every NVRTC call returns an nvrtcResult (an int, 0 for success)
    prog_p = ctypes.POINTER(ctypes.c_void_p)
    strings = ctypes.POINTER(ctypes.c_char_p)
    size_p = ctypes.POINTER(ctypes.c_size_t)
    signatures = {
        "nvrtcVersion": [ctypes.POINTER(ctypes.c_int), ctypes.POINTER(ctypes.c_int)],
        "nvrtcCreateProgram": [prog_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_int, strings, strings],
        "nvrtcDestroyProgram": [prog_p],
        "nvrtcAddNameExpression": [ctypes.c_void_p, ctypes.c_char_p],
        "nvrtcCompileProgram": [ctypes.c_void_p, ctypes.c_int, strings],
        "nvrtcGetLoweredName": [ctypes.c_void_p, ctypes.c_char_p, strings],
        "nvrtcGetProgramLogSize": [ctypes.c_void_p, size_p],
        "nvrtcGetProgramLog": [ctypes.c_void_p, ctypes.c_char_p],
        "nvrtcGetPTXSize": [ctypes.c_void_p, size_p],
        "nvrtcGetCUBINSize": [ctypes.c_void_p, size_p],
    }
    for name, argtypes in signatures.items():
        getattr(lib, name).argtypes = argtypes
        getattr(lib, name).restype = ctypes.c_int
    lib.nvrtcGetErrorString.argtypes = [ctypes.c_int]
    lib.nvrtcGetErrorString.restype = ctypes.c_char_p
    return lib


def _check(result, what):
    if result != 0:
        raise NvrtcCompileError(f"{what}: {_lib().nvrtcGetErrorString(result).decode()}")


def nvrtc_version():
    """(major, minor) of the loaded NVRTC."""
    major, minor = ctypes.c_int(), ctypes.c_int()
    _check(_lib().nvrtcVersion(ctypes.byref(major), ctypes.byref(minor)), "nvrtcVersion")
    return major.value, minor.value


def cupy_options(arch):
    """The NVRTC options of cupy.RawModule(code=..., options=("--std=c++14", ...)), less the -I paths."""
    return CUPY_USER_OPTIONS + CUPY_ADDED_OPTIONS + (f"-arch={arch}",) + CUPY_AFTER_ARCH_OPTIONS


def _strings(values):
    encoded = [v.encode() for v in values]
    return (ctypes.c_char_p * max(1, len(encoded)))(*encoded), len(encoded)


def _size(getter, prog):
    size = ctypes.c_size_t()
    _check(getter(prog, ctypes.byref(size)), getter.__name__)
    return size.value


def _log(prog):
    lib = _lib()
    log = ctypes.create_string_buffer(_size(lib.nvrtcGetProgramLogSize, prog))
    lib.nvrtcGetProgramLog(prog, log)
    return log.value.decode(errors="replace")


def compile_like_cupy(source_path, name_expressions, arch="compute_90", extra_options=()):
    """Compile `source_path` as cupy.RawModule does; {name expression: lowered (mangled) name}.

    `extra_options` follow CuPy's: minidl passes the source's include folder there
    (kernels.include_options). Then, as CuPy 14 adds it, -I the CUDA runtime headers where they
    are installed (cuda_header_options); without them a source including cuda_fp16.h fails.

    `arch` is what follows -arch=: CuPy passes "sm_XX" (a cubin, its default) or
    "compute_XX" (PTX, under CUPY_COMPILE_WITH_PTX=1); both are accepted. Raises
    NvrtcCompileError with NVRTC's program log when the source does not compile.
    """
    lib = _lib()
    with open(source_path) as f:
        source = f.read()
    prog = ctypes.c_void_p()
    no_headers = ctypes.POINTER(ctypes.c_char_p)()
    _check(lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), os.path.basename(source_path).encode(),
                                  0, no_headers, no_headers), f"nvrtcCreateProgram({source_path})")
    try:
        for expression in name_expressions:
            _check(lib.nvrtcAddNameExpression(prog, expression.encode()), f"nvrtcAddNameExpression({expression})")
        options = cupy_options(arch) + tuple(extra_options) + cuda_header_options()
        array, count = _strings(options)
        if lib.nvrtcCompileProgram(prog, count, array) != 0:
            raise NvrtcCompileError(f"NVRTC could not compile {source_path} with {' '.join(options)}:\n{_log(prog)}")
        lowered = {}
        for expression in name_expressions:
            name = ctypes.c_char_p()
            _check(lib.nvrtcGetLoweredName(prog, expression.encode(), ctypes.byref(name)),
                   f"nvrtcGetLoweredName({expression})")
            lowered[expression] = name.value.decode()  # a copy: the program owns the string
        # something was produced: the PTX, and with -arch=sm_XX the cubin CuPy loads
        if _size(lib.nvrtcGetPTXSize, prog) <= 1:
            raise NvrtcCompileError(f"NVRTC produced no PTX for {source_path}")
        if arch.startswith("sm_") and _size(lib.nvrtcGetCUBINSize, prog) == 0:
            raise NvrtcCompileError(f"NVRTC produced no cubin for {source_path}")
        return lowered
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))

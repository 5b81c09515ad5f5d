"""Compile a CUDA source with g++ and run its kernels on the CPU, every block and thread.

`compile_module(source, name_expressions, options)` builds the source, cuda_emulation.h
force-included, into a shared library with a launcher and a describer per name expression;
`marshal(kernel, args, ...)` applies CuPy's argument rules and checks them against the
kernel's C parameter types, raising TypeError where a GPU would read the wrong bytes
(how, in emulator/README.md, "Compiling and running kernels").
"""
import ctypes
import functools
import hashlib
import os
import subprocess
import tempfile
import threading
from typing import NamedTuple

import ml_dtypes
import numpy as np

HEADER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cuda_emulation.h")
# g++ has no <cuda_fp16.h> or <cuda_bf16.h>: this folder holds the emulator's (__half, __nv_bfloat16;
# include/minidl_emu_half.h says how they round), on the include path after the source's own folders
SHIM_INCLUDE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "include")
CXX = "g++"
# Real CuPy compiles with NVRTC, which flushes float denormals to zero (-ftz)
# and contracts a*b+c into FMAs; g++ here does neither, so float results may
# differ from a GPU's in the last bits. -fvisibility=hidden: only the
# generated extern "C" functions are exported from each library.
FLAGS = ("-O2", "-shared", "-fPIC", "-std=c++14", "-fno-fast-math", "-fvisibility=hidden")

# The C types a parameter (or a pointer's element) may have, as the describer
# names them, and their dtypes. `long` is int64: the header insists on LP64.
# Plain `char` is left out: its signedness depends on the host.
DTYPES = {
    "bool": np.bool_, "signed char": np.int8, "unsigned char": np.uint8, "short": np.int16,
    "unsigned short": np.uint16, "int": np.int32, "unsigned int": np.uint32, "long": np.int64,
    "unsigned long": np.uint64, "long long": np.int64, "unsigned long long": np.uint64,
    "float": np.float32, "double": np.float64,
    # the 16-bit floats of cuda_fp16.h and cuda_bf16.h: NumPy's float16 and ml_dtypes' bfloat16 in memory
    "__half": np.float16, "__nv_bfloat16": ml_dtypes.bfloat16,
}
DTYPES = {name: np.dtype(t) for name, t in DTYPES.items()}
# The element type of an array passed for a table of pointers (`float* const*`): device addresses.
TABLE_DTYPE = np.dtype(np.uint64)
# How a marshalled value is named in messages: the C type CuPy passes it as.
C_NAMES = {dtype: name for name, dtype in DTYPES.items()}  # the last wins: int64 is long long, not long

# Appended once after the source: the templates every launcher and describer use.
_EPILOGUE_HEAD = r"""
#line 1 "minidl emulator launchers"
#include <cstddef>
#include <type_traits>
#include <utility>
namespace minidl_emu {
// The C name of a supported scalar type, nullptr for any other type.
template <typename T> struct scalar { static const char* name() { return nullptr; } };
#define MINIDL_EMU_SCALAR(T) template <> struct scalar<T> { static const char* name() { return #T; } };
MINIDL_EMU_SCALAR(bool) MINIDL_EMU_SCALAR(signed char) MINIDL_EMU_SCALAR(unsigned char)
MINIDL_EMU_SCALAR(short) MINIDL_EMU_SCALAR(unsigned short) MINIDL_EMU_SCALAR(int) MINIDL_EMU_SCALAR(unsigned int)
MINIDL_EMU_SCALAR(long) MINIDL_EMU_SCALAR(unsigned long) MINIDL_EMU_SCALAR(long long)
MINIDL_EMU_SCALAR(unsigned long long) MINIDL_EMU_SCALAR(float) MINIDL_EMU_SCALAR(double)
#ifdef MINIDL_EMU_HAVE_HALF  // the source included <cuda_fp16.h> (the emulator's, include/)
MINIDL_EMU_SCALAR(__half)
#endif
#ifdef MINIDL_EMU_HAVE_BF16
MINIDL_EMU_SCALAR(__nv_bfloat16)
#endif
#undef MINIDL_EMU_SCALAR

// A parameter's element type name and flags: 1 = a pointer, 2 = to const, 4 = a table of
// pointers (T* const*, the table read-only), 8 = the arrays it points to are const.
template <typename T> struct param {
    static const char* name() { return scalar<T>::name(); }
    static int flags() { return 0; }
};
template <typename T> struct param<T*> {
    static const char* name() { return scalar<typename std::remove_cv<T>::type>::name(); }
    static int flags() { return 1 | (std::is_const<T>::value ? 2 : 0); }
};
template <typename T> struct param<T* const*> {
    static const char* name() { return scalar<typename std::remove_cv<T>::type>::name(); }
    static int flags() { return 1 | 2 | 4 | (std::is_const<T>::value ? 8 : 0); }
};

// Writes up to `capacity` parameter descriptions; returns the parameter count.
template <typename... A>
int describe(void (*)(A...), const char** names, int* flags, int capacity) {
    const char* n[] = {nullptr, param<A>::name()...};  // the leading entry: no zero-size array
    int f[] = {0, param<A>::flags()...};
    for (int i = 0; i < static_cast<int>(sizeof...(A)) && i < capacity; ++i) {
        names[i] = n[i + 1];
        flags[i] = f[i + 1];
    }
    return static_cast<int>(sizeof...(A));
}

// Every thread of every block, one after another; args[i] points at argument i.
template <typename... A, std::size_t... I>
void run(void (*kernel)(A...), const unsigned int* grid, const unsigned int* block, void** args,
         std::index_sequence<I...>) {
    grid_dim = dim3(grid[0], grid[1], grid[2]);
    block_dim = dim3(block[0], block[1], block[2]);
    for (unsigned int bz = 0; bz < grid[2]; ++bz)
        for (unsigned int by = 0; by < grid[1]; ++by)
            for (unsigned int bx = 0; bx < grid[0]; ++bx) {
                block_idx = uint3{bx, by, bz};
                for (unsigned int tz = 0; tz < block[2]; ++tz)
                    for (unsigned int ty = 0; ty < block[1]; ++ty)
                        for (unsigned int tx = 0; tx < block[0]; ++tx) {
                            thread_idx = uint3{tx, ty, tz};
                            kernel(*static_cast<A*>(args[I])...);
                        }
            }
}
template <typename... A>
void launch(void (*kernel)(A...), const unsigned int* grid, const unsigned int* block, void** args) {
    run(kernel, grid, block, args, std::index_sequence_for<A...>());
}
}  // namespace minidl_emu
#define MINIDL_EMU_EXPORT extern "C" __attribute__((visibility("default")))
"""

# One per name expression. The #line makes g++ name the expression in any
# error about it, e.g. `name expression lrn_forward<half>:1:...: error: ...`.
_EPILOGUE_KERNEL = """
#line 1 "name expression {quoted}"
static auto* const minidl_emu_kernel_{k} = &({expression});
MINIDL_EMU_EXPORT void minidl_launch_{k}(const unsigned int* g, const unsigned int* b, void** a) {{
    ::minidl_emu::launch(minidl_emu_kernel_{k}, g, b, a);
}}
MINIDL_EMU_EXPORT int minidl_describe_{k}(const char** n, int* f, int c) {{
    return ::minidl_emu::describe(minidl_emu_kernel_{k}, n, f, c);
}}
"""

# CUDA's launch limits (compute capability 3.0 and later): beyond them a real
# launch fails with "invalid configuration argument".
_MAX_GRID = (2 ** 31 - 1, 65535, 65535)
_MAX_BLOCK = (1024, 1024, 64)
_MAX_THREADS = 1024


class CompileError(RuntimeError):
    """g++ could not compile a kernel source (the message holds its diagnostics)."""


class Param(NamedTuple):
    ctype: str  # as C spells it, e.g. "const float*", "long long", "float* const*"
    dtype: np.dtype  # of the value, or of the element a pointer (or a table's pointers) points to
    pointer: bool
    const: bool  # a pointer to const: the kernel only reads there (for a table: where its pointers point)
    table: bool = False  # a table of pointers, `T* const*`: an array of device addresses (uint64)


class Kernel:
    """One kernel of a compiled module: its parameter types and a way to run it."""

    def __init__(self, name, params, launcher, library):
        self.name, self.params = name, params
        self._launcher = launcher
        self._library = library  # the launcher lives as long as the library does

    def run(self, grid, block, values):
        """Run the whole grid: `values` from marshal (an int address for a pointer, else a NumPy scalar)."""
        grid, block = _check_dims(self.name, grid, block)
        if len(values) != len(self.params):
            raise TypeError(f"kernel {self.name} takes {len(self.params)} arguments, {len(values)} given")
        storage = []  # each argument in memory of exactly its C type, as a GPU launch copies it
        for i, (param, value) in enumerate(zip(self.params, values)):
            if param.pointer:
                if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                    raise TypeError(f"kernel {self.name} argument {i}: an address (int) is needed, got {value!r}")
                storage.append(np.array([value], dtype=np.uintp))
            else:
                if not isinstance(value, np.generic) or value.dtype != param.dtype:
                    raise TypeError(f"kernel {self.name} argument {i}: a numpy.{param.dtype} is needed, got {value!r}")
                storage.append(np.array([value], dtype=param.dtype))
        pointers = np.array([s.ctypes.data for s in storage], dtype=np.uintp)
        # ctypes releases the GIL for the call: other Python threads run meanwhile.
        self._launcher(grid.ctypes.data, block.ctypes.data, pointers.ctypes.data)

    def __repr__(self):
        return f"<emulated kernel {self.name}({', '.join(p.ctype for p in self.params)})>"


class CompiledModule:
    """A loaded library: one launcher and one describer per name expression."""

    def __init__(self, library, name_expressions):
        self._library = library
        self._index = {expression: k for k, expression in enumerate(name_expressions)}

    def kernel(self, name_expression):
        """The kernel of a name expression the module was compiled with (the exact string)."""
        k = self._index.get(name_expression)
        if k is None:
            raise ValueError(f"{name_expression!r} is not one of the name expressions the module was compiled "
                             f"with: {', '.join(self._index) or 'none'}")
        describe = getattr(self._library, f"minidl_describe_{k}")
        describe.restype = ctypes.c_int
        describe.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
        count = describe(None, None, 0)
        names, flags = (ctypes.c_char_p * count)(), (ctypes.c_int * count)()
        describe(names, flags, count)
        params = []
        for i in range(count):
            if names[i] is None:
                raise TypeError(f"kernel {name_expression}: parameter {i} has a type the emulator does not "
                                f"support; it runs bool, integer, float, double, __half and __nv_bfloat16 "
                                f"parameters, and pointers to them")
            name, pointer, table = names[i].decode(), bool(flags[i] & 1), bool(flags[i] & 4)
            const = bool(flags[i] & 8) if table else bool(flags[i] & 2)
            ctype = ("const " if const else "") + name + ("* const*" if table else "*" if pointer else "")
            params.append(Param(ctype, DTYPES[name], pointer, const, table))
        launcher = getattr(self._library, f"minidl_launch_{k}")
        launcher.restype = None
        launcher.argtypes = [ctypes.c_void_p] * 3
        return Kernel(name_expression, params, launcher, self._library)


_modules = {}  # library path -> CompiledModule: each library is loaded once per process
_lock = threading.Lock()


def compile_module(source, name_expressions, options=()):
    """Compile `source` (CUDA C++) with g++, or take it from the cache; a CompileError if g++ fails.

    `options` are RawModule's: its `-I<dir>` include folders are passed to g++.
    """
    include_dirs = _include_dirs(options)
    name_expressions = tuple(dict.fromkeys(name_expressions))  # in order, once each
    for expression in name_expressions:
        if not isinstance(expression, str) or not expression.strip() or "\n" in expression:
            raise ValueError(f"a name expression is one line of C++, like 'im2col<float>'; got {expression!r}")
    code = source + "\n" + _EPILOGUE_HEAD + "".join(
        _EPILOGUE_KERNEL.format(k=k, expression=e, quoted=e.replace("\\", "\\\\").replace('"', '\\"'))
        for k, e in enumerate(name_expressions))
    with open(HEADER) as f:
        header = f.read()
    # the included headers are part of what is built: a library built before one was edited is stale
    key = hashlib.sha256("\0".join((code, header, _compiler_version(), *FLAGS, *include_dirs,
                                     *_headers(include_dirs + (SHIM_INCLUDE,)))).encode()).hexdigest()
    path = os.path.join(cache_dir(), f"{key[:40]}.so")
    with _lock:  # one build at a time in this process; other processes are safe through the rename
        if path not in _modules:
            if not os.path.exists(path):
                _build(code, path, include_dirs)
            try:
                library = ctypes.CDLL(path)
            except OSError:  # a damaged cache entry: build it again
                _build(code, path, include_dirs)
                library = ctypes.CDLL(path)
            _modules[path] = CompiledModule(library, name_expressions)
        return _modules[path]


def _include_dirs(options):
    """The absolute folders of the `-I<dir>` options (CuPy passes each option as one string)."""
    return tuple(os.path.abspath(o[2:]) for o in options if o.startswith("-I") and len(o) > 2)


HEADER_SUFFIXES = (".h", ".cuh", ".hpp")


def _headers(include_dirs):
    """Every header under the include folders, as "path\0contents" strings: for the cache key."""
    found = []
    for root in include_dirs:
        for folder, _, files in sorted(os.walk(root)):
            for name in sorted(f for f in files if f.endswith(HEADER_SUFFIXES)):
                with open(os.path.join(folder, name), errors="replace") as f:
                    found.append(f"{os.path.join(folder, name)}\0{f.read()}")
    return found


def cache_dir():
    """Where built libraries are kept: `emulator` in minidl's cache folder ($MINIDL_CACHE or ~/.cache/minidl)."""
    return os.path.join(os.environ.get("MINIDL_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "minidl"),
                        "emulator")


def _build(code, path, include_dirs):
    """g++ into a temporary file beside `path`, then a rename: a reader never sees half a library."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, partial = tempfile.mkstemp(suffix=".so.partial", dir=os.path.dirname(path))
    os.close(fd)
    try:
        with tempfile.TemporaryDirectory() as work:
            with open(os.path.join(work, "source.cu"), "w") as f:
                f.write(code)
            # Run in `work` so the diagnostics say `source.cu:12:5: error: ...`, in plain ASCII (LC_ALL=C).
            includes = [f"-I{d}" for d in include_dirs + (SHIM_INCLUDE,)]
            result = _gxx(*FLAGS, *includes, "-x", "c++", "-include", HEADER, "source.cu", "-o", partial, cwd=work)
        if result.returncode != 0:
            raise CompileError(f"g++ could not compile the CUDA source for the emulator:\n{result.stderr.strip()}")
        os.replace(partial, path)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)


@functools.lru_cache(maxsize=None)
def _compiler_version():
    try:
        result = _gxx("--version")
    except OSError as e:
        raise CompileError(f"the GPU emulator compiles CUDA kernels with {CXX}, which did not run: {e}") from None
    return result.stdout


def _gxx(*args, cwd=None):
    """Run g++ with its messages in plain ASCII (no locale's quotes)."""
    return subprocess.run([CXX, *args], cwd=cwd, capture_output=True, text=True, env=dict(os.environ, LC_ALL="C"))


def _check_dims(name, grid, block):
    """grid and block as uint32[3], or a ValueError where a real launch would fail."""
    checked = []
    for what, dims, limits in (("grid", grid, _MAX_GRID), ("block", block, _MAX_BLOCK)):
        dims = tuple(dims)
        if len(dims) != 3 or not all(isinstance(d, (int, np.integer)) and 1 <= d <= m for d, m in zip(dims, limits)):
            raise ValueError(f"kernel {name}: {what} {dims} is not a valid launch size (3 sizes, each 1..{limits})")
        checked.append(np.array(dims, dtype=np.uint32))
    if int(np.prod(checked[1], dtype=np.int64)) > _MAX_THREADS:
        raise ValueError(f"kernel {name}: block {tuple(block)} has more than {_MAX_THREADS} threads")
    return checked


def marshal(kernel, args, is_array, array_dtype, array_address):
    """The `values` for Kernel.run from CuPy-style `args`, each checked against its C parameter type.

    As CuPy marshals them: a Python bool is a C bool, a Python int a long long, a
    Python float a double, a NumPy scalar its own dtype, and an array
    (is_array(arg)) a pointer to its dtype. Anything else, and any mismatch with
    the parameter, is a TypeError naming the kernel, the argument and both types.
    """
    if len(args) != len(kernel.params):
        raise TypeError(f"kernel {kernel.name} takes {len(kernel.params)} arguments, {len(args)} given")
    values = []
    for i, (param, arg) in enumerate(zip(kernel.params, args)):
        def mismatch(what, passed_as):
            return TypeError(f"kernel {kernel.name} argument {i}: the C parameter is {param.ctype}, but "
                             f"{what} is passed as {passed_as}")

        if is_array(arg):
            dtype = np.dtype(array_dtype(arg))
            passed_as = f"{C_NAMES.get(dtype, dtype.name)}*"
            # a table of pointers is an array of 64-bit device addresses
            if not param.pointer or dtype != (TABLE_DTYPE if param.table else param.dtype):
                raise mismatch(f"an array of {dtype}", passed_as)
            values.append(int(array_address(arg)))
            continue
        if isinstance(arg, np.generic):  # before float: numpy.float64 is a Python float too
            dtype, what = arg.dtype, f"a numpy.{arg.dtype}"
        elif isinstance(arg, bool):  # before int: a bool is an int too
            dtype, what = np.dtype(np.bool_), "a Python bool"
        elif isinstance(arg, int):
            dtype, what = np.dtype(np.int64), "a Python int"
            if not -2 ** 63 <= arg < 2 ** 63:
                raise TypeError(f"kernel {kernel.name} argument {i}: the Python int {arg} does not fit in long long")
        elif isinstance(arg, float):
            dtype, what = np.dtype(np.float64), "a Python float"
        else:
            kind = type(arg).__qualname__ if type(arg).__module__ == "builtins" else \
                f"{type(arg).__module__}.{type(arg).__qualname__}"
            raise TypeError(f"kernel {kernel.name} argument {i}: the C parameter is {param.ctype}, but a {kind} "
                            f"cannot be a kernel argument (only device arrays and scalars can)")
        if param.pointer or dtype != param.dtype:
            raise mismatch(what, C_NAMES.get(dtype, dtype.name))
        values.append(dtype.type(arg))
    return values

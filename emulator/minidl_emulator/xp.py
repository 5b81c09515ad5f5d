"""The `cupy` namespace on emulated GPUs: ndarray, its functions, ufuncs and random numbers.

An emulated array is a NumPy array standing in for device memory, with the
device it lives on and the allocation it is a view of. Every operation follows
CuPy's rules where bugs hide: a NumPy array operand, or turning an array into
a NumPy array implicitly, is a TypeError; operands must be on the current
device; each operation is enqueued on the current stream, checked against the
stream order, counted (`cuda.operation`) and charged in the cost ledger
(ledger.py) as CuPy runs it, GEMMs with their compute unit and hidden copies.
The arithmetic itself is NumPy's, so results equal the CPU path's, not cuBLAS's
(no other summation order), except that a 2-D float32 GEMM under the TF32 compute
type first rounds its inputs to TF32 (round_to_tf32), as tensor cores read them, and
a 2-D float16 or bfloat16 GEMM is computed in float32 and rounded once to its dtype
(gemmEx under CUBLAS_COMPUTE_32F). bfloat16 is ml_dtypes' dtype, as in CuPy 14.
"""
import builtins
import numbers
import os
import types

import ml_dtypes
import numpy as np

from minidl_emulator import cuda
from minidl_emulator.cuda import Allocation, MemoryPointer, current_device_id, fill_uninitialised, operation
from minidl_emulator.ledger import Cost, is_pinned


_NOT_ALLOWED = ("Implicit conversion to a NumPy array is not allowed. "
                "Please use `.get()` to construct a NumPy array explicitly.")


def _is_host_array(value):
    return isinstance(value, np.ndarray)


def _unwrap(value, reads):
    """Host views for emulated arrays (noted in `reads`), recursively through lists and tuples."""
    if isinstance(value, ndarray):
        reads.append(value)
        return value._host
    if _is_host_array(value):
        raise TypeError(f"Unsupported type {type(value)}: a NumPy array cannot be an operand of a "
                        "CuPy operation; move it to the device with cupy.asarray first")
    if isinstance(value, (list, tuple)):
        return type(value)(_unwrap(v, reads) for v in value)
    return value


def _wrap(result, sources, made):
    """An emulated array for a NumPy result: a view of a source's allocation, or new device memory (noted in `made`)."""
    if isinstance(result, (list, tuple)):
        return type(result)(_wrap(r, sources, made) for r in result)
    if isinstance(result, np.generic):
        result = np.asarray(result)  # CuPy returns 0-d arrays where NumPy returns scalars
    if not isinstance(result, np.ndarray):
        return result
    for source in sources:
        if np.may_share_memory(result, source._host):
            return ndarray._view(result, source._allocation)
    made.append(ndarray._new(result))
    return made[-1]


def _run(kind, fn, args, kwargs, writes=(), what=None, cost=None):
    """One device operation: unwrap, compute with NumPy, wrap, then check, enqueue and count it.

    A result that is only a view of an input (reshape, transpose, basic
    indexing) launches nothing on a GPU, so it is no operation here either.
    """
    reads = []
    host_args = _unwrap(list(args), reads)
    host_kwargs = {k: _unwrap(v, reads) for k, v in kwargs.items()}
    out = kwargs.get("out")
    if isinstance(out, tuple) and len(out) == 1:  # how NumPy passes out= to __array_ufunc__
        out = out[0]
    if isinstance(out, ndarray):
        writes = list(writes) + [out]
    result = fn(*host_args, **host_kwargs)
    made = []
    result = out if isinstance(out, ndarray) else _wrap(result, reads, made)
    if writes or made:
        operation(kind, reads=reads, writes=list(writes) + made, what=what or getattr(fn, "__name__", kind), cost=cost)
    return result


class ndarray:  # noqa: N801 -- CuPy's name
    """An array in an emulated GPU's memory."""

    __array_priority__ = 100

    def __init__(self, shape, dtype=float, memptr=None, strides=None, order="C"):
        if memptr is not None or strides is not None:
            raise NotImplementedError("the emulator makes arrays from a shape and a dtype only")
        host = np.empty(shape, dtype=dtype, order=order)
        fill_uninitialised(host)
        self._host, self._allocation = host, Allocation(host, current_device_id())

    @classmethod
    def _new(cls, host):
        array = cls.__new__(cls)
        array._host, array._allocation = host, Allocation(host, current_device_id())
        return array

    @classmethod
    def _view(cls, host, allocation):
        array = cls.__new__(cls)
        array._host, array._allocation = host, allocation
        return array

    # --- what it is
    shape = property(lambda self: self._host.shape)
    dtype = property(lambda self: self._host.dtype)
    ndim = property(lambda self: self._host.ndim)
    size = property(lambda self: self._host.size)
    nbytes = property(lambda self: self._host.nbytes)
    itemsize = property(lambda self: self._host.itemsize)
    strides = property(lambda self: self._host.strides)
    flags = property(lambda self: self._host.flags)
    device = property(lambda self: cuda.Device(self._allocation.device_id))
    data = property(lambda self: MemoryPointer(self))
    T = property(lambda self: self.transpose())

    def __len__(self):
        return len(self._host)

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def __repr__(self):  # for debugging: reads the memory directly, outside any stream
        return repr(self._host).replace("array(", "array(emulated GPU: ", 1)

    def __str__(self):
        return str(self._host)

    # --- leaving the device: only explicitly
    def __array__(self, *args, **kwargs):
        raise TypeError(_NOT_ALLOWED)

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        for value in inputs:
            if _is_host_array(value):
                raise TypeError(f"Unsupported type {type(value)}: NumPy's {ufunc.__name__} got a NumPy array and a "
                                "CuPy array; move the NumPy array to the device with cupy.asarray")
        return getattr(_Ufunc(ufunc), method)(*inputs, **kwargs)

    def __array_function__(self, func, types, args, kwargs):
        mine = globals().get(func.__name__)
        if mine is None or not callable(mine):
            raise TypeError(f"numpy.{func.__name__} on a CuPy array: {_NOT_ALLOWED}")
        return mine(*args, **kwargs)

    def get(self, stream=None, order="C", out=None, blocking=True):
        """A host copy, copied on `stream` (default: the current stream of the array's device)."""
        with cuda.Device(self._allocation.device_id):
            stream = stream or cuda.get_current_stream()
            pinned = out is not None and is_pinned(out)
            operation("copy", reads=[self], stream=stream, what="a device-to-host copy",
                      cost=Cost(unit="d2h", pinned=pinned))
            if blocking:
                stream.synchronize()
            host = np.array(self._host, order=order)
        if out is not None:
            out[...] = host
            return out
        return host

    def set(self, host, stream=None):
        if not _is_host_array(host) or host.shape != self.shape:
            raise ValueError(f"set() takes a NumPy array of shape {self.shape}")
        operation("copy", writes=[self], stream=stream, what="a host-to-device copy",
                  cost=Cost(unit="h2d", pinned=is_pinned(host)))
        self._host[...] = host

    def item(self):
        return self.get().item()

    def tolist(self):
        return self.get().tolist()

    def __float__(self):
        return float(self.get())

    def __int__(self):
        return int(self.get())

    def __bool__(self):
        return bool(self.get())

    def __index__(self):
        return self.get().__index__()

    # --- methods: NumPy's, as device operations
    def copy(self, order="C"):
        return _run("copy", np.array, (self,), dict(order=order, copy=True), what="copy")

    def astype(self, dtype, order="K", copy=True):
        if not copy and np.dtype(dtype) == self.dtype:
            return self
        return _run("elementwise", lambda a: a.astype(dtype, order=order), (self,), {}, what="astype")

    def reshape(self, *shape, order="C"):
        shape = shape[0] if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else shape
        return _run("copy", lambda a: a.reshape(shape, order=order), (self,), {}, what="reshape")

    def transpose(self, *axes):
        axes = axes[0] if len(axes) == 1 and isinstance(axes[0], (tuple, list)) else axes
        return _run("copy", lambda a: a.transpose(*axes), (self,), {}, what="transpose")

    def fill(self, value):
        operation("elementwise", writes=[self], what="fill")
        self._host.fill(value)

    def __getitem__(self, index):
        integers = index if isinstance(index, tuple) else (index,)
        if integers and builtins.all(isinstance(i, (int, np.integer)) and not isinstance(i, bool) for i in integers):
            # CuPy gives a 0-d view where NumPy gives a scalar (a copy): a view here too, no operation
            index = integers + (Ellipsis,)
        return _run("elementwise", lambda a, i: a[i], (self, index), {}, what="indexing")

    def __setitem__(self, index, value):
        reads = []
        host_index, host_value = _unwrap(index, reads), _unwrap(value, reads)
        operation("elementwise", reads=reads, writes=[self], what="assignment")
        self._host[host_index] = host_value

    def _binary(self, op, other, reflected=False):
        if not isinstance(other, (ndarray, numbers.Number, np.generic)):
            if _is_host_array(other):
                raise TypeError(f"Unsupported type {type(other)}: a NumPy array cannot be an operand of a "
                                "CuPy operation; move it to the device with cupy.asarray first")
            return NotImplemented
        args = (other, self) if reflected else (self, other)
        return matmul(*args) if op is np.matmul else _run("elementwise", op, args, {})

    def _inplace(self, op, other):
        if _is_host_array(other):
            raise TypeError(f"Unsupported type {type(other)}: a NumPy array cannot be an operand of a "
                            "CuPy operation; move it to the device with cupy.asarray first")
        if not isinstance(other, (ndarray, numbers.Number, np.generic)):
            return NotImplemented
        _run("elementwise", op, (self, other), dict(out=self))
        return self


def _method(name, kind):
    def method(self, *args, **kwargs):
        return _run(kind, getattr(np.ndarray, name), (self,) + args, kwargs, what=name)
    method.__name__ = name
    return method


for _name in ("swapaxes", "ravel", "flatten", "squeeze", "repeat", "take", "clip", "argsort", "nonzero",
              "view", "diagonal"):
    setattr(ndarray, _name, _method(_name, "copy" if _name != "clip" else "elementwise"))
ndarray.dot = lambda self, b, out=None: dot(self, b, out=out)
for _name in ("sum", "mean", "max", "min", "argmax", "argmin", "any", "all", "prod", "var", "std", "cumsum"):
    setattr(ndarray, _name, _method(_name, "reduction"))

_BINARY = dict(add=np.add, sub=np.subtract, mul=np.multiply, truediv=np.true_divide, floordiv=np.floor_divide,
               mod=np.remainder, pow=np.power, matmul=np.matmul, and_=np.bitwise_and, or_=np.bitwise_or,
               xor=np.bitwise_xor, lshift=np.left_shift, rshift=np.right_shift)
for _name, _op in _BINARY.items():
    _dunder = _name.rstrip("_")
    setattr(ndarray, f"__{_dunder}__", lambda self, other, op=_op: self._binary(op, other))
    setattr(ndarray, f"__r{_dunder}__", lambda self, other, op=_op: self._binary(op, other, reflected=True))
    if _op is not np.matmul:
        setattr(ndarray, f"__i{_dunder}__", lambda self, other, op=_op: self._inplace(op, other))
for _name, _op in dict(eq=np.equal, ne=np.not_equal, lt=np.less, le=np.less_equal, gt=np.greater,
                       ge=np.greater_equal).items():
    setattr(ndarray, f"__{_name}__", lambda self, other, op=_op: self._binary(op, other))
for _name, _op in dict(neg=np.negative, pos=np.positive, abs=np.absolute, invert=np.invert).items():
    setattr(ndarray, f"__{_name}__", lambda self, op=_op: _run("elementwise", op, (self,), {}))
ndarray.__hash__ = None


class _Ufunc:
    """A NumPy ufunc applied to emulated arrays, with its methods (add.at, maximum.reduce, ...)."""

    def __init__(self, ufunc):
        self.ufunc = ufunc
        self.__name__ = ufunc.__name__

    def __call__(self, *args, **kwargs):
        return _run("elementwise", self.ufunc, args, kwargs, what=self.__name__)

    def reduce(self, *args, **kwargs):
        return _run("reduction", self.ufunc.reduce, args, kwargs, what=f"{self.__name__}.reduce")

    def accumulate(self, *args, **kwargs):
        return _run("reduction", self.ufunc.accumulate, args, kwargs, what=f"{self.__name__}.accumulate")

    def outer(self, *args, **kwargs):
        return _run("elementwise", self.ufunc.outer, args, kwargs, what=f"{self.__name__}.outer")

    def at(self, target, index, values=None):
        reads = []
        host_index = _unwrap(index, reads)
        args = (target._host, host_index) + (() if values is None else (_unwrap(values, reads),))
        operation("elementwise", reads=reads, writes=[target], what=f"{self.__name__}.at")
        self.ufunc.at(*args)


# --- the namespace: ufuncs, functions, creation

for _name in ("add", "subtract", "multiply", "divide", "true_divide", "floor_divide", "power", "remainder",
              "negative", "absolute", "exp", "log", "log1p", "expm1", "sqrt", "square", "tanh", "sign",
              "maximum", "minimum", "fmax", "fmin", "equal", "not_equal", "less", "less_equal", "greater",
              "greater_equal", "logical_and", "logical_or", "logical_not", "isfinite", "isnan", "isinf",
              "floor", "ceil", "sin", "cos", "bitwise_and", "bitwise_or"):
    globals()[_name] = _Ufunc(getattr(np, _name))
abs = absolute  # noqa: A001 -- cupy.abs


def _function(name, kind):
    numpy_function = getattr(np, name)

    def function(*args, **kwargs):
        return _run(kind, numpy_function, args, kwargs, what=name)
    function.__name__ = name
    return function


for _name in ("sum", "mean", "max", "min", "amax", "amin", "argmax", "argmin", "argsort", "sort", "prod", "any",
              "all", "var", "std", "cumsum", "count_nonzero", "allclose", "array_equal"):
    globals()[_name] = _function(_name, "reduction")
for _name in ("concatenate", "stack", "split", "array_split", "broadcast_to", "where", "clip", "transpose",
              "swapaxes", "reshape", "squeeze", "expand_dims", "moveaxis", "flip", "pad", "take", "repeat",
              "tile", "zeros_like", "ones_like", "full_like", "einsum", "tensordot", "ravel", "diag", "tril",
              "triu", "eye"):
    globals()[_name] = _function(_name, "elementwise")

# --- GEMMs, charged as CuPy runs them (cupy/_core/_routines_linalg.pyx, CuPy v14): which cuBLAS call, which
# compute unit, and which copies it makes of operands cuBLAS cannot read as they are (ledger.py)

# CuPy's compute types (_routines_linalg.pxd) and its process-wide choice per dtype (get_compute_type,
# set_compute_type): TBD until the first 2-D GEMM of the dtype reads CUPY_TF32. Here TBD re-reads it on every
# GEMM (CuPy fixes it then), so a test can set the variable; set_compute_type(dtype, COMPUTE_TYPE_TBD) resets.
COMPUTE_TYPES = dict(COMPUTE_TYPE_TBD=0, COMPUTE_TYPE_DEFAULT=1, COMPUTE_TYPE_PEDANTIC=2, COMPUTE_TYPE_FP16=3,
                     COMPUTE_TYPE_FP32=4, COMPUTE_TYPE_FP64=5, COMPUTE_TYPE_BF16=6, COMPUTE_TYPE_TF32=7)
_compute_types = {}  # dtype char ("e", "E" for bfloat16, "f", "d") -> compute type, TBD when absent
BFLOAT16 = np.dtype(ml_dtypes.bfloat16)
HALF_DTYPES = (np.dtype(np.float16), BFLOAT16)  # the 16-bit floats: GEMMs computed in float32


def _compute_type_key(dtype):
    char = "E" if np.dtype(dtype) == BFLOAT16 else np.dtype(dtype).char
    key = dict(e="e", E="E", f="f", F="f", d="d", D="d").get(char)
    if key is None:
        raise TypeError(f"dtype is not supported: {dtype}")
    return key


def set_compute_type(dtype, compute_type):
    """cupy._core.set_compute_type: the compute type of `dtype`'s 2-D GEMMs from now on, process-wide."""
    if compute_type not in COMPUTE_TYPES.values():
        raise ValueError(f"Unknown compute type: {compute_type}")
    _compute_types[_compute_type_key(dtype)] = compute_type


def get_compute_type(dtype):
    """cupy._core.get_compute_type: the type set, else DEFAULT, or TF32 for float32 when CUPY_TF32 > 0."""
    key = _compute_type_key(dtype)
    chosen = _compute_types.get(key, 0)
    if chosen:
        return chosen
    tf32 = key == "f" and int(os.environ.get("CUPY_TF32", "0")) > 0
    return COMPUTE_TYPES["COMPUTE_TYPE_TF32" if tf32 else "COMPUTE_TYPE_DEFAULT"]


# cupy._core, the part of it minidl uses, with _routines_linalg's names of the compute types
_core = types.SimpleNamespace(set_compute_type=set_compute_type, get_compute_type=get_compute_type,
                              _routines_linalg=types.SimpleNamespace(**COMPUTE_TYPES))


def _gemm_unit(dtype, two_d):
    """The batched path (matmul, ndim > 2) passes the data type as cuBLAS's compute type: plain FP32 on the
    SIMT units (matmul: gemmStridedBatchedEx / sgemmBatched). The 2-D path (tensordot_core_v11) computes
    float32 on TF32 tensor cores when get_compute_type(float32) is COMPUTE_TYPE_TF32 (CUBLAS_COMPUTE_32F_FAST_TF32),
    and float16 and bfloat16 (gemmEx, CUDA_R_16F / CUDA_R_16BF) in CUBLAS_COMPUTE_32F with
    CUBLAS_GEMM_DEFAULT_TENSOR_OP: tensor cores (roofline's fp16 and bf16 units)."""
    dtype = np.dtype(dtype)
    if dtype == np.float64:
        return "fp64"
    if two_d and dtype == np.float16:
        return "fp16"
    if two_d and dtype == BFLOAT16:
        return "bf16"
    if two_d and dtype == np.float32 and get_compute_type(dtype) == COMPUTE_TYPES["COMPUTE_TYPE_TF32"]:
        return "tf32"
    return "fp32-simt"  # integers run CuPy's own SIMT kernel (_integral_tensordot_core): charged alike


def round_to_tf32(host):
    """float32 values rounded to TF32's 10-bit mantissa (to nearest, ties away from zero, as cvt.rna.tf32.f32),
    the form in which tensor cores read GEMM inputs under CUBLAS_COMPUTE_32F_FAST_TF32; non-finite kept."""
    bits = np.ascontiguousarray(host, dtype=np.float32).view(np.uint32)
    rounded = ((bits + np.uint32(0x1000)) & np.uint32(0xFFFFE000)).view(np.float32)
    return np.where(np.isfinite(host), rounded, host).astype(np.float32, copy=False)


def _on_tf32(fn):
    """fn(a, b, ...) on the operands as TF32 tensor cores read them; products and sums stay float32."""
    def product(a, b, **kwargs):
        return fn(round_to_tf32(a), round_to_tf32(b), **kwargs)
    return product


def _in_float32(fn, dtype):
    """fn(a, b) of 16-bit operands as gemmEx computes it under CUBLAS_COMPUTE_32F: products and sums in
    float32, the result rounded once to `dtype` (into `out` where given)."""
    def product(a, b, out=None):
        result = fn(a.astype(np.float32), b.astype(np.float32)).astype(dtype)
        if out is None:
            return result
        out[...] = result
        return out
    return product


def _hidden_copy(array, dtype, name):
    """A copy CuPy makes inside a GEMM call (ascontiguousarray, a dtype cast, a copy into out=)."""
    nbytes = array.nbytes + array.size * np.dtype(dtype).itemsize
    operation("copy", reads=[array], cost=Cost(unit="d2d", nbytes=nbytes, name=name, hidden=True))


def _gemm_cost(m, n, k, batch, dtype, two_d, name):
    itemsize = np.dtype(dtype).itemsize
    return Cost(unit=_gemm_unit(dtype, two_d), flops=2 * m * n * k * batch,
                nbytes=itemsize * batch * (m * k + k * n + m * n), name=name)


def matmul(a, b, out=None):
    """cupy.matmul: ndim <= 2 is dot (tensordot_core); above, ascontiguousarray of both operands (float16
    upcast to float32), then one strided-batched FP32 GEMM (_routines_linalg.pyx: matmul). bfloat16 is
    taken as float16 there (an assumption: not read in CuPy's source)."""
    if not (isinstance(a, ndarray) and isinstance(b, ndarray)) or 0 in (a.ndim, b.ndim):
        return _run("gemm", np.matmul, (a, b), {} if out is None else dict(out=out), what="matmul")
    ndim = builtins.max(a.ndim, b.ndim)  # cupy.max shadows the builtin here
    if ndim <= 2:
        copy_out = out is not None and not (out.flags.c_contiguous and out.dtype == np.result_type(a.dtype, b.dtype))
        return _dot(a, b, out, np.matmul, copy_out)
    dtype = np.promote_types(a.dtype, b.dtype)
    compute = np.dtype(np.float32) if dtype in HALF_DTYPES else dtype
    for operand, which in ((a, "a"), (b, "b")):
        if not operand.flags.c_contiguous or operand.dtype != compute:
            _hidden_copy(operand, compute, f"matmul: ascontiguousarray({which})")
    m = a.shape[-2] if a.ndim > 1 else 1
    k, n = a.shape[-1], (b.shape[-1] if b.ndim > 1 else 1)
    lead_a, lead_b = (1,) * (ndim - a.ndim) + a.shape[:-2], (1,) * (ndim - b.ndim) + b.shape[:-2]
    lead = np.broadcast_shapes(lead_a[:ndim - 2], lead_b[:ndim - 2])
    batch = int(np.prod(lead))
    if lead_a[:ndim - 2] != lead or lead_b[:ndim - 2] != lead:  # broadcast: pointer tables (_mat_ptrs), 3 kernels
        for _ in range(3):
            operation("elementwise", cost=Cost(nbytes=8 * batch, name="matmul: _mat_ptrs", hidden=True))
    cost = _gemm_cost(m, n, k, batch, compute, False, "matmul (batched)")
    direct = out is not None and out.dtype == compute and out.flags.c_contiguous

    def batched(x, y, **kwargs):  # on the operands as copied: float16 and bfloat16 upcast to float32
        return np.matmul(x.astype(compute, copy=False), y.astype(compute, copy=False), **kwargs)
    result = _run("gemm", batched, (a, b), dict(out=out) if direct else {}, what="matmul", cost=cost)
    if out is not None and not direct:
        return _copy_into(result, out, "matmul: copy into out")
    if compute != dtype:  # float16, bfloat16: computed in float32, then cast back (elementwise_copy)
        return _run("copy", lambda c: c.astype(dtype), (result,), {}, cost=Cost(name=f"matmul: {dtype} result",
                                                                                hidden=True))
    return result


def _copy_into(result, out, name):
    """CuPy's elementwise_copy of a GEMM's temporary result into an `out` it could not write directly."""
    operation("copy", reads=[result], writes=[out], cost=Cost(name=name, hidden=True))
    out._host[...] = result._host
    return out


def dot(a, b, out=None):
    """cupy.dot: operands as (k, n) and (k, m) matrices with transposes passed to cuBLAS as flags, a copy
    only of one neither C- nor F-contiguous (tensordot_core, _mat_to_cublas_contiguous)."""
    return _dot(a, b, out, np.dot, False)


def _dot(a, b, out, fn, copy_out):
    if not (isinstance(a, ndarray) and isinstance(b, ndarray)) or 0 in (a.ndim, b.ndim):
        return _run("elementwise" if 0 in (np.ndim(a), np.ndim(b)) else "gemm", fn, (a, b),
                    {} if out is None else dict(out=out), what="dot")
    k = a.shape[-1]
    n, m = a.size // builtins.max(k, 1), b.size // builtins.max(k, 1)
    dtype = np.promote_types(a.dtype, b.dtype)
    if n == 1 and m == 1:  # a vector product: one reduction kernel (_tensordot_core_mul_sum)
        return _run("reduction", fn, (a, b), {} if out is None else dict(out=out), what="dot",
                    cost=Cost(flops=2 * k, name="dot (vectors)"))
    for operand, which in ((a, "a"), (b, "b")):
        cublas_ready = operand.flags.c_contiguous or (operand.ndim <= 2 and operand.flags.f_contiguous)
        if not cublas_ready or operand.dtype != dtype:
            _hidden_copy(operand, dtype, f"dot: a contiguous copy of {which}")
    cost = _gemm_cost(n, m, k, 1, dtype, True, "dot (2-D)")
    if cost.unit == "tf32":
        fn = _on_tf32(fn)
    elif dtype in HALF_DTYPES:
        fn = _in_float32(fn, dtype)
    if out is None or not copy_out:
        return _run("gemm", fn, (a, b), {} if out is None else dict(out=out), what="dot", cost=cost)
    return _copy_into(_run("gemm", fn, (a, b), {}, what="dot", cost=cost), out, "matmul: copy into out")


newaxis = None
float16, float32, float64 = np.float16, np.float32, np.float64
int8, int16, int32, int64 = np.int8, np.int16, np.int32, np.int64
uint8, uint16, uint32, uint64 = np.uint8, np.uint16, np.uint32, np.uint64
bool_, dtype, inf, nan, pi = np.bool_, np.dtype, np.inf, np.nan, np.pi
float_ = np.float64


def ndim(a):
    return np.ndim(a._host) if isinstance(a, ndarray) else np.ndim(a)


def shape(a):
    return a.shape


def empty(shape, dtype=float, order="C"):
    return ndarray(shape, dtype, order=order)


def empty_like(a, dtype=None, order="K", shape=None):
    return empty(a.shape if shape is None else shape, a.dtype if dtype is None else dtype)


def _created(host, what):
    array = ndarray._new(host)
    operation("elementwise", writes=[array], what=what)
    return array


def zeros(shape, dtype=float, order="C"):
    return _created(np.zeros(shape, dtype, order=order), "zeros")


def ones(shape, dtype=float, order="C"):
    return _created(np.ones(shape, dtype, order=order), "ones")


def full(shape, fill_value, dtype=None, order="C"):
    return _created(np.full(shape, fill_value, dtype, order=order), "full")


def arange(*args, **kwargs):
    return _created(np.arange(*args, **kwargs), "arange")


def linspace(*args, **kwargs):
    return _created(np.linspace(*args, **kwargs), "linspace")


def array(obj, dtype=None, copy=True, order="K", ndmin=0):
    """A new device array; from host data it is a host-to-device copy on the current stream."""
    if isinstance(obj, ndarray):
        result = _run("copy", np.array, (obj,), dict(dtype=dtype, copy=True, order=order, ndmin=ndmin),
                      what="array")
        return result
    host = np.array(obj, dtype=dtype, copy=True, order=order, ndmin=ndmin)
    if host.dtype == object:
        raise ValueError(f"Unsupported dtype object: cannot make a device array from {type(obj).__name__}")
    array_ = ndarray._new(host)
    pinned = isinstance(obj, np.ndarray) and is_pinned(obj) and host.dtype == obj.dtype
    operation("copy", writes=[array_], what="a host-to-device copy", cost=Cost(unit="h2d", pinned=pinned))
    return array_


def asarray(a, dtype=None, order=None):
    if isinstance(a, ndarray) and (dtype is None or np.dtype(dtype) == a.dtype):
        return a
    if isinstance(a, ndarray):
        return a.astype(dtype)
    return array(a, dtype=dtype, order=order or "K")


def ascontiguousarray(a, dtype=None):
    if isinstance(a, ndarray):
        if a.flags.c_contiguous and (dtype is None or np.dtype(dtype) == a.dtype):
            return a
        return _run("copy", np.ascontiguousarray, (a,), dict(dtype=dtype), what="ascontiguousarray")
    return array(a, dtype=dtype, order="C")


def asnumpy(a, stream=None, order="C", out=None, blocking=True):
    if isinstance(a, ndarray):
        return a.get(stream=stream, order=order, out=out, blocking=blocking)
    return np.asarray(a, order=order)


def get_default_memory_pool():
    return cuda._pool


def get_default_pinned_memory_pool():
    return cuda._pool


# --- random: NumPy's generators, whose numbers land in device memory (not CuPy's sequences)

class _Random:
    """Draws on the host, then a host-to-device copy on the current stream."""

    def __init__(self, generator):
        self._generator = generator

    def _draw(self, method, *args, dtype=None, **kwargs):
        host = np.asarray(getattr(self._generator, method)(*args, **kwargs))
        if dtype is not None:
            host = host.astype(dtype)
        return array(host)


class RandomState(_Random):
    def __init__(self, seed=None):
        super().__init__(np.random.RandomState(None if seed is None else seed % 2 ** 32))

    def random_sample(self, size=None, dtype=float):
        return self._draw("random_sample", size, dtype=dtype)

    def rand(self, *size, dtype=float):
        return self._draw("random_sample", size, dtype=dtype)

    def standard_normal(self, size=None, dtype=float):
        return self._draw("standard_normal", size, dtype=dtype)

    def normal(self, loc=0.0, scale=1.0, size=None, dtype=float):
        return self._draw("normal", loc, scale, size, dtype=dtype)

    def uniform(self, low=0.0, high=1.0, size=None, dtype=float):
        return self._draw("uniform", low, high, size, dtype=dtype)

    def randint(self, low, high=None, size=None, dtype=int):
        return self._draw("randint", low, high, size, dtype=dtype)


class Generator(_Random):
    def __init__(self, seed=None):
        super().__init__(np.random.default_rng(seed))

    def random(self, size=None, dtype=np.float64):
        return self._draw("random", size, dtype=dtype)

    def standard_normal(self, size=None, dtype=np.float64):
        return self._draw("standard_normal", size, dtype=dtype)

    def integers(self, low, high=None, size=None, dtype=np.int64):
        return self._draw("integers", low, high, size, dtype=dtype)

    def uniform(self, low=0.0, high=1.0, size=None):
        return self._draw("uniform", low, high, size)


class random:  # noqa: N801 -- cupy.random
    RandomState = RandomState
    Generator = Generator

    @staticmethod
    def default_rng(seed=None):
        return Generator(seed)

    @staticmethod
    def seed(seed=None):
        random._global = RandomState(seed)

    _global = None

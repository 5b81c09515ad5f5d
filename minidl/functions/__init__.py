"""Autograd functions: the math of minidl, each a minidl.core.Function.

Every operation has one shape. Function.forward and Function.backward make the
CPU/GPU choice, by the device of the inputs: they run `forward_cpu` or
`forward_gpu` (and `backward_cpu` or `backward_gpu`), matching pairs side by
side in conv, pooling, LRN, ReLU, dropout and the loss, whose GPU halves are
kernels in the .cu file beside each (fused: one pass where NumPy takes
several). Where one array-module path (`xp = self.device.xp`) serves both
devices, as for the arithmetic, reduction, shape, linear and transfer
operations, the operation overrides `forward` or `backward` itself.
GPU kernels run through minidl.kernels.launch.

Each module holds one kind of operation. The Tensor's operators (+, *, @, [...])
and its methods that are functions (to, astype, sum, reshape, ...) are installed
here, as DeZero does: the functions import minidl.core, never the reverse.
"""
import math
import numbers

from minidl.core import Tensor
from minidl.errors import MinidlError
from minidl.functions.activation import relu
from minidl.functions.conv import conv2d
from minidl.functions.dropout import dropout
from minidl.functions.lrn import local_response_norm
from minidl.functions.pooling import max_pool2d
from minidl.functions.arithmetic import add, div, exp, log, mul, neg, pow, sub, sum_to
from minidl.functions.linear import linear, matmul
from minidl.functions.loss import softmax, softmax_cross_entropy
from minidl.functions.reduction import max, mean, sum
from minidl.functions.shape import broadcast_to, concat, flatten, getitem, reshape, split, transpose
from minidl.functions.transfer import astype, copy


def _rpow(x, base):
    if not isinstance(base, numbers.Real) or base <= 0:
        raise MinidlError(f"base ** tensor needs a positive number as base, got {base!r}")
    return exp(x * math.log(base))


def _same(x, device):
    from minidl.device import device as as_device
    return as_device(device) is x.device


def _shape_args(shape):
    return tuple(shape[0]) if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else shape


def install_tensor_methods():
    methods = dict(
        __add__=add, __radd__=lambda x, other: add(other, x),
        __sub__=sub, __rsub__=lambda x, other: sub(other, x),
        __mul__=mul, __rmul__=lambda x, other: mul(other, x),
        __truediv__=div, __rtruediv__=lambda x, other: div(other, x),
        __neg__=neg, __pow__=pow, __rpow__=_rpow,
        __matmul__=matmul, __rmatmul__=lambda x, other: matmul(other, x),
        __getitem__=getitem,
        to=lambda x, device: x if _same(x, device) else copy(x, device),
        astype=astype, exp=exp, log=log, relu=relu,
        sum=lambda x, axis=None, keepdims=False: sum(x, axis, keepdims),
        mean=lambda x, axis=None, keepdims=False: mean(x, axis, keepdims),
        max=lambda x, axis=None, keepdims=False: max(x, axis, keepdims),
        reshape=lambda x, *shape: reshape(x, _shape_args(shape)),
        transpose=lambda x, *axes: transpose(x, _shape_args(axes) or None),
        T=property(lambda x: transpose(x)),
    )
    for name, method in methods.items():
        setattr(Tensor, name, method)


install_tensor_methods()

"""Autograd functions: the math of minidl, each a minidl.core.Function, one kind per module.

A Function runs `forward_cpu`/`forward_gpu` (and `backward_cpu`/`backward_gpu`) by its inputs'
device; the GPU halves of conv, pooling, LRN, ReLU, dropout and the loss are kernels in the .cu
file beside each, run through minidl.kernels.launch. Operations with one array-module path
(`xp = self.device.xp`: arithmetic, reduction, shape, linear, transfer) override `forward` or
`backward` themselves. The Tensor's operators (+, *, @, [...]) and methods (to, astype, sum,
reshape, ...) are installed here: the functions import minidl.core, never the reverse.
"""
import math
import numbers

from minidl.core import Tensor
from minidl.device import device as as_device
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
from minidl.functions.transfer import astype, concat_to, copy, exchange


def _rpow(x, base):
    if not isinstance(base, numbers.Real) or base <= 0:
        raise MinidlError(f"base ** tensor needs a positive number as base, got {base!r}")
    return exp(x * math.log(base))


def _same(x, device):
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

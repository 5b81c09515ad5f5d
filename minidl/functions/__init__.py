"""Autograd functions: the math of minidl, each with its NumPy and CuPy path.

Each module holds one kind of operation; the Tensor operators (+, *, @, [...])
call the functions re-exported here.
"""
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

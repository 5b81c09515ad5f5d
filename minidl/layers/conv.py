"""Conv2d: a grouped 2-D convolution with weights (out, in/groups, kh, kw); stacked_conv2d for
convolutions that read the same input."""
from __future__ import annotations

from typing import List, Optional, Sequence, Union

import numpy as np

from minidl.core import Tensor
from minidl.device import Device
from minidl.functions import concat, split
from minidl.functions.activation import check_activation
from minidl.functions.conv import conv2d
from minidl.layers import init
from minidl.layers.layer import Layer, Parameter, in_compute_dtype, make_rng


class Conv2d(Layer):
    """conv2d(x, W, b) with its own parameters; `algorithm` and `activation` as minidl.functions.conv2d
    takes them."""

    def __init__(self, in_channels: int, out_channels: int, ksize: int, stride: int = 1, pad: int = 0,
                 groups: int = 1, bias: bool = True, device: Union[Device, str, None] = "cpu",
                 W_init: Optional[init.Initialiser] = None, b_init: init.Initialiser = init.zeros,
                 rng: Union[np.random.Generator, int, None] = None, algorithm: Optional[str] = None,
                 activation: Optional[str] = None):
        super().__init__(device)
        self.activation = check_activation(activation)  # "relu": the bias and ReLU in one pass
        self.algorithm = algorithm  # None: MINIDL_CONV_ALGORITHM, else "auto" (see minidl.functions.conv2d)
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.ksize, self.stride, self.pad = ksize, stride, pad
        rng = make_rng(rng)
        W_init = W_init or init.he_normal()
        self.W = Parameter(W_init((out_channels, in_channels // groups, ksize, ksize), rng), device=self.device)
        self.b = Parameter(b_init((out_channels,), rng), device=self.device) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        x, W = in_compute_dtype(x, self.W)  # the bias stays float32 (functions/activation.cu)
        return conv2d(x, W, self.b, stride=self.stride, pad=self.pad, groups=self.groups,
                      algorithm=self.algorithm, activation=self.activation)

    def describe(self) -> str:
        groups = f", groups={self.groups}" if self.groups > 1 else ""
        relu = " + ReLU" if self.activation else ""
        return (f"Conv2d({self.in_channels}->{self.out_channels}, {self.ksize}x{self.ksize}, "
                f"stride {self.stride}, pad {self.pad}{groups}){relu}")


def stacked_conv2d(convs: Sequence[Conv2d], x: Tensor) -> List[Tensor]:
    """[conv(x) for conv in convs], computed as ONE convolution over their filters stacked, split back.

    For ungrouped convolutions of one geometry on x's device that read the same
    x (parallel branches' first layers on one device): x's patches are gathered
    once, and the one product, with every layer's filters, runs nearer the
    BLAS's peak than a thinner one per layer. Each layer keeps its own
    parameters, which get their own gradients, and its forward hooks see its
    own output. Anything else takes one call per layer.
    """
    def geometry(conv):
        return (conv.device, conv.in_channels, conv.ksize, conv.stride, conv.pad, conv.groups, conv.algorithm,
                conv.b is None, conv.activation)
    first = convs[0]
    if len(convs) < 2 or first.groups != 1 or x.device is not first.device or \
            any(geometry(conv) != geometry(first) for conv in convs):
        return [conv(x) for conv in convs]
    # each layer's weights as it computes with them (in 16 bits, their kept casts), then stacked
    W = concat(in_compute_dtype(*[conv.W for conv in convs]), axis=0)
    b = None if first.b is None else concat([conv.b for conv in convs], axis=0)  # float32 in any precision
    (x,) = in_compute_dtype(x)
    ys = split(conv2d(x, W, b, stride=first.stride, pad=first.pad, algorithm=first.algorithm,
                      activation=first.activation),
               [conv.out_channels for conv in convs], axis=1)
    for conv, y in zip(convs, ys):
        conv.run_forward_hooks((x,), y)
    return ys

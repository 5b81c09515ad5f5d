"""Conv2d: a grouped 2-D convolution with weights (out, in/groups, kh, kw)."""
from minidl.functions.conv import conv2d
from minidl.layers import init
from minidl.layers.layer import Layer, Parameter, make_rng


class Conv2d(Layer):
    def __init__(self, in_channels, out_channels, ksize, stride=1, pad=0, groups=1, bias=True,
                 device="cpu", W_init=None, b_init=init.zeros, rng=None, algorithm=None):
        super().__init__(device)
        self.algorithm = algorithm  # None: MINIDL_CONV_ALGORITHM, else "auto" (see minidl.functions.conv2d)
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.ksize, self.stride, self.pad = ksize, stride, pad
        rng = make_rng(rng)
        W_init = W_init or init.he_normal()
        self.W = Parameter(W_init((out_channels, in_channels // groups, ksize, ksize), rng), device=self.device)
        self.b = Parameter(b_init((out_channels,), rng), device=self.device) if bias else None

    def forward(self, x):
        return conv2d(x, self.W, self.b, stride=self.stride, pad=self.pad, groups=self.groups,
                      algorithm=self.algorithm)

    def describe(self):
        groups = f", groups={self.groups}" if self.groups > 1 else ""
        return (f"Conv2d({self.in_channels}->{self.out_channels}, {self.ksize}x{self.ksize}, "
                f"stride {self.stride}, pad {self.pad}{groups})")

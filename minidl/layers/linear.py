"""Linear: the fully connected layer y = x W^T + b, W of shape (out, in)."""
from minidl.functions import linear
from minidl.layers import init
from minidl.layers.layer import Layer, Parameter, make_rng


class Linear(Layer):
    def __init__(self, in_features, out_features, bias=True, device="cpu",
                 W_init=None, b_init=init.zeros, rng=None):
        super().__init__(device)
        self.in_features, self.out_features = in_features, out_features
        rng = make_rng(rng)
        W_init = W_init or init.he_normal()
        self.W = Parameter(W_init((out_features, in_features), rng), device=self.device)
        self.b = Parameter(b_init((out_features,), rng), device=self.device) if bias else None

    def forward(self, x):
        return linear(x, self.W, self.b)

    def describe(self):
        return f"Linear({self.in_features}->{self.out_features})"

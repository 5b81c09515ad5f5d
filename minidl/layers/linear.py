"""Linear: the fully connected layer y = x W^T + b, W of shape (out, in), optionally relu(y) in the same pass,
and dropout after it in that pass too."""
from __future__ import annotations

from typing import Optional, Sequence, Union

import numpy as np

from minidl.core import Tensor
from minidl.device import Device
from minidl.errors import MinidlError
from minidl.functions import linear
from minidl.functions.activation import check_activation
from minidl.layers import init
from minidl.layers.layer import Layer, Parameter, in_compute_dtype, make_rng
from minidl.layers.simple import mask_generator


class Linear(Layer):
    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 device: Union[Device, str, None] = "cpu", W_init: Optional[init.Initialiser] = None,
                 b_init: init.Initialiser = init.zeros, rng: Union[np.random.Generator, int, None] = None,
                 activation: Optional[str] = None, dropout: float = 0.0,
                 seed: Union[int, Sequence[int], None] = None):
        super().__init__(device)
        self.activation = check_activation(activation)  # "relu": the bias and ReLU in one pass
        if dropout and not (activation == "relu" and bias):
            raise MinidlError("Linear: dropout= (in the layer's own pass) needs a bias and activation='relu'; "
                              "use a Dropout layer otherwise")
        # dropout after the ReLU, as a Dropout layer would do it, with a generator of its own (seed_dropout
        # reseeds it); `seed` as Dropout's
        self.dropout = dropout
        self.generator = mask_generator(seed) if dropout else None
        self.in_features, self.out_features = in_features, out_features
        rng = make_rng(rng)
        W_init = W_init or init.he_normal()
        self.W = Parameter(W_init((out_features, in_features), rng), device=self.device)
        self.b = Parameter(b_init((out_features,), rng), device=self.device) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        p = self.dropout if self.training else 0.0
        x, W = in_compute_dtype(x, self.W)  # the bias stays float32 (functions/activation.cu)
        return linear(x, W, self.b, activation=self.activation, dropout=p, generator=self.generator)

    def describe(self) -> str:
        return (f"Linear({self.in_features}->{self.out_features})" + (" + ReLU" if self.activation else "")
                + (f" + Dropout({self.dropout})" if self.dropout else ""))

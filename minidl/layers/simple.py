"""Layers without parameters: ReLU, LRN, MaxPool2d, Dropout, Flatten."""
from __future__ import annotations

import itertools
import zlib
from typing import Sequence, Union

from minidl.core import Tensor
from minidl.device import Device
from minidl.functions import flatten, relu
from minidl.functions.dropout import MaskGenerator, dropout
from minidl.functions.lrn import local_response_norm
from minidl.functions.pooling import max_pool2d
from minidl.layers.layer import Layer


class ReLU(Layer):
    def forward(self, x: Tensor) -> Tensor:
        return relu(x)


class LRN(Layer):
    """Local response normalization across channels, the paper's constants by default."""

    def __init__(self, n: int = 5, k: float = 2.0, alpha: float = 1e-4, beta: float = 0.75,
                 alpha_over_n: bool = False, device: Union[Device, str, None] = "cpu"):
        super().__init__(device)
        self.n, self.k, self.alpha, self.beta, self.alpha_over_n = n, k, alpha, beta, alpha_over_n

    def forward(self, x: Tensor) -> Tensor:
        return local_response_norm(x, self.n, self.k, self.alpha, self.beta, self.alpha_over_n)

    def describe(self) -> str:
        return f"LRN(n={self.n}, k={self.k}, alpha={self.alpha}, beta={self.beta})"


class MaxPool2d(Layer):
    def __init__(self, ksize: int = 3, stride: int = 2, pad: int = 0, device: Union[Device, str, None] = "cpu"):
        super().__init__(device)
        self.ksize, self.stride, self.pad = ksize, stride, pad

    def forward(self, x: Tensor) -> Tensor:
        return max_pool2d(x, self.ksize, self.stride, self.pad)

    def describe(self) -> str:
        return f"MaxPool2d({self.ksize}, stride {self.stride})"


UNSEEDED = 0x5EED  # a tag in the entropy: an unseeded layer never draws Dropout(seed=n)'s masks
_unseeded_layers = itertools.count()


def mask_generator(seed: Union[int, Sequence[int], None] = None) -> MaskGenerator:
    """A dropout layer's generator (Dropout, or Linear with dropout): without a seed, a distinct one per
    layer in the order they are made."""
    return MaskGenerator([UNSEEDED, next(_unseeded_layers)] if seed is None else seed)


class Dropout(Layer):
    """Inverted dropout: active in train(), the identity in eval(). It draws its masks from
    its own generator; `seed_dropout(model, n)` reseeds every Dropout of a model. Without
    a seed, the layers take distinct ones in the order they are made, so two layers never
    draw the same masks and a script that builds its model the same way draws the same."""

    def __init__(self, p: float = 0.5, device: Union[Device, str, None] = "cpu",
                 seed: Union[int, Sequence[int], None] = None):
        super().__init__(device)
        self.p = p
        self.generator = mask_generator(seed)

    def forward(self, x: Tensor) -> Tensor:
        return dropout(x, self.p, train=self.training, generator=self.generator)

    def describe(self) -> str:
        return f"Dropout({self.p})"


class Flatten(Layer):
    def forward(self, x: Tensor) -> Tensor:
        return flatten(x)


def seed_dropout(model: Layer, seed: int, first_row: int = 0) -> None:
    """Reseed every layer of `model` that drops out (Dropout, Linear with dropout) from `seed` and the
    layer's dotted name, so the masks are a pure function of (seed, layer, global row) and differ between
    layers. first_row: the global row of this process's row 0 (a data-parallel rank's share)."""
    for name, layer in model.named_layers():
        if isinstance(getattr(layer, "generator", None), MaskGenerator):
            layer.generator.seed([int(seed), zlib.crc32(name.encode())], first_row)

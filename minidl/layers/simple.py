"""Layers without parameters: ReLU, LRN, MaxPool2d, Dropout, Flatten."""
from minidl.functions import flatten, relu
from minidl.functions.dropout import dropout
from minidl.functions.lrn import local_response_norm
from minidl.functions.pooling import max_pool2d
from minidl.layers.layer import Layer


class ReLU(Layer):
    def forward(self, x):
        return relu(x)


class LRN(Layer):
    """Local response normalization across channels, the paper's constants by default."""

    def __init__(self, n=5, k=2.0, alpha=1e-4, beta=0.75, alpha_over_n=False, device="cpu"):
        super().__init__(device)
        self.n, self.k, self.alpha, self.beta, self.alpha_over_n = n, k, alpha, beta, alpha_over_n

    def forward(self, x):
        return local_response_norm(x, self.n, self.k, self.alpha, self.beta, self.alpha_over_n)

    def describe(self):
        return f"LRN(n={self.n}, k={self.k}, alpha={self.alpha}, beta={self.beta})"


class MaxPool2d(Layer):
    def __init__(self, ksize=3, stride=2, pad=0, device="cpu"):
        super().__init__(device)
        self.ksize, self.stride, self.pad = ksize, stride, pad

    def forward(self, x):
        return max_pool2d(x, self.ksize, self.stride, self.pad)

    def describe(self):
        return f"MaxPool2d({self.ksize}, stride {self.stride})"


class Dropout(Layer):
    """Inverted dropout: active in train(), the identity in eval()."""

    def __init__(self, p=0.5, device="cpu"):
        super().__init__(device)
        self.p = p

    def forward(self, x):
        return dropout(x, self.p, train=self.training)

    def describe(self):
        return f"Dropout({self.p})"


class Flatten(Layer):
    def forward(self, x):
        return flatten(x)

"""Layer: parameters, sub-layers, device placement and train/eval mode.

A layer lives on one device; its parameters are there, and it refuses an input
from anywhere else (the model moves tensors with an explicit `copy`, so every
transfer is visible in the model's code). Attributes that are Parameters or
Layers are registered in assignment order, which gives stable dotted names
such as `tower0.conv1.W`.
"""
import numpy as np

from minidl.core import Tensor
from minidl.device import device as as_device
from minidl.errors import MinidlError


class Parameter(Tensor):
    """A Tensor that a layer owns and an optimizer updates."""

    def __init__(self, data, device=None):
        super().__init__(data, requires_grad=True, device=device)
        self.grad_hooks = []  # called with the parameter after backward adds to its .grad (see Tensor.grad_hooks)


class Layer:
    def __init__(self, device="cpu"):
        object.__setattr__(self, "_params", {})
        object.__setattr__(self, "_layers", {})
        object.__setattr__(self, "_hooks", [])
        self.device = as_device(device) if device is not None else None
        self.training = True

    def __setattr__(self, name, value):
        if isinstance(value, Parameter):
            self._params[name] = value
        elif isinstance(value, Layer):
            self._layers[name] = value
        object.__setattr__(self, name, value)

    # --- what the layer holds
    def named_params(self, prefix=""):
        for name, p in self._params.items():
            yield prefix + name, p
        for name, layer in self._layers.items():
            yield from layer.named_params(f"{prefix}{name}.")

    def params(self):
        return [p for _, p in self.named_params()]

    def named_layers(self, prefix=""):
        for name, layer in self._layers.items():
            yield prefix + name, layer
            yield from layer.named_layers(f"{prefix}{name}.")

    def num_params(self):
        return sum(p.size for p in self.params())

    def zero_grad(self):
        for p in self.params():
            p.grad = None

    # --- mode and placement
    def train(self, mode=True):
        self.training = mode
        for layer in self._layers.values():
            layer.train(mode)
        return self

    def eval(self):
        return self.train(False)

    def to(self, device=None, dtype=None):
        """Move this layer (parameters and sub-layers) to a device and/or dtype, in place.

        The Parameter objects stay the same, so an optimizer made before the move
        updates the moved data (its velocities follow on the next step).
        """
        target = as_device(device) if device is not None else None
        for p in self._params.values():
            data = p.numpy() if target is not None else p.data
            if dtype is not None:
                with p.device:  # a cast on the GPU runs on its own device's stream
                    data = data.astype(dtype)
            moved = Tensor(data, device=target or p.device)
            p.data, p.device, p.grad = moved.data, moved.device, None
        if target is not None and self.device is not None:
            self.device = target
        for layer in self._layers.values():
            layer.to(device, dtype)
        return self

    def register_forward_hook(self, hook):
        """Call hook(layer, inputs, output) after every forward of this layer; returns a remover."""
        self._hooks.append(hook)
        return lambda: self._hooks.remove(hook)

    # --- calling
    def __call__(self, *inputs):
        if self.device is not None:
            for x in inputs:
                if isinstance(x, Tensor) and x.device is not self.device:
                    raise MinidlError(
                        f"{self.describe()} lives on {self.device} but got an input on {x.device}; "
                        f"move it explicitly with minidl.functions.copy(x, '{self.device}')")
        y = self.forward(*inputs)
        for hook in self._hooks:
            hook(self, inputs, y)
        return y

    def forward(self, *inputs):
        raise NotImplementedError

    def describe(self):
        return type(self).__name__

    def __repr__(self):
        return f"{self.describe()} on {self.device}" if self.device is not None else self.describe()


class Sequential(Layer):
    """Layers applied in order; they keep their own devices."""

    def __init__(self, *layers):
        super().__init__(device=None)
        for i, layer in enumerate(layers):
            setattr(self, str(i), layer)

    def __iter__(self):
        return iter(self._layers.values())

    def __len__(self):
        return len(self._layers)

    def forward(self, x):
        for layer in self._layers.values():
            x = layer(x)
        return x


def make_rng(rng):
    """A NumPy Generator from a Generator, a seed or None."""
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)

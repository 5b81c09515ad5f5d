"""Layer: parameters, sub-layers, device placement and train/eval mode.

A layer lives on one device; its parameters are there, and it refuses an input
from anywhere else (the model moves tensors with an explicit `copy`, so every
transfer is visible in the model's code). Attributes that are Parameters or
Layers are registered in assignment order, which gives stable dotted names
such as `block0.conv1.W`.
"""
from __future__ import annotations

from typing import Any, Callable, Iterator, List, Tuple, Union

import numpy as np

from minidl.core import Tensor
from minidl.device import Device, device as as_device
from minidl.errors import MinidlError
from minidl.functions.transfer import astype
from minidl.precision import compute_dtype


class Parameter(Tensor):
    """A Tensor that a layer owns and an optimizer updates."""

    def __init__(self, data: Any, device: Union[Device, str, None] = None):
        super().__init__(data, requires_grad=True, device=device)
        self.grad_hooks = []  # called with the parameter after backward adds to its .grad (see Tensor.grad_hooks)
        # mixed precision: the parameter cast to the 16-bit dtype its layers compute in, kept as (array, the data
        # it was made from, version); the optimizer writes it with the weights (optim.cu), so a step needs no cast
        self._cast = None
        self.version = 0  # counts the writes of data (written()): a cast of an older version is stale

    def cast(self, dtype) -> Tensor:
        """This parameter as `dtype` for a forward (an autograd-visible cast): the kept copy while it is current,
        else a cast made now, and kept."""
        current = self.current_cast()
        if current is not None and current.dtype == dtype:
            return astype(self, dtype, kept=current)
        y = astype(self, dtype)
        self._cast = (y.data, self.data, self.version)
        return y

    def current_cast(self):
        """The kept cast, if it is of the data as it is now; else None."""
        if self._cast is None:
            return None
        array, data, version = self._cast
        return array if data is self.data and version == self.version else None

    def written(self, cast=None) -> None:
        """Note that data was written (an update, a loaded checkpoint); `cast`: the copy written with it."""
        self.version += 1
        self._cast = None if cast is None else (cast, self.data, self.version)


ForwardHook = Callable[["Layer", Tuple[Any, ...], Any], None]


class Layer:
    """A part of a model: forward(*inputs) on its device, with its parameters and sub-layers."""

    # Bytes a training step keeps per byte of layer output (summary.training_memory's estimate): the
    # output, its gradient, what the functions save for backward and the temporaries around them (im2col's
    # patches are several times a convolution's output). A model that measured its own sets it.
    training_bytes_per_output_byte = 6

    def __init__(self, device: Union[Device, str, None] = "cpu"):
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
    def named_params(self, prefix: str = "") -> Iterator[Tuple[str, Parameter]]:
        for name, p in self._params.items():
            yield prefix + name, p
        for name, layer in self._layers.items():
            yield from layer.named_params(f"{prefix}{name}.")

    def params(self) -> List[Parameter]:
        return [p for _, p in self.named_params()]

    def named_layers(self, prefix: str = "") -> Iterator[Tuple[str, Layer]]:
        for name, layer in self._layers.items():
            yield prefix + name, layer
            yield from layer.named_layers(f"{prefix}{name}.")

    def num_params(self) -> int:
        return sum(p.size for p in self.params())

    def zero_grad(self) -> None:
        for p in self.params():
            p.grad = None

    # --- mode and placement
    def train(self, mode: bool = True) -> Layer:
        self.training = mode
        for layer in self._layers.values():
            layer.train(mode)
        return self

    def eval(self) -> Layer:
        return self.train(False)

    def to(self, device: Union[Device, str, None] = None, dtype: Any = None) -> Layer:
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

    def register_forward_hook(self, hook: ForwardHook) -> Callable[[], None]:
        """Call hook(layer, inputs, output) after every forward of this layer; returns a remover."""
        self._hooks.append(hook)
        return lambda: self._hooks.remove(hook)

    def run_forward_hooks(self, inputs: Tuple[Any, ...], output: Any) -> None:
        """Call the forward hooks as after a forward of `inputs` that gave `output` (for a layer whose
        forward was computed together with others', as stacked_conv2d does)."""
        for hook in self._hooks:
            hook(self, inputs, output)

    # --- calling
    def __call__(self, *inputs: Any) -> Any:
        if self.device is not None:
            for x in inputs:
                if isinstance(x, Tensor) and x.device is not self.device:
                    raise MinidlError(
                        f"{self.describe()} lives on {self.device} but got an input on {x.device}; "
                        f"move it explicitly with minidl.functions.copy(x, '{self.device}')")
        y = self.forward(*inputs)
        self.run_forward_hooks(inputs, y)
        return y

    def forward(self, *inputs: Any) -> Any:
        raise NotImplementedError

    def describe(self) -> str:
        return type(self).__name__

    def __repr__(self) -> str:
        return f"{self.describe()} on {self.device}" if self.device is not None else self.describe()


class Sequential(Layer):
    """Layers applied in order; they keep their own devices."""

    def __init__(self, *layers: Layer):
        super().__init__(device=None)
        for i, layer in enumerate(layers):
            setattr(self, str(i), layer)

    def __iter__(self) -> Iterator[Layer]:
        return iter(self._layers.values())

    def __len__(self) -> int:
        return len(self._layers)

    def forward(self, x: Any) -> Any:
        for layer in self._layers.values():
            x = layer(x)
        return x


def make_rng(rng: Union[np.random.Generator, int, None]) -> np.random.Generator:
    """A NumPy Generator from a Generator, a seed or None."""
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


def in_compute_dtype(*tensors: Tensor | None) -> list:
    """The tensors a convolution or fully connected layer computes with: under "fp16" or "bf16"
    (minidl.precision), each float32 one cast to that 16-bit dtype by an autograd-visible cast, whose gradient
    comes back float32 (a float32 master weight gets a float32 gradient; a Parameter's cast is kept,
    Parameter.cast); otherwise, and for None, as given."""
    dtype = compute_dtype()
    if dtype is None:
        return list(tensors)
    return [t if t is None or t.dtype != np.float32 else t.cast(dtype) if isinstance(t, Parameter)
            else astype(t, dtype) for t in tensors]

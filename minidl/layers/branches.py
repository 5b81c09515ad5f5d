"""Branches: independent layers run side by side, a core each, on the CPU."""
from __future__ import annotations

import functools
from typing import Any, Callable, Iterator, List, Sequence, TypeVar

from minidl.core import in_this_grad_mode
from minidl.cpu import threads as cpu_threads
from minidl.errors import MinidlError
from minidl.layers.layer import Layer

T = TypeVar("T")


class Branches:
    """Layers that never read each other's outputs while they run, such as a model's parallel towers.

    `map(call, inputs...)` is [call(branch, its inputs...) for each branch]: side by side on the CPU,
    a core each (minidl.cpu.threads.side_by_side), each call in the caller's grad mode; in turn
    where any branch is on a GPU, where they only queue work on their devices' streams. Calling
    Branches with one input per branch calls each branch on its input. Branches holds no parameters:
    the branches stay registered, and named, where the model assigned them.
    """

    def __init__(self, *branches: Layer):
        if not branches or not all(isinstance(branch, Layer) for branch in branches):
            raise MinidlError("Branches takes one or more layers")
        self.branches = branches

    def __iter__(self) -> Iterator[Layer]:
        return iter(self.branches)

    def __len__(self) -> int:
        return len(self.branches)

    def __getitem__(self, index: int) -> Layer:
        return self.branches[index]

    def __call__(self, inputs: Sequence[Any]) -> List[Any]:
        return self.map(lambda branch, x: branch(x), inputs)

    def map(self, call: Callable[..., T], *inputs: Sequence[Any]) -> List[T]:
        """[call(branch, inputs[0][i], inputs[1][i], ...) for the i-th branch], side by side on the CPU."""
        for each in inputs:
            if len(each) != len(self.branches):
                raise MinidlError(f"{len(self.branches)} branches got {len(each)} inputs")
        calls = [functools.partial(call, branch, *args) for branch, *args in zip(self.branches, *inputs)]
        if any(_on_gpu(branch) for branch in self.branches):
            return [call() for call in calls]
        return cpu_threads.side_by_side([in_this_grad_mode(call) for call in calls])


def _on_gpu(layer):
    """Whether the layer (or, for one that names no device, any of its sub-layers) is on a GPU."""
    if layer.device is not None:
        return layer.device.is_cuda
    return any(sub.device is not None and sub.device.is_cuda for _, sub in layer.named_layers())

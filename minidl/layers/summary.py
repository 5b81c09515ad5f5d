"""summary(): each layer with its device, output shape and parameter count; and the
memory a training batch needs, estimated from the same pass."""
from __future__ import annotations

import collections
from typing import Dict, List, Sequence, Tuple, Union

import numpy as np

from minidl.core import Tensor, no_grad
from minidl.device import Device, available_memory
from minidl.errors import MinidlError
from minidl.layers.layer import Layer


def leaf_outputs(model: Layer, input_shape: Sequence[int], device: Union[Device, str, None] = None
                 ) -> List[Tuple[Layer, Tensor, int]]:
    """[(leaf layer, output, output bytes)] from one eval-mode forward pass of random input, in the order
    of model.named_layers() (the output as a Tensor: its shape, and the device it is on, even for a layer
    that names none)."""
    if device is None:
        device = next((l.device for _, l in model.named_layers() if l.device is not None), "cpu")
    x = Tensor(np.random.default_rng(0).standard_normal(input_shape).astype(np.float32), device=device)
    was_training = model.training
    calls = []
    removers = [layer.register_forward_hook(lambda l, inputs, y: calls.append((l, y, y.data.nbytes)))
                for _, layer in model.named_layers()]
    try:
        with no_grad():
            model.eval()(x)
    finally:
        for remove in removers:
            remove()
        model.train(was_training)
    # in the model's order: branches that run side by side (layers.Branches on the CPU) call their hooks in any order
    order = {id(layer): i for i, (_, layer) in enumerate(model.named_layers())}
    calls.sort(key=lambda call: order.get(id(call[0]), len(order)))
    return [call for call in calls if not call[0]._layers]  # leaves only: containers repeat their children


def training_memory(model: Layer, image_shape: Sequence[int]) -> Dict[Device, Tuple[int, int]]:
    """{device: (bytes per image, fixed bytes)} to train on images of `image_shape` (C, H, W):
    activations from a batch-1 pass, times the model's training_bytes_per_output_byte, and each
    parameter three times (weights, gradient, velocity)."""
    per_image, fixed = collections.Counter(), collections.Counter()
    for _, output, nbytes in leaf_outputs(model, (1,) + tuple(image_shape)):
        per_image[output.device] += model.training_bytes_per_output_byte * nbytes
    for p in model.params():
        fixed[p.device] += 3 * p.data.nbytes
    return {dev: (per_image[dev], fixed[dev]) for dev in per_image.keys() | fixed.keys()}


def check_training_memory(model: Layer, batch_size: int, input_size: int) -> None:
    """Refuse (MinidlError, in one line) a training batch of `batch_size` images of input_size^2 that would
    not fit in the memory of the model's devices, before any of it is allocated (train, bench)."""
    places = {}  # logical devices on one GPU share its memory
    for dev, (per_image, fixed) in training_memory(model, (3, input_size, input_size)).items():
        place = places.setdefault(dev.physical if dev.is_cuda else "cpu", [dev, 0, 0])
        place[1] += per_image
        place[2] += fixed
    for dev, per_image, fixed in places.values():
        need, have = fixed + batch_size * per_image, available_memory(dev)
        if have is not None and need > have:
            where = f"GPU {dev.physical}" if dev.is_cuda else "the CPU"
            fits = int((have - fixed) // max(per_image, 1))
            advice = (f"use --batch-size {fits} or less" if fits >= 1 else
                      f"the parameters alone need {fixed / 2**30:.1f} GiB: place the layers on more devices")
            raise MinidlError(f"a batch of {batch_size} needs about {need / 2**30:.1f} GiB on {where}, which has "
                              f"{have / 2**30:.1f} GiB available: {advice}")


def summary(model: Layer, input_shape: Sequence[int], device: Union[Device, str, None] = None) -> str:
    """The table as a string, from one forward pass of a random batch of `input_shape`."""
    names = {id(l): name for name, l in model.named_layers()}
    rows = [(names.get(id(l), type(l).__name__), l.describe(), str(l.device), str(tuple(y.shape)),
             sum(p.size for p in l._params.values()))
            for l, y, _ in leaf_outputs(model, input_shape, device)]
    header = ("layer", "type", "device", "output", "params")
    table = [header] + [r[:4] + (f"{r[4]:,}",) for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(5)]
    lines = ["  ".join(cell.ljust(w) if i < 4 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             for row in table]
    lines.insert(1, "-" * len(lines[0]))
    lines.append("-" * len(lines[0]))
    lines.append(f"total parameters: {model.num_params():,}")
    return "\n".join(lines)

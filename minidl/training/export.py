"""A checkpoint's network out of minidl: an ONNX graph that ONNX Runtime runs, or plain arrays (.npz).

ONNX (opset OPSET): one forward pass on the CPU, in eval mode, is traced through the
autograd graph, and each minidl function becomes its ONNX operator; the towers stay
two branches joined by Concat where they cross, as the model runs them. The graph
takes INPUT_NAME, (N, 3, S, S) float32 RGB 0..255 (the centre crop of the stored
image), subtracts the training mean's crop, scales, and gives OUTPUT_NAME, (N, classes).
npz: every parameter under its dotted minidl name, plus the preprocessing (NPZ_EXTRAS).
The output's suffix chooses the format; the onnx package is needed only for ONNX.
"""
import json
import os
from typing import Callable, Dict, List, Optional

import numpy as np

from minidl.atomic import atomic_path
from minidl.core import Function, Tensor
from minidl.errors import MinidlError
from minidl.functions import activation, arithmetic, conv, lrn, pooling, shape, transfer
from minidl.functions.linear import Linear as LinearFunction, MatMul
from minidl.layers import Layer
from minidl.training.checkpoint import Checkpoint, input_scale, load_checkpoint
from minidl.training.restore import Restored
from minidl.training.visualize import format_by_suffix

OPSET = 17       # ONNX Runtime 1.12 and later run it
IR_VERSION = 8   # the IR of opset 17: runtimes older than the onnx package still load the file
INPUT_NAME, OUTPUT_NAME = "pixels", "probabilities"
FORMATS = {".onnx": "onnx", ".npz": "npz"}
NPZ_EXTRAS = ("mean_image", "input_scale", "class_names")
TRACE_BATCH = 2  # a batch that is not 1, so a reshape's batch dimension is told from a dimension of size 1


def export_format(path: str) -> str:
    """'onnx' or 'npz' by the suffix of `path`; MinidlError for any other."""
    return format_by_suffix(path, FORMATS, lambda suffix: f"cannot export to {path}: unknown format "
                            f"{suffix or '(no suffix)'!r}; the name chooses it: {', '.join(FORMATS)}")


def check_output(path: str) -> str:
    """The format of `path` (export_format), refused before any work if it cannot be written."""
    if os.path.isdir(path):
        raise MinidlError(f"cannot write {path}: it is a folder; give a file name, e.g. "
                          f"{os.path.join(path, 'model.onnx')}")
    kind = export_format(path)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
        raise MinidlError(f"cannot write {path}: {folder} is not a writable folder")
    return kind


def export(checkpoint_path: str, output: str, model_path: Optional[str] = None) -> dict:
    """Write `checkpoint_path`'s network to `output` in the format its suffix names; a summary dict.

    ONNX rebuilds the network from `model_path` (or the built-in AlexNet: restore.model_file_for)."""
    kind = check_output(output)
    if kind == "npz":
        checkpoint = load_checkpoint(checkpoint_path)
        arrays = npz_arrays(checkpoint)
        with atomic_path(output) as tmp, open(tmp, "wb") as f:
            np.savez(f, **arrays)
        return dict(format=kind, path=output, arrays=len(arrays))
    onnx = _import_onnx()
    restored = Restored(checkpoint_path, model_path, devices="cpu")
    model = onnx_model(restored.model, restored.checkpoint, restored.config)
    with atomic_path(output) as tmp:
        onnx.save_model(model, tmp)
    return dict(format=kind, path=output, nodes=len(model.graph.node), opset=OPSET,
                input=[INPUT_NAME, 3, restored.config["input_size"], restored.config["input_size"]])


def _import_onnx():
    try:
        import onnx
    except ImportError:
        raise MinidlError("exporting to ONNX needs the onnx package: pip install 'minidl[export]'") from None
    return onnx


def npz_arrays(checkpoint: Checkpoint) -> Dict[str, np.ndarray]:
    """The parameters by dotted name (float32, as trained) and the preprocessing (NPZ_EXTRAS)."""
    arrays = dict(checkpoint.params)
    config = checkpoint.config()
    arrays["input_scale"] = np.float32(input_scale(config, config["init"]))
    if checkpoint.mean_image is not None:
        arrays["mean_image"] = checkpoint.mean_image.astype(np.float32)
    if "class_names" in checkpoint.attrs:
        arrays["class_names"] = np.array(json.loads(checkpoint["class_names"]), dtype=str)
    return arrays


def onnx_lrn_alpha(alpha: float, n: int) -> float:
    """ONNX's LRN alpha for minidl's: ONNX scales the window's sum by alpha/size, minidl by alpha itself
    (the paper's), so the export multiplies by size, taking the float32 whose division by size rounds
    back to minidl's float32 alpha where one does."""
    target, size = np.float32(alpha), np.float32(n)
    scaled = np.float32(alpha * n)
    for candidate in (scaled, np.nextafter(scaled, np.float32(np.inf)), np.nextafter(scaled, np.float32(0))):
        if candidate / size == target:
            return float(candidate)
    return float(scaled)


# --- the trace


def traced_functions(model: Layer, size: int) -> tuple:
    """(input, output, functions in the order they ran) of one eval-mode forward of TRACE_BATCH images."""
    was_training = model.training
    model.eval()
    try:
        image = Tensor(np.zeros((TRACE_BATCH, 3, size, size), np.float32), requires_grad=True,
                       device=model.input_device)
        output = model(image)
    finally:
        model.train(was_training)
    if not isinstance(output, Tensor) or output.ndim != 2:
        raise MinidlError("cannot export the model: its forward does not return one (batch, classes) tensor")
    return image, output, _in_order(output.creator)


def _in_order(last: Optional[Function]) -> List[Function]:
    """The functions `last` depends on, and itself, each after its inputs' creators (depth first, no recursion)."""
    order, done, stack = [], set(), [(last, False)] if last is not None else []
    while stack:
        function, expanded = stack.pop()
        if id(function) in done:
            continue
        if expanded:
            done.add(id(function))
            order.append(function)
            continue
        stack.append((function, True))
        stack += [(x.creator, False) for x in reversed(function.inputs)
                  if x.creator is not None and id(x.creator) not in done]
    return order


class _Graph:
    """ONNX nodes and initializers under construction; tensors named as they are met."""

    def __init__(self, helper, numpy_helper, params: Dict[int, str]):
        self.helper, self.numpy_helper, self.params = helper, numpy_helper, params
        self.nodes, self.initializers, self.names, self.kept = [], [], {}, []

    def name(self, tensor: Tensor) -> str:
        """The graph's name of a tensor: a parameter's dotted name, a constant's, or an output's."""
        key = id(tensor)
        if key not in self.names:
            self.kept.append(tensor)  # alive while its id is a key
            if tensor.creator is not None:
                raise AssertionError("a function's output is named before the function")
            name = self.params.get(key) or f"constant_{len(self.initializers)}"
            self.names[key] = self.constant(tensor.numpy(), name)
        return self.names[key]

    def constant(self, array: np.ndarray, name: str) -> str:
        self.initializers.append(self.numpy_helper.from_array(np.asarray(array), name))
        return name

    def outputs(self, function: Function) -> List[str]:
        names = []
        for i, ref in enumerate(function.outputs):
            name = f"{type(function).__name__.lower()}_{len(self.nodes)}" + (f"_{i}" if i else "")
            y = ref()
            if y is not None:
                self.kept.append(y)
                self.names[id(y)] = name
            names.append(name)
        return names

    def node(self, op: str, inputs: List[str], outputs: List[str], **attributes) -> None:
        self.nodes.append(self.helper.make_node(op, inputs, outputs, name=f"{op}_{len(self.nodes)}", **attributes))


def _activated(convert: Callable) -> Callable:
    """A converter for a function that may carry its ReLU (activation="relu"): its node, then a Relu."""
    def converted(g, f, ins, outs):
        if not getattr(f, "activation", None):
            return convert(g, f, ins, outs)
        before = [name + "_before_relu" for name in outs]
        convert(g, f, ins, before)
        g.node("Relu", before, outs)
    return converted


@_activated
def _conv(g, f, ins, outs):
    kh, kw = f.inputs[1].shape[2:]
    g.node("Conv", ins, outs, kernel_shape=[kh, kw], strides=[f.stride] * 2, pads=[f.pad] * 4, group=f.groups)


@_activated
def _gemm(g, f, ins, outs):
    g.node("Gemm", ins, outs, transB=1)


def _lrn(g, f, ins, outs):
    g.node("LRN", ins, outs, size=f.n, alpha=onnx_lrn_alpha(f.alpha, f.n), beta=float(f.beta), bias=float(f.k))


def _pool(g, f, ins, outs):
    g.node("MaxPool", ins, outs, kernel_shape=[f.ksize] * 2, strides=[f.stride] * 2, pads=[f.pad] * 4)


def _reshape(g, f, ins, outs):
    # the traced batch becomes 0, ONNX's "as the input's": the graph takes any batch
    batch = f.inputs[0].shape[0] == TRACE_BATCH and f.shape[0] == TRACE_BATCH
    target = np.array([0 if batch else f.shape[0], *f.shape[1:]], dtype=np.int64)
    g.node("Reshape", [ins[0], g.constant(target, outs[0] + "_shape")], outs)


def _split(g, f, ins, outs):
    g.node("Split", [ins[0], g.constant(np.array(f.sizes, np.int64), outs[0] + "_sizes")], outs, axis=f.axis)


def _transpose(g, f, ins, outs):
    axes = f.axes if f.axes is not None else tuple(reversed(range(f.inputs[0].ndim)))
    g.node("Transpose", ins, outs, perm=list(axes))


def _plain(op: str) -> Callable:
    return lambda g, f, ins, outs: g.node(op, ins, outs)


# each minidl function the export knows, and how it becomes ONNX nodes
CONVERTERS = {
    conv.Conv2d: _conv, lrn.LocalResponseNorm: _lrn, pooling.MaxPool2d: _pool, activation.ReLU: _plain("Relu"),
    LinearFunction: _gemm, MatMul: _plain("MatMul"),
    shape.Concat: lambda g, f, ins, outs: g.node("Concat", ins, outs, axis=f.axis), shape.Split: _split,
    shape.Reshape: _reshape, shape.Transpose: _transpose, transfer.Copy: _plain("Identity"),
    transfer.ConcatTo: lambda g, f, ins, outs: g.node("Concat", ins, outs, axis=f.axis),
    transfer.Exchange: lambda g, f, ins, outs: [g.node("Concat", ins, [out], axis=f.axis) for out in outs],
    arithmetic.Add: _plain("Add"), arithmetic.Sub: _plain("Sub"), arithmetic.Mul: _plain("Mul"),
    arithmetic.Div: _plain("Div"), arithmetic.Neg: _plain("Neg"), arithmetic.Exp: _plain("Exp"),
    arithmetic.Log: _plain("Log"),
}


def onnx_model(model: Layer, checkpoint: Checkpoint, config: dict) -> "onnx.ModelProto":  # noqa: F821
    """The ONNX ModelProto of `model` (on the CPU, holding `checkpoint`'s weights), preprocessing included."""
    onnx = _import_onnx()
    from onnx import TensorProto, helper, numpy_helper
    if checkpoint.mean_image is None:
        raise MinidlError(f"{checkpoint.path} has no training mean image (it is older than this minidl), "
                          "which the exported graph subtracts: export a checkpoint of a newer run")
    size = config["input_size"]
    image, output, functions = traced_functions(model, size)
    g = _Graph(helper, numpy_helper, {id(p): name for name, p in model.named_params()})
    g.names[id(image)] = "network_input"
    g.kept.append(image)
    _preprocessing(g, checkpoint.mean_image, size, input_scale(config, config["init"]))
    for function in functions:
        convert = CONVERTERS.get(type(function))
        if convert is None:
            raise MinidlError(f"cannot export the model to ONNX: it uses {type(function).__name__}, which this "
                              f"export does not convert (it converts {', '.join(c.__name__ for c in CONVERTERS)})")
        ins = [g.name(x) for x in function.inputs]
        convert(g, function, ins, g.outputs(function))
    g.node("Softmax", [g.names[id(output)]], [OUTPUT_NAME], axis=1)
    graph = helper.make_graph(
        g.nodes, "minidl", [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["N", 3, size, size])],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["N", output.shape[1]])], g.initializers)
    result = helper.make_model(graph, producer_name="minidl", opset_imports=[helper.make_opsetid("", OPSET)],
                               ir_version=IR_VERSION, doc_string=_doc(size, checkpoint.mean_image.shape[0]))
    helper.set_model_props(result, _metadata(checkpoint, config))
    onnx.checker.check_model(result)
    return result


def _preprocessing(g, mean_image, size, scale):
    """pixels -> (pixels - the mean image's centre crop) * scale, as minidl's TestInput computes it."""
    offset = (mean_image.shape[0] - size) // 2
    mean = mean_image[offset:offset + size, offset:offset + size].astype(np.float32).transpose(2, 0, 1)[None]
    g.node("Sub", [INPUT_NAME, g.constant(np.ascontiguousarray(mean), "mean_crop")], ["centred"])
    g.node("Mul", ["centred", g.constant(np.array(scale, np.float32), "input_scale")], ["network_input"])


def _doc(size, stored):
    return (f"{INPUT_NAME}: float32 (N, 3, {size}, {size}), RGB 0..255, the centre {size}x{size} crop of a "
            f"{stored}x{stored} image (shorter side resized to {stored}, central square); {OUTPUT_NAME}: "
            "softmax over the classes (metadata class_names). The training mean and input scale are inside.")


def _metadata(checkpoint, config):
    props = dict(input_scale=repr(input_scale(config, config["init"])), checkpoint=os.path.basename(checkpoint.path),
                 epoch=str(checkpoint["epoch"]), step=str(checkpoint["step"]))
    if "class_names" in checkpoint.attrs:
        props["class_names"] = checkpoint["class_names"]
    return props

"""minidl export: the ONNX graph against minidl's own outputs, the LRN conversion, the npz layout, bad input.

The built-in AlexNet's checkpoint is trained here for two steps at batch 8 on the built-in data
(32 images a class, so 32 validation images), not freshly initialised: the export then reads a
real run's checkpoint (its mean image, input scale and class names) and weights that have taken
updates, for about the cost of building the network twice.
"""
import json
import os
import re
import sys
import types

import numpy as np
import pytest
from click.testing import CliRunner

from minidl.data import Loader, builtin_dataset
from minidl.functions.lrn import local_response_norm
from minidl.core import Tensor
from minidl.training.export import INPUT_NAME, OPSET, OUTPUT_NAME, onnx_lrn_alpha
from minidl.training import predict
from minidl.training.predict import dataset_images, probabilities
from minidl.training.restore import Restored
from minidl.training.train import train
from minidl_cli.main import main

ROOT = os.path.join(os.path.dirname(__file__), "..")
ALEXNET = os.path.join(ROOT, "models", "alexnet.py")
RECIPE = ('dict(input_size={size}, batch_size=8, epochs=1, lr=0.01, momentum=0.9, weight_decay=0.0005, '
          'lr_drop_factor=10, lr_drops=3, plateau_patience=2, init="he", devices={devices}, input_scale=1 / 255)')

# both LRN conventions, with a k and an alpha at which the alpha/n of ONNX (and Caffe, PyTorch) matters
LRN_MODEL = '''
from minidl.layers import LRN, Conv2d, Flatten, Layer, Linear, MaxPool2d, ReLU

CONFIG = ''' + RECIPE.format(size=35, devices='("cpu",)') + '''


class Net(Layer):
    def __init__(self, num_classes, device, seed):
        super().__init__(device=None)
        self.conv1 = Conv2d(3, 8, 5, stride=2, device=device, rng=seed)
        self.lrn1 = LRN(5, k=1.0, alpha=0.5, beta=0.75, device=device)  # the paper's: alpha times the sum
        self.conv2 = Conv2d(8, 12, 3, pad=1, device=device, rng=seed + 1)
        self.lrn2 = LRN(3, k=0.5, alpha=2.0, beta=0.9, alpha_over_n=True, device=device)  # Caffe's: alpha/n
        self.relu, self.pool, self.flat = ReLU(device=device), MaxPool2d(3, 2, device=device), Flatten(device=device)
        self.fc = Linear(12 * 3 * 3, num_classes, device=device, rng=seed + 2)
        self.input_device = self.output_device = self.conv1.device

    def forward(self, x):
        x = self.pool(self.lrn1(self.relu(self.conv1(x))))
        return self.fc(self.flat(self.pool(self.lrn2(self.relu(self.conv2(x))))))


def build_model(num_classes, devices, init, seed):
    return Net(num_classes, devices[0], seed)
'''

# AlexNet's own code (two towers, their crossings) at a size the emulated GPUs train in seconds
SMALL_ALEXNET = '''
from minidl_models.alexnet import AlexNet

NETWORK = [
    ("conv1", "conv", dict(out=8, ksize=11, stride=4, pad=0), "image", "relu lrn pool"),
    ("conv2", "conv", dict(out=8, ksize=5, pad=2), "own", "relu lrn pool"),
    ("conv3", "conv", dict(out=8, ksize=3, pad=1), "both", "relu"),
    ("conv4", "conv", dict(out=8, ksize=3, pad=1), "own", "relu"),
    ("conv5", "conv", dict(out=8, ksize=3, pad=1), "own", "relu pool flatten"),
    ("fc6", "fc", dict(out=16), "both", "relu dropout"),
    ("fc7", "fc", dict(out=16), "both", "relu dropout"),
]
CONFIG = dict(''' + RECIPE.format(size=67, devices='("cuda:0", "cuda:1")') + ''', dropout=0.5)


def build_model(num_classes, devices, init, seed):
    return AlexNet(num_classes, devices, init, seed, CONFIG["dropout"], network=NETWORK, pooled_size=1)
'''


def run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return result.exit_code, result.output


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return builtin_dataset(str(tmp_path_factory.mktemp("builtin")), per_class=32)  # 32 validation images


@pytest.fixture(scope="module")
def alexnet_checkpoint(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("alexnet")
    train(ALEXNET, data=data, devices="cpu", batch_size=8, max_steps=2, out_dir=str(out))
    return out / "last.h5"


def trained(model_source, data, folder, devices):
    model = folder / "model.py"
    model.write_text(model_source)
    train(str(model), data=data, devices=devices, max_steps=2, out_dir=str(folder))
    return folder / "last.h5", model


def validation_images(data, count=32):
    return dataset_images(data, Loader(data, split="val", batch_size=8, crop=227, augment=False).indices[:count])


def onnx_and_minidl(onnx_path, restored, images):
    """(ONNX Runtime's probabilities for the raw centre crops, minidl's for the same images)."""
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install 'minidl[export]')")
    size = restored.config["input_size"]
    offset = (images.shape[1] - size) // 2
    pixels = images[:, offset:offset + size, offset:offset + size].transpose(0, 3, 1, 2).astype(np.float32)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = session.run([OUTPUT_NAME], {INPUT_NAME: pixels})[0]
    prepare = predict.TestInput(restored.checkpoint.mean_image, size, restored.input_scale)
    want = probabilities(restored.model, prepare(images))
    return got, want


def assert_same_predictions(got, want):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=0)
    np.testing.assert_array_equal(got.argmax(axis=1), want.argmax(axis=1))


def test_the_builtin_alexnet_in_onnx_runtime_gives_minidls_outputs(data, alexnet_checkpoint, tmp_path):
    pytest.importorskip("onnx", reason="onnx is not installed (pip install 'minidl[export]')")
    out = tmp_path / "model.onnx"
    code, output = run("export", alexnet_checkpoint, "-o", out)
    assert code == 0, output
    assert f"opset {OPSET}" in output and "(N, 3, 227, 227)" in output
    got, want = onnx_and_minidl(out, Restored(str(alexnet_checkpoint), devices="cpu"), validation_images(data))
    assert got.shape == (32, 10)
    assert_same_predictions(got, want)
    import onnx
    model = onnx.load(str(out))
    ops = [node.op_type for node in model.graph.node]
    assert "Dropout" not in ops and ops.count("LRN") == 4  # eval mode; LRN within each tower, as trained
    assert model.opset_import[0].version == OPSET
    assert len(json.loads({p.key: p.value for p in model.metadata_props}["class_names"])) == 10


@pytest.mark.parametrize("over_n", [False, True])
def test_the_lrn_alpha_is_converted_to_onnxs_alpha_over_size(over_n):
    onnx = pytest.importorskip("onnx", reason="onnx is not installed (pip install 'minidl[export]')")
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install 'minidl[export]')")
    from onnx import TensorProto, helper
    n, k, alpha, beta = 5, 1.0, 0.5, 0.75
    x = np.random.default_rng(0).normal(0, 2, (2, 9, 4, 4)).astype(np.float32)
    want = local_response_norm(Tensor(x), n, k, alpha, beta, alpha_over_n=over_n).numpy()
    minidl_alpha = alpha / n if over_n else alpha  # what minidl multiplies the window's sum by

    def onnx_lrn(onnx_alpha):
        node = helper.make_node("LRN", ["x"], ["y"], size=n, alpha=onnx_alpha, beta=beta, bias=k)
        info = [helper.make_tensor_value_info(name, TensorProto.FLOAT, x.shape) for name in "xy"]
        model = helper.make_model(helper.make_graph([node], "lrn", info[:1], info[1:]),
                                  opset_imports=[helper.make_opsetid("", OPSET)], ir_version=8)
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        return session.run(None, {"x": x})[0]
    np.testing.assert_allclose(onnx_lrn(onnx_lrn_alpha(minidl_alpha, n)), want, rtol=1e-5)  # float32 powers
    assert np.abs(onnx_lrn(minidl_alpha) - want).max() > 0.1 * np.abs(want).max()  # unconverted: far off
    assert onnx.__name__  # both packages were needed


def test_a_network_with_both_lrn_conventions(data, tmp_path):
    pytest.importorskip("onnx", reason="onnx is not installed (pip install 'minidl[export]')")
    checkpoint, model = trained(LRN_MODEL, data, tmp_path, "cpu")
    code, output = run("export", checkpoint, "-o", tmp_path / "lrn.onnx", "--model", model)
    assert code == 0, output
    got, want = onnx_and_minidl(tmp_path / "lrn.onnx", Restored(str(checkpoint), str(model), "cpu"),
                                validation_images(data))
    assert_same_predictions(got, want)


@pytest.mark.gpu
def test_a_checkpoint_trained_on_two_gpus(data, tmp_path, exact_fp32):
    pytest.importorskip("onnx", reason="onnx is not installed (pip install 'minidl[export]')")
    checkpoint, model = trained(SMALL_ALEXNET, data, tmp_path, "cuda:0,cuda:1")
    code, output = run("export", checkpoint, "-o", tmp_path / "gpu.onnx", "--model", model)
    assert code == 0, output
    restored = Restored(str(checkpoint), str(model))  # minidl's outputs on the GPUs the run used
    assert [d.name for d in restored.devices] == ["cuda:0", "cuda:1"]
    got, want = onnx_and_minidl(tmp_path / "gpu.onnx", restored, validation_images(data))
    assert_same_predictions(got, want)


def test_npz_holds_every_parameter_by_name_and_the_preprocessing(alexnet_checkpoint, tmp_path):
    out = tmp_path / "weights.npz"
    code, output = run("export", alexnet_checkpoint, "-o", out)
    assert code == 0, output
    restored = Restored(str(alexnet_checkpoint), devices="cpu")
    with np.load(out, allow_pickle=False) as arrays:  # plain arrays: nothing pickled
        for name, p in restored.checkpoint.params.items():
            np.testing.assert_array_equal(arrays[name], p, err_msg=name)
        assert arrays["tower1.conv2.W"].shape == (128, 48, 5, 5) and arrays["fc8.W"].shape == (10, 4096)
        assert float(arrays["input_scale"]) == np.float32(1 / 255) and arrays["mean_image"].shape == (256, 256, 3)
        assert list(arrays["class_names"]) == json.loads(restored.checkpoint["class_names"])


def readme_state_dict_code():
    with open(os.path.join(ROOT, "README.md")) as f:
        blocks = re.findall(r"```python\n(.*?)```", f.read(), re.S)
    return next(block for block in blocks if "load_state_dict" in block)


def torch_grouped_alexnet(torch, classes):
    """The paper's AlexNet in PyTorch: the towers as groups=2, LRN within each tower (as minidl's)."""
    nn = torch.nn

    class TowerLRN(nn.Module):
        def __init__(self):
            super().__init__()
            self.lrn = nn.LocalResponseNorm(5, alpha=5 * 1e-4, beta=0.75, k=2.0)  # PyTorch divides alpha by 5

        def forward(self, x):
            return torch.cat([self.lrn(half) for half in x.chunk(2, dim=1)], dim=1)

    class AlexNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.conv2 = nn.Conv2d(3, 96, 11, 4), nn.Conv2d(96, 256, 5, padding=2, groups=2)
            self.conv3 = nn.Conv2d(256, 384, 3, padding=1)
            self.conv4 = nn.Conv2d(384, 384, 3, padding=1, groups=2)
            self.conv5 = nn.Conv2d(384, 256, 3, padding=1, groups=2)
            self.fc6, self.fc7, self.fc8 = nn.Linear(9216, 4096), nn.Linear(4096, 4096), nn.Linear(4096, classes)
            self.lrn, self.pool = TowerLRN(), nn.MaxPool2d(3, 2)

        def forward(self, x):
            relu = torch.relu
            x = self.pool(self.lrn(relu(self.conv1(x))))
            x = self.pool(self.lrn(relu(self.conv2(x))))
            x = self.pool(relu(self.conv5(relu(self.conv4(relu(self.conv3(x)))))))
            return self.fc8(relu(self.fc7(relu(self.fc6(torch.flatten(x, 1))))))
    return AlexNet()


def test_the_readmes_code_loads_the_npz_into_a_pytorch_grouped_alexnet(data, alexnet_checkpoint, tmp_path,
                                                                      monkeypatch):
    code = readme_state_dict_code()  # checked here even where PyTorch is missing
    assert 'np.load("weights.npz")' in code
    torch = pytest.importorskip("torch", reason="PyTorch is not installed: the npz's PyTorch mapping is tested "
                                                "where it is")
    assert run("export", alexnet_checkpoint, "-o", tmp_path / "weights.npz")[0] == 0
    model = torch_grouped_alexnet(torch, 10).eval()
    monkeypatch.chdir(tmp_path)
    exec(code, {"model": model})
    restored = Restored(str(alexnet_checkpoint), devices="cpu")
    images = validation_images(data, 8)
    x = predict.TestInput(restored.checkpoint.mean_image, 227, restored.input_scale)(images)
    with torch.no_grad():
        got = torch.softmax(model(torch.from_numpy(x)).double(), dim=1).numpy()
    np.testing.assert_allclose(got, probabilities(restored.model, x), rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("make_args, message", [
    (lambda d, t: [d, "-o", t / "model.onnx"], "not a minidl checkpoint|is a minidl dataset|not a checkpoint"),
    (lambda d, t: [d, "-o", t / "weights.npz"], "not a minidl checkpoint|is a minidl dataset|not a checkpoint"),
    (lambda d, t: ["CKPT", "-o", t / "missing" / "model.onnx"], "is not a writable folder"),
    (lambda d, t: ["CKPT", "-o", t], "it is a folder"),
    (lambda d, t: ["CKPT", "-o", t / "a.onnx" if (t / "a.onnx").mkdir() is None else None], "it is a folder"),
    (lambda d, t: ["CKPT", "-o", t / "model.pt"], "unknown format '.pt'"),
    (lambda d, t: ["CKPT", "-o", t / "model"], "unknown format"),
])
def test_bad_input_gives_one_line(data, alexnet_checkpoint, tmp_path, make_args, message):
    args = [alexnet_checkpoint if a == "CKPT" else a for a in make_args(data, tmp_path)]
    code, output = run("export", *args)
    assert code == 1 and output.startswith("error: ") and output.count("\n") == 1, output
    assert re.search(message, output), output


def test_onnx_without_the_onnx_package_is_one_line(alexnet_checkpoint, tmp_path, monkeypatch):
    import builtins
    real_import = builtins.__import__

    def no_onnx(name, *args, **kwargs):
        if name == "onnx" or name.startswith("onnx."):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)
    monkeypatch.setattr(builtins, "__import__", no_onnx)
    code, output = run("export", alexnet_checkpoint, "-o", tmp_path / "model.onnx")
    assert code == 1 and "pip install 'minidl[export]'" in output and output.count("\n") == 1, output
    assert not (tmp_path / "model.onnx").exists()


def grouped_alexnet_in_onnx(state, helper, numpy_helper, TensorProto):
    """The PyTorch model above as an ONNX graph over the state dict: grouped convolutions, LRN on each half."""
    nodes, x = [], "x"

    def add(op, inputs, **attributes):
        nodes.append(helper.make_node(op, inputs, [f"t{len(nodes)}"], **attributes))
        return nodes[-1].output[0]

    def lrn_by_halves(x):
        halves = [f"{x}_half0", f"{x}_half1"]
        nodes.append(helper.make_node("Split", [x], halves, axis=1, num_outputs=2))
        return add("Concat", [add("LRN", [h], size=5, alpha=5e-4, beta=0.75, bias=2.0) for h in halves], axis=1)

    for layer, k, stride, pad, groups, then in (("conv1", 11, 4, 0, 1, "lrn pool"), ("conv2", 5, 1, 2, 2, "lrn pool"),
                                                ("conv3", 3, 1, 1, 1, ""), ("conv4", 3, 1, 1, 2, ""),
                                                ("conv5", 3, 1, 1, 2, "pool")):
        x = add("Relu", [add("Conv", [x, f"{layer}.weight", f"{layer}.bias"], kernel_shape=[k, k], strides=[stride] * 2,
                             pads=[pad] * 4, group=groups)])
        x = lrn_by_halves(x) if "lrn" in then else x
        x = add("MaxPool", [x], kernel_shape=[3, 3], strides=[2, 2]) if "pool" in then else x
    x = add("Flatten", [x], axis=1)
    for layer in ("fc6", "fc7", "fc8"):
        x = add("Gemm", [x, f"{layer}.weight", f"{layer}.bias"], transB=1)
        x = add("Relu", [x]) if layer != "fc8" else add("Softmax", [x], axis=1)
    initializers = [numpy_helper.from_array(array, name) for name, array in state.items()]
    graph = helper.make_graph(nodes, "grouped", [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, None)], initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=8)


def test_the_readmes_npz_mapping_gives_minidls_outputs_in_a_grouped_alexnet(data, alexnet_checkpoint, tmp_path,
                                                                          monkeypatch):
    """Where PyTorch is missing: the README's code, with torch.from_numpy as the identity, fills the grouped
    AlexNet above, run here by ONNX Runtime (Conv's group, LRN and Gemm are PyTorch's Conv2d, LocalResponseNorm
    and Linear)."""
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install 'minidl[export]')")
    from onnx import TensorProto, helper, numpy_helper
    assert run("export", alexnet_checkpoint, "-o", tmp_path / "weights.npz")[0] == 0
    state = {}
    monkeypatch.setitem(sys.modules, "torch", types.SimpleNamespace(from_numpy=lambda array: array))
    monkeypatch.chdir(tmp_path)
    exec(readme_state_dict_code(), {"model": types.SimpleNamespace(load_state_dict=state.update)})
    assert sorted(state) == sorted(f"{layer}.{kind}" for layer in ("conv1", "conv2", "conv3", "conv4", "conv5", "fc6",
                                                                   "fc7", "fc8") for kind in ("weight", "bias"))
    model = grouped_alexnet_in_onnx(state, helper, numpy_helper, TensorProto)
    session = ort.InferenceSession(model.SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    restored = Restored(str(alexnet_checkpoint), devices="cpu")
    x = predict.TestInput(restored.checkpoint.mean_image, 227, restored.input_scale)(validation_images(data, 8))
    assert_same_predictions(session.run(None, {"x": x})[0], probabilities(restored.model, x))

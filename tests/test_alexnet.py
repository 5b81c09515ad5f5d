"""AlexNet's two towers: shape, parameters, initialisation, placement, and equivalence
with the one-device network written with grouped convolutions."""
import importlib
import os

import numpy as np
import pytest

import minidl
from minidl import Tensor
from minidl.device import Device
from minidl.errors import MinidlError
from minidl.functions import concat, local_response_norm, softmax_cross_entropy, split
from minidl.layers import (Conv2d, Dropout, Flatten, Layer, Linear, MaxPool2d, ReLU, Sequential,
                           summary)
from minidl.precision import DEFAULT_PRECISION, set_precision
from minidl.training.model_file import load_model_file

MODEL_PATH = os.path.join(os.path.dirname(__file__), "..", "models", "alexnet.py")
alexnet = load_model_file(MODEL_PATH).module

# A scaled-down two-tower net (same table shape, narrow layers, 19x19 input -> 1x1 after the pools)
SMALL_NETWORK = [
    ("conv1", "conv", dict(out=2, ksize=3, stride=1, pad=0), "image", "relu lrn pool"),
    ("conv2", "conv", dict(out=3, ksize=3, pad=1), "own", "relu lrn pool"),
    ("conv3", "conv", dict(out=3, ksize=3, pad=1), "both", "relu"),
    ("conv4", "conv", dict(out=2, ksize=3, pad=1), "own", "relu"),
    ("conv5", "conv", dict(out=2, ksize=3, pad=1), "own", "relu pool flatten"),
    ("fc6", "fc", dict(out=3), "both", "relu dropout"),
    ("fc7", "fc", dict(out=3), "both", "relu dropout"),
]


class TowerLRN(Layer):
    """LRN within each tower's half of the channels: a tower normalises only its own maps
    (Caffe's one-device `group: 2` net normalises across the halves, a slightly different net)."""

    def forward(self, x):
        return concat([local_response_norm(half) for half in split(x, 2, axis=1)], axis=1)


def grouped_alexnet(num_classes, device="cpu"):
    """The same network on one device: groups=2 in conv2, conv4, conv5 (Caffe's `group: 2`)."""
    d = device
    return Sequential(
        Conv2d(3, 96, 11, 4, 0, device=d), ReLU(device=d), TowerLRN(device=d), MaxPool2d(3, 2, device=d),
        Conv2d(96, 256, 5, 1, 2, groups=2, device=d), ReLU(device=d), TowerLRN(device=d),
        MaxPool2d(3, 2, device=d),
        Conv2d(256, 384, 3, 1, 1, device=d), ReLU(device=d),
        Conv2d(384, 384, 3, 1, 1, groups=2, device=d), ReLU(device=d),
        Conv2d(384, 256, 3, 1, 1, groups=2, device=d), ReLU(device=d), MaxPool2d(3, 2, device=d),
        Flatten(device=d),
        Linear(9216, 4096, device=d), ReLU(device=d), Dropout(device=d),
        Linear(4096, 4096, device=d), ReLU(device=d), Dropout(device=d),
        Linear(4096, num_classes, device=d))


def tower_pairs(two_tower, grouped):
    """(grouped parameter, [tower0 part, tower1 part]) in network order; fc8 is one part."""
    parametrised = [l for l in grouped if l._params]
    names = [row[0] for row in alexnet.NETWORK]
    for name, layer in zip(names, parametrised):
        t0, t1 = getattr(two_tower.tower0, name), getattr(two_tower.tower1, name)
        yield layer.W, [t0.W, t1.W]
        yield layer.b, [t0.b, t1.b]
    yield parametrised[-1].W, [two_tower.fc8.W]
    yield parametrised[-1].b, [two_tower.fc8.b]


def test_two_towers_equal_grouped_network_float64():
    classes = 10
    net = alexnet.build_model(classes, ("cpu", "cpu"), seed=1).to(dtype=np.float64).eval()
    ref = grouped_alexnet(classes).to(dtype=np.float64).eval()
    for whole, parts in tower_pairs(net, ref):
        whole.data[...] = np.concatenate([p.data for p in parts])
    x = np.random.default_rng(0).standard_normal((2, 3, 227, 227))
    labels = np.array([3, 7])
    out_net, out_ref = net(Tensor(x)), ref(Tensor(x))
    np.testing.assert_allclose(out_net.data, out_ref.data, rtol=1e-10, atol=1e-12)
    softmax_cross_entropy(out_net, labels).backward()
    softmax_cross_entropy(out_ref, labels).backward()
    for whole, parts in tower_pairs(net, ref):
        np.testing.assert_allclose(np.concatenate([p.grad.data for p in parts]), whole.grad.data,
                                   rtol=1e-8, atol=1e-12)


def test_small_two_tower_net_passes_gradcheck():
    net = alexnet.AlexNet(4, ("cpu", "cpu"), seed=3, network=SMALL_NETWORK, pooled_size=1)
    net.to(dtype=np.float64).eval()
    x = Tensor(np.random.default_rng(1).standard_normal((2, 3, 19, 19)), requires_grad=True)
    params = net.params()
    minidl.gradcheck(lambda x, *ps: net(x), x, *params, atol=1e-6, rtol=1e-4)


def test_parameter_count_and_feature_maps():
    net = alexnet.build_model(1000, ("cpu", "cpu"))
    assert net.num_params() == 60_965_224
    table = summary(net, (1, 3, 227, 227), device="cpu")
    for shape in ["(1, 48, 55, 55)", "(1, 48, 27, 27)", "(1, 128, 27, 27)", "(1, 128, 13, 13)",
                  "(1, 192, 13, 13)", "(1, 128, 6, 6)", "(1, 2048)", "(1, 1000)"]:
        assert shape in table, shape
    assert "total parameters: 60,965,224" in table


def test_paper_initialisation():
    net = alexnet.build_model(1000, ("cpu", "cpu"), init="paper", seed=0)
    for tower in net.towers:
        for name in ("conv2", "conv4", "conv5", "fc6", "fc7"):
            assert np.all(getattr(tower, name).b.data == 1.0), name
        for name in ("conv1", "conv3"):
            assert np.all(getattr(tower, name).b.data == 0.0), name
        w = tower.fc6.W.data
        assert abs(w.std() - 0.01) < 2e-4 and abs(w.mean()) < 2e-4
    assert np.all(net.fc8.b.data == 0.0)
    assert net.fc8.W.dtype == np.float32


def test_he_initialisation_is_default_and_scaled_by_fan_in():
    net = alexnet.build_model(10, ("cpu", "cpu"), seed=0)
    w = net.tower0.conv3.W.data  # fan in 256 * 3 * 3: both towers' maps
    assert abs(w.std() - np.sqrt(2 / (256 * 9))) < 1e-3
    assert np.all(net.tower0.conv2.b.data == 0.0)


def test_same_seed_same_weights_different_seed_different():
    a = alexnet.build_model(10, ("cpu", "cpu"), seed=5)
    b = alexnet.build_model(10, ("cpu", "cpu"), seed=5)
    c = alexnet.build_model(10, ("cpu", "cpu"), seed=6)
    assert np.array_equal(a.tower1.conv1.W.data, b.tower1.conv1.W.data)
    assert not np.array_equal(a.tower1.conv1.W.data, c.tower1.conv1.W.data)
    assert not np.array_equal(a.tower0.conv1.W.data, a.tower1.conv1.W.data)


def test_parameter_names_are_stable_and_dotted():
    names = [n for n, _ in alexnet.build_model(10, ("cpu", "cpu")).named_params()]
    assert names[:2] == ["tower0.conv1.W", "tower0.conv1.b"]
    assert "tower1.fc7.W" in names and names[-2:] == ["fc8.W", "fc8.b"]
    assert len(names) == len(set(names)) == 2 * 2 * 7 + 2


def test_layer_refuses_input_from_another_device():
    layer = ReLU(device="cpu")
    x = Tensor(np.ones((2, 2), np.float32))
    x.device = Device("cuda:1")  # pretend: the check must not need a real GPU
    with pytest.raises(MinidlError, match=r"lives on cpu but got an input on cuda:1"):
        layer(x)


@pytest.mark.skipif(minidl.gpu_count() > 0, reason="checks the error on a machine without that GPU")
def test_missing_gpu_is_reported():
    with pytest.raises(MinidlError, match=r"cuda:1|CuPy"):
        alexnet.build_model(10, ("cuda:0", "cuda:1"))


def test_missing_gpu_message_names_the_one_gpu_form(monkeypatch):
    device_module = importlib.import_module("minidl.device")  # the module, not minidl.device()
    monkeypatch.setattr(device_module, "cupy", lambda: object())
    monkeypatch.setattr(device_module, "gpu_count", lambda: 1)
    monkeypatch.setattr(device_module, "_devices", {})
    with pytest.raises(MinidlError, match=r"cuda:1 is not there.*1 GPU.*\('cuda:0', 'cuda:0'\)"):
        minidl.device("cuda:1")


def test_train_mode_dropout_differs_between_towers_and_eval_is_deterministic():
    net = alexnet.AlexNet(4, ("cpu", "cpu"), seed=3, network=SMALL_NETWORK, pooled_size=1)
    x = Tensor(np.random.default_rng(1).standard_normal((3, 3, 19, 19)).astype(np.float32))
    net.eval()
    assert np.array_equal(net(x).data, net(x).data)
    net.train()
    assert not np.array_equal(net(x).data, net(x).data)


# --- GPU: the full network on one GPU against the CPU path


def _copy_weights(src, dst):
    for (_, a), (_, b) in zip(src.named_params(), dst.named_params()):
        with b.device:  # on the parameter's own stream, ordered with the work that reads it
            b.data[...] = b.device.xp.asarray(a.numpy())


@pytest.mark.gpu
@pytest.mark.parametrize("devices, device_map", [
    (("cuda:0", "cuda:0"), None),  # both towers on one GPU, one stream
    (("cuda:0", "cuda:1"), {"cuda:1": 0}),  # two logical devices (two streams) on one GPU
    (("cuda:0", "cuda:1"), None),  # two GPUs: every crossing a copy between them
], ids=["one-device", "two-streams-one-gpu", "two-gpus"])
def test_gpu_alexnet_matches_cpu(devices, device_map):
    if device_map is None and len(set(devices)) == 2 and minidl.gpu_count() < 2:
        pytest.skip("needs two GPUs")
    minidl.set_device_map(device_map)
    set_precision("fp32")  # exact FP32 GEMMs: TF32's own tolerance is tests/test_gemm.py's
    try:
        cpu = alexnet.build_model(1000, ("cpu", "cpu"), seed=2).eval()
        gpu = alexnet.build_model(1000, devices, seed=9).eval()
        _copy_weights(cpu, gpu)
        rng = np.random.default_rng(4)
        x = rng.standard_normal((16, 3, 227, 227)).astype(np.float32)
        labels = rng.integers(0, 1000, 16)
        out_cpu = cpu(Tensor(x))
        out_gpu = gpu(Tensor(x, device=gpu.input_device))
        rel = np.linalg.norm(out_gpu.numpy() - out_cpu.numpy()) / np.linalg.norm(out_cpu.numpy())
        assert rel < 1e-3
        softmax_cross_entropy(out_cpu, labels).backward()
        softmax_cross_entropy(out_gpu, labels).backward()
        # conv1's weight gradient sums 16 x 55 x 55 products that mostly cancel: float32 is ~2e-3 off
        # float64 there on the CPU itself (and differs that much with the BLAS's thread count), so each
        # gradient may differ from the CPU's by its own float32 error on top of the common 2e-3
        exact = alexnet.build_model(1000, ("cpu", "cpu"), seed=2).eval().to(dtype=np.float64)
        softmax_cross_entropy(exact(Tensor(x.astype(np.float64))), labels).backward()
        for (name, a), (_, b), (_, e) in zip(cpu.named_params(), gpu.named_params(), exact.named_params()):
            ga, gb, ge = a.grad.numpy(), b.grad.numpy(), e.grad.numpy()
            cpu_error = np.linalg.norm(ga - ge)
            assert np.linalg.norm(gb - ga) <= 2e-3 * np.linalg.norm(ga) + 3 * cpu_error + 1e-7, name
    finally:
        minidl.set_device_map(None)
        set_precision(DEFAULT_PRECISION)


@pytest.mark.gpu
def test_gpu_training_step_changes_every_parameter():
    from minidl.optim import MomentumSGD
    net = alexnet.build_model(1000, ("cuda:0", "cuda:0"), seed=2)
    before = {n: p.numpy() for n, p in net.named_params()}
    rng = np.random.default_rng(5)
    x = Tensor(rng.standard_normal((8, 3, 227, 227)).astype(np.float32), device="cuda:0")
    opt = MomentumSGD(net.params())
    softmax_cross_entropy(net(x), rng.integers(0, 1000, 8)).backward()
    opt.step()
    for name, p in net.named_params():
        assert not np.array_equal(p.numpy(), before[name]), name

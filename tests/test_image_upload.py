"""AlexNet's image goes to the first tower's device, and from there to the second tower's, once."""
import numpy as np
import pytest

import minidl
from minidl import Tensor
from minidl.precision import DEFAULT_PRECISION, set_precision
from test_alexnet import SMALL_NETWORK, alexnet


@pytest.mark.gpu
@pytest.mark.parametrize("devices", [("cuda:0", "cuda:1"), ("cuda:0", "cuda:0"), ("cpu", "cpu")])
def test_the_image_goes_to_the_first_tower_then_gpu_to_gpu(devices, monkeypatch):
    if "cuda:1" in devices and minidl.gpu_count() < 2:
        pytest.skip("needs two GPUs")
    net = alexnet.AlexNet(4, devices, seed=3, network=SMALL_NETWORK, pooled_size=1).eval()
    assert net.input_device is minidl.device(devices[0])
    x = np.random.default_rng(0).standard_normal((2, 3, 19, 19)).astype(np.float32)
    copies = []  # the sizes of the copies between GPUs
    if net.tower0.device.is_cuda:
        pointer = type(minidl.device("cuda:0").xp.empty(1).data)
        plain = pointer.copy_from_device_async
        monkeypatch.setattr(pointer, "copy_from_device_async",
                            lambda self, src, size, stream=None: (copies.append(size), plain(self, src, size, stream)))
    set_precision("fp32")  # exact FP32 GEMMs: TF32's own tolerance is tests/test_gemm.py's
    try:
        out = net(Tensor(x, device=net.input_device))
    finally:
        set_precision(DEFAULT_PRECISION)
    assert copies.count(x.nbytes) == (devices[1] != devices[0])  # the second tower's image, once
    reference = alexnet.AlexNet(4, ("cpu", "cpu"), seed=3, network=SMALL_NETWORK, pooled_size=1).eval()
    np.testing.assert_allclose(out.numpy(), reference(Tensor(x)).numpy(), rtol=1e-4, atol=1e-6)

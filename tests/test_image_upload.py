"""AlexNet's image goes from the host to each tower's device: no copy of it from one GPU to the other."""
import numpy as np
import pytest

import minidl
from minidl import Tensor
from test_alexnet import SMALL_NETWORK, alexnet


@pytest.mark.gpu
@pytest.mark.parametrize("devices, input_device", [(("cuda:0", "cuda:1"), "cpu"), (("cuda:0", "cuda:0"), "cuda:0"),
                                                   (("cpu", "cpu"), "cpu")])
def test_each_tower_gets_the_image_from_the_host(devices, input_device, monkeypatch, exact_fp32):
    if "cuda:1" in devices and minidl.gpu_count() < 2:
        pytest.skip("needs two GPUs")
    net = alexnet.AlexNet(4, devices, seed=3, network=SMALL_NETWORK, pooled_size=1).eval()
    assert net.input_device is minidl.device(input_device)
    x = np.random.default_rng(0).standard_normal((2, 3, 19, 19)).astype(np.float32)
    copies = []  # the sizes of the copies between GPUs
    if net.tower0.device.is_cuda:
        pointer = type(minidl.device("cuda:0").xp.empty(1).data)
        plain = pointer.copy_from_device_async
        monkeypatch.setattr(pointer, "copy_from_device_async",
                            lambda self, src, size, stream=None: (copies.append(size), plain(self, src, size, stream)))
    out = net(Tensor(x, device=net.input_device))
    assert x.nbytes not in copies  # the crossings of the towers' maps only
    reference = alexnet.AlexNet(4, ("cpu", "cpu"), seed=3, network=SMALL_NETWORK, pooled_size=1).eval()
    np.testing.assert_allclose(out.numpy(), reference(Tensor(x)).numpy(), rtol=1e-4, atol=1e-6)
